"""Inputs that would exhaust the machine: decompression bombs in every format OpenCV decodes, and paths that
are not regular files. Each runs in a child process with a time limit (a hang fails the test instead of
stalling the suite) and a cap on its address space; the child reports its peak memory (getrusage)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostile import HOSTILE

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CHILD_LIMIT_S = 60
MAX_GROWTH_MIB = 64  # a refusal from the header costs next to nothing; decoding 225 MP costs >= 640 MiB


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OPENCV_LOG_LEVEL": "OFF"}
    prelude = ("import resource\n"  # 6 GiB of address space: a bomb fails to allocate rather than swap the machine
               "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n")
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True,
                          timeout=CHILD_LIMIT_S, env=env)


DECODE_ONE = """
import json, sys, time
from hostile import HOSTILE
from simsearch.errors import ImageError
from simsearch.images import decode

def peak_kib():  # VmHWM: this process's own peak (getrusage's maxrss is inherited from the parent across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
data = HOSTILE[sys.argv[1]][0]()
before = peak_kib()
start = time.perf_counter()
try:
    decode(data, "hostile", max_pixels=100_000_000)
    outcome, message = "decoded", ""
except ImageError as exc:
    outcome, message = type(exc).__name__, str(exc)
print(json.dumps({"outcome": outcome, "message": message, "bytes": len(data), "seconds": time.perf_counter() - start,
                  "growth_mib": (peak_kib() - before) / 1024}))
"""


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_bomb_in_any_format_is_refused_before_decoding(name):
    proc = run_child(DECODE_ONE, name)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    if report["bytes"] == 0:
        pytest.skip("this Pillow cannot write AVIF")
    sized = HOSTILE[name][1]
    assert report["outcome"] != "decoded"
    if sized:
        assert report["outcome"] == "ImageTooLarge", report
        assert "15000x15000, over the limit" in report["message"]
    elif sized is False:
        assert report["outcome"] == "ImageError" and "no image size in its header" in report["message"], report
    assert report["growth_mib"] < MAX_GROWTH_MIB, report
    assert report["seconds"] < 2, report


NOT_REGULAR = """
import os, sys
from pathlib import Path
from fakes import TinyEmbedder, write_images
from simsearch.engine import Engine
from simsearch.errors import ImageError
from simsearch.images import expand_paths, load_image

tmp = Path(sys.argv[1])
folder = tmp / "camera"
goods = write_images(folder, range(3))
fifo = folder / "cam.png"
os.mkfifo(fifo)
for path in (fifo, "/dev/zero"):
    try:
        load_image(path)
        raise SystemExit(f"{path} was read")
    except ImageError as exc:
        assert "not a regular file" in str(exc), exc
found, skipped = expand_paths([str(folder)])
assert found == goods and skipped == [(str(fifo), "not a regular file (a FIFO, device or socket)")], skipped
engine = Engine.create(tmp / "index", embedder=TinyEmbedder())
try:
    engine.add([str(fifo), goods[0]])  # named: the add aborts, nothing written
    raise SystemExit("a named FIFO was added")
except ImageError as exc:
    assert "cam.png: not a regular file" in str(exc), exc
assert engine.generation == 0 and not engine.images()
report = engine.add([str(folder)])  # found in a folder: skipped, the rest added
assert report.added == goods and (str(fifo), "not a regular file (a FIFO, device or socket)") in report.skipped
try:
    engine.query(str(fifo))
    raise SystemExit("a FIFO was queried")
except ImageError:
    pass
with engine.writer_lock():  # the lock was released: nothing is left waiting on the FIFO
    pass
print("ok")
"""


def test_a_fifo_or_device_is_refused_never_waited_on(tmp_path):
    proc = run_child(NOT_REGULAR, str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


LARGE_QUERY = """
import json, sys, time
import numpy as np
from fakes import TinyEmbedder, write_images
from pathlib import Path
from simsearch.engine import Engine
tmp = Path(sys.argv[1])
engine = Engine.create(tmp / "index", embedder=TinyEmbedder())
engine.add(write_images(tmp / "good", range(4)))
big = np.random.default_rng(0).integers(0, 256, (6000, 6000, 3), dtype=np.uint8)
start = time.perf_counter()
result = engine.query(big)
print(json.dumps({"seconds": time.perf_counter() - start, "shape": list(result.anomaly_map.shape)}))
"""


def test_a_large_image_inside_the_pixel_limit_costs_seconds_not_minutes(tmp_path):
    """36 MP (under the limit): the map's blur, once run at the original resolution with a kernel of
    thousands of pixels, took minutes; at the index scale the whole query takes seconds."""
    proc = run_child(LARGE_QUERY, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["shape"] == [6000, 6000] and report["seconds"] < 15, report
