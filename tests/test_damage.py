"""A damaged index answers no verdict: bank files overwritten or swapped, meta.sqlite damaged or empty. Real
index files on the tiny embedder (tests/fakes.py); `check` changes nothing, every failure is one line."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes import TinyEmbedder, texture, write_images
from simsearch import errors
from simsearch.engine import Engine
from simsearch.store import bankfiles

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path):
    """A calibrated index of 8 good images (2 held out), closed: (its folder, the embedder, a probe image)."""
    embedder = TinyEmbedder()
    with Engine.create(tmp_path / "index", embedder=embedder) as engine:
        engine.add(write_images(tmp_path / "good", range(8)), holdout=0.25)
        engine.calibrate()
    return tmp_path / "index", embedder, texture(100, defect=True)


def opened(directory, embedder) -> Engine:
    engine = Engine.open(directory)
    engine.use_embedder(embedder)
    return engine


def patches_file(directory) -> Path:
    with Engine.open(directory) as engine:
        return bankfiles.bank_path(directory, "patches", engine.generation)


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "simsearch", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- bank files --------------------------------------------------------------------------------------------
def test_random_bytes_in_a_bank_file_are_found_by_check_refused_by_queries_and_repaired(tiny):
    directory, embedder, probe = tiny
    with opened(directory, embedder) as engine:
        score = engine.query(probe).score
    bank = patches_file(directory)
    data = bytearray(bank.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = np.random.default_rng(0).bytes(len(data[middle:middle + 4096]))
    bank.write_bytes(bytes(data))  # same size: only the checksum can tell
    with opened(directory, embedder) as engine:
        report = engine.check()
        assert not report["ok"] and any("sha256" in p and bank.name in p for p in report["problems"]), report
        with pytest.raises(errors.IndexDamaged, match="damaged or replaced"):
            engine.query(probe)
    proc = cli("index", "check", "--index", str(directory))
    assert proc.returncode == 1 and "sha256" in proc.stdout
    with opened(directory, embedder) as engine:
        result = engine.repair()
        assert result["after"]["ok"], result
        assert engine.query(probe).score == pytest.approx(score, rel=1e-6)


def test_another_indexs_bank_file_of_the_same_dimension_is_refused(tiny, tmp_path):
    directory, embedder, probe = tiny
    other = tmp_path / "other"
    with Engine.create(other, embedder=embedder) as engine:
        engine.add(write_images(tmp_path / "other-good", range(20, 23)))
    shutil.copyfile(patches_file(other), patches_file(directory))
    with opened(directory, embedder) as engine:
        with pytest.raises(errors.IndexDamaged, match="damaged or replaced"):
            engine.query(probe)
        assert not engine.check()["ok"]
    proc = cli("query", str(write_images(tmp_path / "q", [101])[0]), "--index", str(directory))
    assert proc.returncode == 3 and "damaged or replaced" in one_line(proc)


def test_an_index_from_before_the_records_opens_and_records_them_at_its_next_write(tiny, tmp_path):
    directory, embedder, probe = tiny
    with sqlite3.connect(directory / Engine.DB) as db:  # as simsearch before revision 0002 left it
        db.execute("DROP TABLE bank_files")
        db.execute("UPDATE alembic_version SET version_num = '0001'")
    db.close()
    with opened(directory, embedder) as engine:
        assert engine.query(probe).score > 0
        report = engine.check()
        assert report["ok"] and report["bank_files_recorded"] == [] and "older simsearch" in report["notes"][0]
        engine.add(write_images(tmp_path / "more", [40]))
        report = engine.check()
        assert report["ok"] and report["bank_files_recorded"] == ["images", "patches"] and not report["notes"]


# -- meta.sqlite ------------------------------------------------------------------------------------------
def overwrite_root_page(db_path: Path, table: str) -> None:
    with sqlite3.connect(db_path) as db:
        page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(db_path, "r+b") as fh:
        fh.seek((page - 1) * size)
        fh.write(np.random.default_rng(1).bytes(size))


def test_a_damaged_page_of_the_catalog_is_one_line_everywhere_and_check_changes_nothing(tiny):
    directory, embedder, probe = tiny
    db = directory / Engine.DB
    overwrite_root_page(db, "vectors")
    before = db.read_bytes()
    with opened(directory, embedder) as engine:
        for action in (engine.check, engine.repair, lambda: engine.query(probe)):
            with pytest.raises(errors.CatalogError, match="damaged"):
                action()
    proc = cli("index", "check", "--index", str(directory))
    assert proc.returncode == 3 and "catalog is damaged" in one_line(proc)
    proc = cli("index", "repair", "--index", str(directory))
    assert proc.returncode == 3 and "damaged" in one_line(proc)
    assert db.read_bytes() == before


@pytest.mark.parametrize("content", ["empty", "foreign"])
def test_an_empty_or_foreign_meta_sqlite_is_refused_and_left_as_it_was(tiny, content):
    directory, _embedder, _probe = tiny
    db = directory / Engine.DB
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"")
    if content == "foreign":
        db.unlink()
        with sqlite3.connect(db) as other:
            other.execute("CREATE TABLE notes (text TEXT)")
        other.close()
    before = db.read_bytes()
    with pytest.raises(errors.CatalogError, match="not a usable simsearch database"):
        Engine.open(directory)
    for args in (["index", "check"], ["index", "add", str(directory)]):
        proc = cli(*args, "--index", str(directory))
        assert proc.returncode == 3 and "not a usable simsearch database" in one_line(proc), args
    assert db.read_bytes() == before  # no schema was written into it


# -- repair keeps what is intact ------------------------------------------------------------------------
def test_repair_of_a_lost_images_bank_embeds_nothing_keeps_every_image_and_the_calibration(tiny, tmp_path):
    directory, embedder, probe = tiny
    with opened(directory, embedder) as engine:
        hits = engine.search(probe, k=3)
        generation = engine.generation
        moved = engine.images("reference")[0]["path"]
    bankfiles.bank_path(directory, "images", generation).unlink()
    Path(moved).rename(tmp_path / "moved-away.png")  # its vectors are intact: it must stay
    embedded = []
    embedder.on_embed = lambda: embedded.append(1)
    with opened(directory, embedder) as engine:
        result = engine.repair()
        assert result["after"]["ok"], result
        assert embedded == []  # the bank held every vector of every image exactly
        assert engine.info()["reference_images"] == 6
        assert engine.generation == generation + 1
        embedder.on_embed = None
        assert engine.search(probe, k=3) == hits  # the same pooled vectors
        cal, warning = engine.current_calibration()
        assert cal is not None and warning is None and "carried over" in cal["method"]


def test_repair_with_nothing_but_stray_files_keeps_the_generation(tiny):
    directory, embedder, _probe = tiny
    (directory / "patches.g999999.faiss.tmp").write_bytes(b"partial")
    with opened(directory, embedder) as engine:
        generation = engine.generation
        assert engine.repair()["after"]["ok"]
        assert engine.generation == generation and engine.current_calibration()[0] is not None


def test_an_adds_spool_is_inside_the_index_and_a_killed_adds_spool_is_deleted_by_the_next_writer(
        tiny, tmp_path, monkeypatch):
    import simsearch.ingest as ingest

    directory, embedder, _probe = tiny
    stale = directory / ".spool-99999"  # as an add killed with -9 leaves it
    stale.mkdir()
    (stale / "vectors.f32").write_bytes(b"\0" * 1024)
    during = []

    class Watched(ingest.VectorSpool):
        def __init__(self, path, dim):
            super().__init__(path, dim)
            during.append((Path(path).parent, sorted(p.name for p in directory.glob(".spool-*"))))
    monkeypatch.setattr(ingest, "VectorSpool", Watched)
    with opened(directory, embedder) as engine:
        engine.add(write_images(tmp_path / "more", [50]))
    spool = directory / f".spool-{os.getpid()}"
    assert during == [(spool, [spool.name])]  # in the index, and the stale one gone once the lock was held
    assert not list(directory.glob(".spool-*"))
