"""Replays the seven defects of the engine-in-pieces issue against a code tree, with the real backbone on a few
PIPED images, and prints for each whether the tree has it. Run it on an old checkout and on this one:

    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/defects_before_after.py
    .venv/bin/python bench/defects_before_after.py

(tests/test_pieces.py holds the same checks as tests on the tiny embedder; this script is how they were seen
to fail before the fix, where the tiny embedder's seam did not exist yet.)
"""
from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import simsearch
from simsearch.engine import Engine
from simsearch.store import bankfiles

PIPED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "piped" / "PA_BDP01_TL"
TRAIN = sorted((PIPED / "train" / "good").iterdir())
def build(root: Path) -> Path:
    index = root / "index"
    with Engine.create(index, index_kind="flat") as engine:
        engine.add([str(p) for p in TRAIN[:6]], holdout=0.34)
    return index


def defect_1(root):
    index = build(root)
    engine, other = Engine.open(index), Engine.open(index)
    scored_on = engine.catalog.state()["generation"]
    moved = []

    def progress(*args):  # (stage, done, total) now; (done, total, path) before
        done = args[1] if isinstance(args[0], str) else args[0]
        if done == 1 and not moved:  # scoring has begun: another writer commits
            moved.append(other.add([str(TRAIN[10])]).generation)
    cal = engine.calibrate(progress=progress)
    return cal.generation != scored_on  # the defect: stored as measured on the newer bank


def defect_2(root):
    index = build(root)
    engine, other = Engine.open(index), Engine.open(index)
    probe = str(TRAIN[11])
    engine.bank  # loaded
    embedder = engine.embedder
    real = embedder.embed
    before = engine.catalog.state()["generation"]

    def embed(image):
        embedder.embed = real
        other.add([probe])
        return real(image)
    embedder.embed = embed
    result = engine.query(probe)
    scored_with_probe = result.score < 1e-3
    return (result.generation == before) == scored_with_probe  # generation and bank disagree


def defect_3(root):
    index = build(root)
    (index / "patches.g999999.faiss.tmp").write_bytes(b"partial")
    with Engine.open(index) as engine:
        result = engine.repair()
    return result["before"]["stray_files"] == []


def defect_4(root):
    index = build(root)
    engine, other = Engine.open(index), Engine.open(index)
    real, done = bankfiles.load_generation, []

    def load(directory, generation):
        if not done:
            done.append(1)
            other.add([str(TRAIN[12])])
        return real(directory, generation)
    bankfiles.load_generation = load
    try:
        report = engine.check()
    finally:
        bankfiles.load_generation = real
    return not report["ok"]


def defect_5(root):
    index = build(root)
    engine = Engine.open(index)
    committed = engine.bank.ntotal
    real, seen = bankfiles.write_generation, []

    def write(directory, generation, banks):
        seen.append(engine.bank.ntotal)
        return real(directory, generation, banks)
    bankfiles.write_generation = write
    try:
        engine.add([str(TRAIN[13])])
    finally:
        bankfiles.write_generation = real
    return seen != [committed]


def defect_6(root):
    index = build(root)
    empty = root / "empty"
    empty.mkdir()
    tree = Path(simsearch.__file__).resolve().parents[1]  # the same code in the child (-m looks in its cwd first)
    proc = subprocess.run([sys.executable, "-m", "simsearch", "calibrate", str(empty), "--index", str(index)],
                          capture_output=True, text=True, cwd=tree)
    return "Traceback" in proc.stderr


def defect_7(root):
    from simsearch.server import indexes
    bounded_by_bytes = hasattr(indexes, "PixelCache")
    source = inspect.getsource(indexes.ServedIndex.writer)
    leaks = "attach(Engine.open(" in source.replace(" ", "").replace("self.models.", "")
    return (not bounded_by_bytes) or leaks


if __name__ == "__main__":
    print(f"simsearch from {Path(simsearch.__file__).parent}")
    for n in range(1, 8):
        root = Path(tempfile.mkdtemp())
        try:
            has = globals()[f"defect_{n}"](root)
        except Exception as exc:  # noqa: BLE001 - the replay itself failing is reported, not hidden
            has = f"error {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"defect {n}: {'PRESENT' if has is True else 'absent' if has is False else has}", flush=True)
