"""The spread table (simsearch/store/spreads.py): computed once by the writer and saved with its generation, so
no query waits for it; small adds extend it, large changes recompute it; a damaged table is refused and repaired
like a bank file."""
from __future__ import annotations

import numpy as np
import pytest

from fakes import TinyEmbedder, texture, write_images
from simsearch import errors
from simsearch.engine import Engine
from simsearch.store import bankfiles
from simsearch.store.spreads import STALE_FRACTION, SpreadTable, next_table
from simsearch.store.vectors import VectorIndex

DIM = 8


def bank_of(n: int, seed: int = 0, start: int = 0) -> tuple[VectorIndex, np.ndarray]:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return VectorIndex.from_vectors("flat", vectors, np.arange(start, start + n) * 2 + 1), vectors


def test_a_small_add_keeps_the_old_spreads_and_measures_only_the_new_ones():
    bank, _ = bank_of(1000)
    table = SpreadTable.computed(bank)
    assert len(table) == 1000 and table.full_count == 1000 and table.changed == 0
    assert next_table(table, bank) is table  # same ids: nothing to do
    more = np.random.default_rng(1).normal(size=(50, DIM)).astype(np.float32)
    new_ids = np.arange(5000, 5050)
    bank.add(more, new_ids)
    grown = next_table(table, bank)
    assert grown.matches(bank) and grown.full_count == 1000 and grown.changed == 50
    old, found = grown.lookup(table.ids)
    assert found.all() and np.array_equal(old, table.values.astype(np.float32))  # kept as they were
    new, found = grown.lookup(new_ids)
    assert found.all() and np.allclose(new, bank.spread(new_ids), rtol=2e-3)  # the bank's own search (float16)


def test_removals_drop_their_spreads_and_too_many_changes_recompute_in_full():
    bank, _ = bank_of(1000)
    table = SpreadTable.computed(bank)
    bank.remove(table.ids[:10])
    shrunk = next_table(table, bank)
    assert shrunk.matches(bank) and shrunk.changed == 10
    extra = int(STALE_FRACTION * 1000)  # with the 10 removed, past the stale fraction
    bank.add(np.random.default_rng(2).normal(size=(extra, DIM)).astype(np.float32), np.arange(9000, 9000 + extra))
    full = next_table(shrunk, bank)
    assert full.matches(bank) and full.full_count == bank.ntotal and full.changed == 0
    assert np.median(full.values.astype(np.float32)) == pytest.approx(full.typical)


def test_a_table_round_trips_and_a_foreign_file_is_refused(tmp_path):
    bank, _ = bank_of(300)
    table = SpreadTable.computed(bank)
    path = tmp_path / "spreads.g000001.safetensors"
    table.save(path)
    again = SpreadTable.load(path)
    assert np.array_equal(again.ids, table.ids) and np.array_equal(again.values, table.values)
    assert (again.full_count, again.changed, again.typical) == (table.full_count, table.changed, table.typical)
    path.write_bytes(b"not a table")
    with pytest.raises(ValueError, match="not a readable spread table"):
        SpreadTable.load(path)
    with pytest.raises(ValueError, match="sorted and unique"):
        SpreadTable(np.array([3, 1], np.int64), np.ones(2, np.float16), 2)
    with pytest.raises(ValueError, match="int64 ids"):
        SpreadTable(np.array([1, 3], np.int32), np.ones(2, np.float16), 2)


@pytest.fixture
def two_stage_index(tmp_path):
    """An index of 8 tiny-embedder images searched in two stages at any size, calibrated."""
    embedder = TinyEmbedder()
    engine = Engine.create(tmp_path / "index", embedder=embedder, two_stage="on")
    engine.add(write_images(tmp_path / "good", range(8)), holdout=0.25)
    engine.calibrate()
    engine.close()
    return tmp_path / "index", embedder


def opened(directory, embedder) -> Engine:
    engine = Engine.open(directory)
    engine.use_embedder(embedder)
    return engine


def test_the_writer_saves_the_table_and_a_reopened_index_never_computes_it(two_stage_index, monkeypatch, tmp_path):
    directory, embedder = two_stage_index
    probe = texture(100, defect=True)
    with opened(directory, embedder) as engine:
        before = engine.query(probe).score
        generation = engine.generation
        assert engine.check()["bank_files_recorded"] == ["images", "patches", "spreads"]
    assert bankfiles.spreads_path(directory, generation).is_file()

    def refuse(_bank):
        raise AssertionError("a reader computed the spread table")
    monkeypatch.setattr(SpreadTable, "computed", classmethod(lambda cls, bank: refuse(bank)))
    with opened(directory, embedder) as engine:
        assert engine.query(probe).score == pytest.approx(before, rel=1e-6)
        engine.add(write_images(tmp_path / "more", [40]))  # one image of 9: small enough to extend the table
        view = engine.banks.view()
        assert view.spreads is not None and view.spreads.matches(view.patches) and view.spreads.changed > 0
        assert engine.check()["ok"]
        assert not bankfiles.spreads_path(directory, generation).exists()  # the old generation's went with it


def test_a_damaged_table_is_refused_by_queries_found_by_check_and_rebuilt_by_repair(two_stage_index):
    directory, embedder = two_stage_index
    probe = texture(100, defect=True)
    with opened(directory, embedder) as engine:
        before = engine.query(probe)
        generation, threshold = engine.generation, engine.latest_calibration()["image_threshold"]
    path = bankfiles.spreads_path(directory, generation)
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # zero the last spreads: same size, only the checksum can tell
    path.write_bytes(bytes(data))
    with opened(directory, embedder) as engine:
        with pytest.raises(errors.IndexDamaged, match="damaged or replaced"):
            engine.query(probe)
        report = engine.check()
        assert not report["ok"] and any(path.name in p for p in report["problems"]), report
        result = engine.repair()
        assert result["after"]["ok"], result
        after = engine.query(probe)
        assert after.score == pytest.approx(before.score, rel=1e-6) and after.is_anomalous == before.is_anomalous
        # the patch bank came out as it was, so the calibration still holds
        assert engine.latest_calibration()["image_threshold"] == threshold and after.is_anomalous is not None


def test_an_index_searched_in_one_stage_writes_no_table(tmp_path):
    with Engine.create(tmp_path / "index", embedder=TinyEmbedder(), two_stage="off") as engine:
        engine.add(write_images(tmp_path / "good", range(3)))
        assert engine.banks.view().spreads is None
        assert not list((tmp_path / "index").glob("spreads.*"))



def test_the_two_level_cells_of_a_large_bank_give_the_spreads_one_k_means_gives():
    """Beyond FLAT_CELLS cells `bank_spreads` finds its cells in two levels (so a 10M bank costs 10 x a 1M one, not
    30 x); forced here on a small bank: still upper bounds of the exact spreads, and as close as one k-means."""
    from simsearch.store.spreads import bank_spreads, two_level_cells
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, DIM)).astype(np.float32) * 4
    vectors = (centres[rng.integers(0, 40, 4000)] + rng.normal(size=(4000, DIM))).astype(np.float32)
    cell_of, cell_centres = two_level_cells(vectors, 50)
    assert 35 <= len(cell_centres) <= 65 and cell_of.min() == 0 and cell_of.max() < len(cell_centres)
    exact = VectorIndex.from_vectors("flat", vectors).spread(np.arange(len(vectors)))
    # the same cell size both ways (63 cells of about 64), 3 of them searched per vector
    one, two = bank_spreads(vectors, probe=2), bank_spreads(vectors, probe=2, flat_cells=8, cell_vectors=64)
    assert (two >= exact - 1e-4).all() and (one >= exact - 1e-4).all()
    assert np.median(two / exact) < 1.05 and np.mean(two / exact) < np.mean(one / exact) + 0.01
    assert np.mean(two / exact) > 1.0001  # not every neighbour found: the cells did limit the search


def test_a_bundle_seals_the_table_with_its_generation(two_stage_index):
    """A line PC gets the table with the bundle (no first query waiting to compute it), and a changed table is
    refused there as any bundle file is."""
    from simsearch import bundle
    directory, embedder = two_stage_index
    with opened(directory, embedder) as engine:
        generation, fingerprint = engine.generation, engine.config.fingerprint
    manifest = bundle.seal(directory, fingerprint, generation)
    name = bankfiles.spreads_path(directory, generation).name
    assert name in manifest["files"] and bundle.verify(directory) == manifest
    path = directory / name
    path.write_bytes(path.read_bytes()[:-2] + b"\x00\x00")
    with pytest.raises(bundle.BundleError, match=name):
        bundle.verify(directory)


def test_repair_of_another_file_keeps_the_sound_table(two_stage_index, monkeypatch):
    directory, embedder = two_stage_index
    with opened(directory, embedder) as engine:
        generation = engine.generation
    images = bankfiles.bank_path(directory, "images", generation)
    images.write_bytes(images.read_bytes()[:-16])  # the pooled-vector bank cut short
    monkeypatch.setattr(SpreadTable, "computed",
                        classmethod(lambda cls, bank: pytest.fail("repair recomputed a sound spread table")))
    with opened(directory, embedder) as engine:
        result = engine.repair()
        assert result["after"]["ok"], result
        assert engine.banks.view().spreads.matches(engine.banks.view().patches)
