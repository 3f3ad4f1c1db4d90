"""Hostile inputs and damaged indexes: what is refused, at what cost, and what is detected.

    .venv/bin/python bench/hostile.py [--work DIR] > hostile.md

Every input is decoded (or queried) in a child process of its own, which reports its wall time and its
peak RSS (getrusage) against a child that only imported the same modules; the damage cases run on copies
of a calibrated PIPED PA_BDP01_TL index (train/good, a quarter held out). Prints the markdown of
docs/benchmarks.md's "Hostile inputs" section.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hostile import HOSTILE, SIDE  # noqa: E402  (tests/hostile.py: the same files the tests refuse)
from realdata import PIPED, piped_test, piped_train  # noqa: E402

CHILD = """
import json, sys, time
kind, target = sys.argv[1], sys.argv[2]
from simsearch.errors import SimsearchError
from simsearch.images import load_image

def peak_mib():  # VmHWM: this process's own peak (getrusage's maxrss is inherited from the parent across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
engine = None
if kind == "query":  # the model loaded and the bank read first: the time below is the query's alone
    from simsearch.engine import Engine
    engine = Engine.open(sys.argv[3])
    engine.query(sys.argv[4])
before = peak_mib()
start = time.perf_counter()
try:
    load_image(target) if engine is None else engine.query(target)
    outcome = "accepted"
except SimsearchError as exc:
    outcome = f"{type(exc).__name__}: {str(exc).split(': ', 1)[-1][:90]}"
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start, "before_mib": before,
                  "peak_mib": peak_mib()}))
"""


def child(kind: str, target: str, *extra: str, timeout: float = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OPENCV_LOG_LEVEL": "OFF"}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, kind, target, *extra], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"outcome": f"still running after {timeout:.0f} s", "seconds": timeout, "peak_mib": float("nan")}
    if proc.returncode:
        return {"outcome": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:90]}",
                "seconds": float("nan"), "peak_mib": float("nan")}
    return json.loads(proc.stdout.splitlines()[-1])


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit grey PNG of zeros: a few hundred KB for 900 MP."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def inputs(work: Path) -> list[tuple[str, Path]]:
    files = []
    for name, (make, _sized) in HOSTILE.items():
        data = make()
        if data:
            files.append((f"{name} claiming {SIDE} x {SIDE}", data))
    files.append(("PNG bomb, 30000 x 30000 (1-bit zeros)", png_bomb(30000, 30000)))
    ok, jp2 = cv2.imencode(".jp2", np.full((SIDE, SIDE, 3), 128, np.uint8))  # the 5.8 KB file, made for real
    files.append((f"JPEG 2000, {SIDE} x {SIDE} (a real encoding)", jp2.tobytes()))
    out = []
    for i, (name, data) in enumerate(files):
        path = work / f"input{i}.bin"
        path.write_bytes(data)
        out.append((f"{name}, {len(data) / 1024:.1f} KB", path))
    fifo = work / "cam.png"
    os.mkfifo(fifo)
    out += [("a FIFO named cam.png (no writer)", fifo), ("/dev/zero", Path("/dev/zero"))]
    return out


def mib(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"


def input_table(work: Path, index: Path) -> list[str]:
    rows = ["| input | outcome | time | peak RSS of the process, before / after (MiB) |", "|---|---|---|---|"]
    for name, path in inputs(work):
        r = child("decode", str(path), timeout=120)
        rows.append(f"| {name} | {r['outcome']} | {r['seconds'] * 1000:.1f} ms | "
                    f"{mib(r['before_mib'])} / {mib(r['peak_mib'])} |")
    big = work / "big.png"  # 7000 x 7000, under the 100 MP limit: accepted, and what it costs
    cv2.imwrite(str(big), np.zeros((7000, 7000, 3), np.uint8))
    r = child("query", str(big), str(index), str(piped_test("good")[0]))
    rows.append(f"| a query of a 7000 x 7000 PNG, {big.stat().st_size / 1024:.0f} KB (under the limit; issue 23: "
                f"83 s) | {r['outcome']} | {r['seconds']:.1f} s | {mib(r['before_mib'])} / {mib(r['peak_mib'])} |")
    return rows


def damage_cases(work: Path, index: Path) -> list[str]:
    from simsearch.engine import Engine
    from simsearch.errors import SimsearchError, exit_code
    from simsearch.store import bankfiles

    other = work / "other"  # another index of the same dimension
    with Engine.create(other) as engine:
        engine.add([str(p) for p in piped_train()[:3]])

    def bank_of(copy, name):
        with Engine.open(copy) as engine:
            return bankfiles.bank_path(copy, name, engine.generation)

    def overwrite(path: Path, offset_fraction: float, size: int):
        data = bytearray(path.read_bytes())
        at = int(len(data) * offset_fraction)
        data[at:at + size] = np.random.default_rng(0).bytes(len(data[at:at + size]))
        path.write_bytes(bytes(data))

    def sqlite_page(copy, table):
        db = copy / Engine.DB
        with sqlite3.connect(db) as conn:
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            page = (db.stat().st_size // size if table is None else
                    conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0])
        conn.close()
        with open(db, "r+b") as fh:
            fh.seek((page - 1) * size)
            fh.write(np.random.default_rng(1).bytes(size))

    cases = {
        "64 KB of random bytes written into patches.g*.faiss": lambda c: overwrite(bank_of(c, "patches"), 0.5, 65536),
        "patches.g*.faiss cut short by 100 bytes": lambda c: bank_of(c, "patches").write_bytes(
            bank_of(c, "patches").read_bytes()[:-100]),
        "another index's patch bank (same dimension) copied over": lambda c: shutil.copyfile(
            bank_of(other, "patches"), bank_of(c, "patches")),
        "images.g*.faiss deleted": lambda c: bank_of(c, "images").unlink(),
        "one page of meta.sqlite overwritten (the vectors table's root)": lambda c: sqlite_page(c, "vectors"),
        "one page of meta.sqlite overwritten (the images table's root)": lambda c: sqlite_page(c, "images"),
        "the last page of meta.sqlite overwritten": lambda c: sqlite_page(c, None),
        "meta.sqlite emptied (0 bytes)": lambda c: (c / Engine.DB).write_bytes(b""),
    }
    probe = str(piped_test("impurity")[0])
    rows = ["| damage | `index check` | a query | `index repair` | calibration after repair | meta.sqlite changed "
            "by check |", "|---|---|---|---|---|---|"]
    kinds = {"re-embedded": "images re-embedded", "pooled": "pooled vectors taken from the bank", "dropped":
             "images dropped", "deleted": "stray files deleted", "removed": "unknown ids removed"}
    for name, damage in cases.items():
        copy = work / f"damaged-{len(rows)}"
        shutil.copytree(index, copy)
        damage(copy)
        before = (copy / Engine.DB).read_bytes()

        def attempt(action):
            try:
                with Engine.open(copy) as engine:
                    return action(engine)
            except SimsearchError as exc:
                return f"refused, exit {exit_code(exc)} ({type(exc).__name__})"
        def checked(engine):
            report = engine.check()
            problem = report["problems"][0].replace(str(copy), "<index>") if report["problems"] else ""
            return "consistent, exit 0" if report["ok"] else f"exit 1: {problem[:110]}"

        def repaired(engine):
            result = engine.repair()
            done = [f"{a.split(' bank')[0]} bank rebuilt" for a in result["actions"] if " unusable (" in a]
            for word, label in kinds.items():
                n = sum(a.split(" ")[0] == word or a.startswith(word) for a in result["actions"])
                done += [f"{n} {label}"] if n else []
            return ("consistent after: " if result["after"]["ok"] else "still inconsistent: ") + (
                ", ".join(done) or "nothing to do")
        check = attempt(checked)
        changed = "yes" if (copy / Engine.DB).read_bytes() != before else "no"
        query = attempt(lambda e: f"answered (score {e.query(probe).score:.2f})")
        repair = attempt(repaired)
        calibration = "-" if repair.startswith("refused") else attempt(
            lambda e: "fresh" if e.current_calibration()[0] else "stale")
        rows.append(f"| {name} | {check} | {query} | {repair} | {calibration} | {changed} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="simsearch-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    from simsearch.engine import Engine
    index = work / "index"
    start = time.perf_counter()
    with Engine.create(index) as engine:
        engine.add([str(p) for p in piped_train()], holdout=0.25)
        engine.calibrate()
    print(f"<!-- {PIPED.name} index built in {time.perf_counter() - start:.0f} s -->")
    print("\n".join(input_table(work, index)))
    print()
    print("\n".join(damage_cases(work, index)))


if __name__ == "__main__":
    main()
