"""Fuzz simsearch.images.decode with mutated bytes of small valid files, in a child process.

The fuzzing runs in a subprocess so that a crash in a native decoder (a segfault in libpng, libjpeg,
libtiff, ...) fails this test instead of killing pytest. The child is this file run as a script:

    python tests/test_images_fuzz.py OUT_DIR

Every mutated input must either decode to an (H, W, 3) uint8 array or raise ImageError with a
one-line message; any other exception fails. Hypothesis runs derandomized (the same inputs every
run, no example database); the input being decoded is written to OUT_DIR/last_input.bin first, so a
crash leaves the culprit behind.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

N_EXAMPLES = 2500  # about 10 s on one busy core
MAX_PIXELS = 4_000_000  # a mutated header may ask for more; keep the child's memory small
TIMEOUT_S = 90  # hard limit for the child: a hang fails the test too


def test_decode_survives_mutated_files(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OPENCV_LOG_LEVEL": "OFF"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=env)
    elapsed = time.monotonic() - start
    output = proc.stdout[-1000:] + proc.stderr[-3000:]
    last = tmp_path / "last_input.bin"
    assert proc.returncode == 0, (f"fuzz child exited with {proc.returncode} after {elapsed:.1f} s "
                                  f"(negative: killed by that signal); last input: {last}\n{output}")
    counts = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    tried, decoded, refused = int(counts["tried"]), int(counts["decoded"]), int(counts["refused"])
    assert tried == decoded + refused
    assert tried >= N_EXAMPLES * 0.8, proc.stdout  # it really ran (duplicates are not re-run)
    assert decoded > 50 and refused > 50, proc.stdout  # mutations both kept and broke files


# -- the child ----------------------------------------------------------------------------------------

def _seeds() -> list[tuple[str, bytes]]:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:12, 0:16]
    bgr = np.stack([x * 16, y * 20, (x + y) * 9], axis=2).astype(np.uint8)
    bgr = np.clip(bgr + rng.integers(0, 12, bgr.shape), 0, 255).astype(np.uint8)
    bgra = np.concatenate([bgr, (x * 16).astype(np.uint8)[:, :, None]], axis=2)
    gray16 = (bgr[..., 0].astype(np.uint16) * 257)

    def enc(ext, img, params=()):
        ok, buf = cv2.imencode(ext, img, list(params))
        assert ok, ext
        return buf.tobytes()

    return [
        ("rgb.png", enc(".png", bgr)),
        ("rgba.png", enc(".png", bgra)),
        ("gray16.png", enc(".png", gray16)),
        ("baseline.jpg", enc(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])),
        ("progressive.jpg", enc(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])),
        ("gray.jpg", enc(".jpg", bgr[..., 1])),
        ("rgb.bmp", enc(".bmp", bgr)),
        ("rgba.bmp", enc(".bmp", bgra)),
        ("rgb.tif", enc(".tif", bgr)),
        ("gray16.tif", enc(".tif", gray16)),
    ]


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, payload in ops:
        pos %= len(b) + 1
        if kind == "flip" and pos < len(b):
            b[pos] ^= 1 << (payload[0] % 8)
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = payload
        elif kind == "overwrite":
            b[pos:pos + len(payload)] = payload
        elif kind == "delete":
            del b[pos:pos + 1 + payload[0] % 16]
    return bytes(b)


def _child(out_dir: str) -> None:
    import cv2
    import numpy as np
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from simsearch.images import ImageError, decode

    cv2.setNumThreads(1)
    seeds = _seeds()
    for name, data in seeds:  # the unmutated files are fine
        assert decode(data, name).shape[2] == 3, name
    last = os.path.join(out_dir, "last_input.bin")
    counts = {"tried": 0, "decoded": 0, "refused": 0}

    position = st.one_of(st.integers(0, 64), st.integers(0, 1 << 16))  # headers get half the attention
    op = st.tuples(st.sampled_from(["flip", "flip", "truncate", "insert", "overwrite", "delete"]), position,
                   st.binary(min_size=1, max_size=8))

    @settings(max_examples=N_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(range(len(seeds))), ops=st.lists(op, min_size=1, max_size=6))
    def fuzz(seed, ops):
        data = _mutate(seeds[seed][1], ops)
        with open(last, "wb") as fh:
            fh.write(data)
        counts["tried"] += 1
        try:
            rgb = decode(data, "fuzz.bin", max_pixels=MAX_PIXELS)
        except ImageError as exc:
            message = str(exc)
            assert message.startswith("fuzz.bin: ") and "\n" not in message, message
            counts["refused"] += 1
        else:
            assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8, type(rgb)
            assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags["C_CONTIGUOUS"], rgb.shape
            counts["decoded"] += 1

    fuzz()
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    _child(sys.argv[1])
