"""The engine's pieces on a tiny deterministic embedder (tests/fakes.py): no real backbone, no datasets.

Includes the regression tests of the races and holes the one-class engine hid (each failed before its fix).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fakes import TinyEmbedder, texture, tiny_config, write_images
from simsearch import errors
from simsearch.engine import Engine
from simsearch.store import bankfiles


@pytest.fixture
def tiny(tmp_path):
    """An index of 8 good images (2 held out) built with the tiny embedder."""
    embedder = TinyEmbedder()
    goods = write_images(tmp_path / "good", range(8))
    engine = Engine.create(tmp_path / "index", embedder=embedder)
    engine.add(goods, holdout=0.25)
    yield engine, embedder, tmp_path
    engine.close()


def reopen(directory, embedder) -> Engine:
    engine = Engine.open(directory)
    engine.use_embedder(embedder)
    return engine


# -- the error table ----------------------------------------------------------------------------------------
def test_every_error_class_has_an_exit_code_and_a_status_from_the_table():
    assert errors.exit_code(errors.BadInput("x")) == 1 and errors.http_status(errors.BadInput("x")) == 422
    assert errors.http_status(errors.ImageTooLarge("x")) == 413
    assert errors.http_status(errors.ImageError("x")) == 422
    assert errors.exit_code(errors.IndexDamaged("x")) == 3 and errors.http_status(errors.CatalogError("x")) == 503
    assert errors.exit_code(errors.IndexBusy("x")) == 4 and errors.http_status(errors.IndexBusy("x")) == 409
    assert errors.http_status(errors.HeadError("x")) == 422  # a damaged head file given by the user
    assert errors.http_status(errors.UnknownIndex("x")) == 404
    assert errors.http_status(errors.RequestRefused(401, "x")) == 401
    # the same message under another class gives another answer: statuses never come from the text
    assert errors.http_status(errors.IndexDamaged("run `simsearch index repair`")) != errors.http_status(
        errors.IndexNotReady("run `simsearch index repair`"))
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.SimsearchError):
            assert errors.exit_code(cls("m")) in (1, 3, 4) if cls is not errors.RequestRefused else True
    assert issubclass(errors.BadInput, ValueError)  # argument checks stay ValueErrors for Python callers


def test_config_parts_keep_old_fingerprints_and_search_fields_out_of_them():
    from simsearch.config import EMBEDDER_FIELDS, SEARCH_FIELDS, IndexConfig
    # the values the one-part configuration gave (simsearch before the split): stored indexes still open
    assert IndexConfig().fingerprint == "3d2e05c11d5ba765"
    assert IndexConfig(short_side=None, image_top_k=1).fingerprint == "2dda267d8c00afdc"
    assert not set(EMBEDDER_FIELDS) & set(SEARCH_FIELDS)
    assert set(IndexConfig().embedder_fields()) <= set(EMBEDDER_FIELDS)
    config = IndexConfig(tile_size=128, tile_stride=96, k_neighbours=3)
    assert config.embedder.tile_size == 128 and config.search.k_neighbours == 3
    assert IndexConfig.from_json(config.to_json()) == config


# -- the pieces through the facade ------------------------------------------------------------------------
def test_tiny_index_answers_queries_calibrates_checks_and_repairs(tiny):
    engine, embedder, tmp = tiny
    cal = engine.calibrate()
    assert cal.n_good == 2 and cal.generation == engine.generation
    good = engine.query(texture(100))
    bad = engine.query(texture(101, defect=True))
    assert bad.score > good.score and bad.regions and bad.regions[0].nearest is not None
    assert good.generation == bad.generation == engine.generation
    ref = engine.images("reference")[0]["path"]
    assert engine.query(ref).score == pytest.approx(0.0, abs=1e-5)  # a bank image is its own neighbour
    assert engine.search(ref, k=1)[0]["image"] == ref
    assert engine.check()["ok"]
    removed = engine.remove([ref])
    assert removed["vectors_removed"] > 0 and engine.check()["ok"]
    cal, warning = engine.current_calibration()  # the bank changed: measured again in the same commit
    assert cal["generation"] == engine.generation and warning is None and removed["calibration"] is None
    engine.remove([engine.images("reference")[0]["path"]], recalibrate=False)
    assert engine.current_calibration()[0] is None  # a remove not recalibrated: stale (scores can rise)


def test_bank_views_are_immutable_and_a_failed_write_leaves_the_committed_view(tiny, monkeypatch):
    engine, embedder, tmp = tiny
    view = engine.banks.view()
    n = view.patches.ntotal
    more = write_images(tmp / "more", range(20, 22))

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(bankfiles, "write_generation", broken)
    with pytest.raises(OSError):
        engine.add(more)
    assert view.patches.ntotal == n and engine.banks.view().patches.ntotal == n
    assert engine.check()["ok"]


# -- the seven defects --------------------------------------------------------------------------------------
def test_1_calibration_records_the_generation_it_scored_not_a_later_one(tiny):
    engine, embedder, tmp = tiny
    other = reopen(tmp / "index", embedder)
    extra = write_images(tmp / "extra", [40])
    scored_on = engine.generation
    moved = []

    def writer_commits_meanwhile(stage, done, total):
        if done == 1 and not moved:  # scoring has begun: another writer commits a new generation
            moved.append(other.add(extra).generation)

    cal = engine.calibrate(progress=writer_commits_meanwhile)
    other.close()
    assert moved and moved[0] == scored_on + 1
    assert cal.generation == scored_on
    fresh, warning = engine.current_calibration()
    assert fresh is None and "generation" in warning  # honest: measured on the older bank


def test_2_a_query_names_the_generation_it_scored(tiny):
    engine, embedder, tmp = tiny
    other = reopen(tmp / "index", engine.embedder)
    probe = write_images(tmp / "probe", [50])[0]
    before = engine.generation
    engine.banks.view()  # loaded, as a busy server's reader would have it

    def add_the_probe_itself():
        embedder.on_embed = None
        other.add([probe])  # now the bank holds the probe: scored against it, the probe scores 0
    embedder.on_embed = add_the_probe_itself
    result = engine.query(probe)
    other.close()
    if result.generation == before:
        assert result.score > 1e-3  # scored against the bank without the probe
    else:
        assert result.generation == before + 1 and result.score == pytest.approx(0.0, abs=1e-5)


def test_3_repair_reports_and_deletes_stray_files(tiny):
    engine, embedder, tmp = tiny
    stray = tmp / "index" / "patches.g999999.faiss.tmp"
    stray.write_bytes(b"partial")
    result = engine.repair()
    assert result["before"]["stray_files"] == [stray.name]
    assert not stray.exists() and result["after"]["ok"]


def test_4_check_reads_again_when_a_writer_replaces_the_generation_mid_check(tiny, monkeypatch):
    engine, embedder, tmp = tiny
    other = reopen(tmp / "index", embedder)
    extra = write_images(tmp / "extra", [60])
    real_load = bankfiles.load_bank
    calls, done = [], []

    def writer_commits_first(directory, bank, generation, record):
        if not done:  # between check's catalog snapshot and its file reads, a writer moves on
            done.append(True)
            other.add(extra)
        calls.append(generation)
        return real_load(directory, bank, generation, record)
    monkeypatch.setattr(bankfiles, "load_bank", writer_commits_first)
    before = engine.generation
    report = engine.check()
    other.close()
    assert report["ok"], report["problems"]
    assert calls[0] == before and report["generation"] == calls[-1] == before + 1


def test_5_readers_never_see_a_writers_uncommitted_vectors(tiny, monkeypatch):
    engine, embedder, tmp = tiny
    committed = engine.bank.ntotal
    seen = []
    real_write = bankfiles.write_generation

    def reader_looks_before_the_commit(directory, generation, banks, **kw):
        seen.append(engine.bank.ntotal)  # a query thread sharing this Engine, inside the write
        return real_write(directory, generation, banks, **kw)
    monkeypatch.setattr(bankfiles, "write_generation", reader_looks_before_the_commit)
    report = engine.add(write_images(tmp / "more", [70, 71]))
    assert seen == [committed]
    assert engine.bank.ntotal == committed + report.vectors_added


def test_6_calibrating_on_an_empty_folder_is_one_clear_line(tiny, tmp_path):
    engine, embedder, tmp = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(errors.BadInput, match="no images in"):
        engine.calibrate([str(empty)])
    proc = subprocess.run([sys.executable, "-m", "simsearch", "calibrate", str(empty), "--index",
                           str(tmp / "index")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no images in" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_7_thumbnail_cache_is_bounded_by_bytes(tmp_path):
    import cv2
    pytest.importorskip("fastapi")
    from simsearch.server.indexes import PixelCache
    paths = []
    for i in range(6):
        path = tmp_path / f"big{i}.png"
        cv2.imwrite(str(path), np.full((200, 200, 3), i * 10, np.uint8))
        paths.append(path)
    cache = PixelCache(max_bytes=3 * 200 * 200 * 3)  # room for three decoded images
    import hashlib
    for path in paths:
        cache.get(str(path), hashlib.sha256(path.read_bytes()).hexdigest())
        assert cache.bytes <= cache.max_bytes
    assert cache.bytes == 3 * 200 * 200 * 3
    small = PixelCache(max_bytes=10)  # an image over the whole budget is served, not kept
    assert small.get(str(paths[0]), hashlib.sha256(paths[0].read_bytes()).hexdigest()).shape == (200, 200, 3)
    assert small.bytes == 0


def test_7_a_served_writer_closes_its_engine_when_the_model_cannot_be_attached(tiny, monkeypatch):
    pytest.importorskip("fastapi")
    from simsearch.server.indexes import Models, ServedIndex
    engine, embedder, tmp = tiny
    models = Models()
    models._by_fingerprint[engine.config.fingerprint] = embedder  # the reader's model, loaded
    served = ServedIndex("tiny", tmp / "index", models)
    served.reader()
    closed = []
    real_close = Engine.close
    monkeypatch.setattr(Engine, "close", lambda self: (closed.append(self), real_close(self)))

    def refuse(engine):
        raise errors.EmbedderMismatch("another model")
    monkeypatch.setattr(models, "attach", refuse)
    with pytest.raises(errors.EmbedderMismatch):
        with served.writer():
            pass
    assert len(closed) == 1  # the writer's Engine, not leaked


# -- scores after adds and removals ---------------------------------------------------------------------
def test_removing_and_adding_images_again_gives_the_same_scores_back(tmp_path):
    """The typical spread was a median over vectors sampled in id order: re-added images got new ids, a
    fixed score moved (42.4262 -> 42.4006). Picked by content, the same bank scores the same."""
    from simsearch.store.vectors import VectorIndex
    embedder = TinyEmbedder()
    goods = write_images(tmp_path / "good", range(12))
    queries = [texture(200 + i, defect=i % 2 == 1) for i in range(6)]
    with Engine.create(tmp_path / "index", embedder=embedder) as engine:
        engine.add(goods)
        assert engine.bank.ntotal > 200  # more than the sample below: the sample decides
        real = VectorIndex.typical_spread
        try:  # a sample smaller than this tiny bank, as 4000 is for a real one
            VectorIndex.typical_spread = lambda self, neighbours=8, sample=200: real(self, neighbours, sample)
            before = [engine.query(q).score for q in queries]
            engine.remove(goods[2:4])
            engine.add(goods[2:4])
            after = [engine.query(q).score for q in queries]
        finally:
            VectorIndex.typical_spread = real
    assert after == before


def test_adding_good_images_never_raises_a_plain_nearest_distance(tmp_path):
    """What an add promises: each patch's distance to its nearest good patch can only stay or fall, so with
    the sparse-bank discount off (sparse_discount 0) no image score rises. (With it on, the discount follows
    the bank's density and a score can move either way: README, "Adding never removes".)"""
    embedder = TinyEmbedder()
    queries = [texture(300 + i, defect=i % 3 == 0) for i in range(9)]
    with Engine.create(tmp_path / "index", embedder=embedder, sparse_discount=0.0) as engine:
        engine.add(write_images(tmp_path / "first", range(5)))
        before = np.array([engine.query(q).score for q in queries])
        for batch in (range(5, 9), range(9, 20)):
            engine.add(write_images(tmp_path / f"more{batch.start}", batch))
            after = np.array([engine.query(q).score for q in queries])
            assert (after <= before).all(), after - before
            before = after


def test_calibrating_on_two_copies_of_one_image_scores_it_once(tiny, tmp_path):
    import shutil
    engine, _embedder, _tmp = tiny
    good = write_images(tmp_path / "cal", range(30, 33))
    shutil.copyfile(good[0], tmp_path / "cal" / "the same image.png")
    cal = engine.calibrate([str(tmp_path / "cal")])
    assert cal.n_good == 3
    assert engine.calibrate([str(tmp_path / "cal")]).n_good == 3  # again: the stored rows are not duplicated
