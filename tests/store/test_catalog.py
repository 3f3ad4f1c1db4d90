"""simsearch.store.catalog: the SQLite catalog, its migrations and its queries."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, select
from sqlalchemy.exc import IntegrityError

from simsearch.config import IndexConfig
from simsearch.store import catalog as catalog_module
from simsearch.errors import CatalogError
from simsearch.store.catalog import Catalog, metadata


@pytest.fixture
def cat(tmp_path):
    c = Catalog(tmp_path / "meta.sqlite")
    yield c
    c.close()


def _revision(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT version_num FROM alembic_version").fetchall()


def _head():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import simsearch.migrations
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(simsearch.migrations.__file__).parent))
    return ScriptDirectory.from_config(cfg).get_current_head()


def _diffs(cat, meta):
    with cat.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, meta)


def test_fresh_catalog_is_migrated_to_head(tmp_path, cat):
    assert _revision(tmp_path / "meta.sqlite") == [(_head(),)]
    with sqlite3.connect(tmp_path / "meta.sqlite") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"alembic_version", "index_config", "images", "tiles", "vectors", "calibrations", "bank_files"}
    assert cat.read_config() is None
    # Opening it again does not migrate twice or fail.
    Catalog(tmp_path / "meta.sqlite").close()
    assert _revision(tmp_path / "meta.sqlite") == [(_head(),)]


def test_migrated_schema_matches_the_sqlalchemy_metadata(cat):
    # Types, nullability, indexes, unique and foreign keys: no difference at all.
    assert _diffs(cat, metadata) == []


def test_schema_comparison_would_notice_a_difference(cat):
    # The comparison above is not vacuous: an extra column in the metadata is reported.
    other = MetaData()
    for table in metadata.tables.values():
        table.to_metadata(other)
    other.tables["images"].append_column(Column("extra", Integer, nullable=True))
    diffs = _diffs(cat, other)
    assert [d[0] for d in diffs] == ["add_column"] and diffs[0][3].name == "extra"


def test_foreign_keys_are_enforced(cat):
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        with cat.engine.begin() as conn:
            conn.execute(catalog_module.tiles.insert().values(image_id=999, x=0, y=0, w=1, h=1))


def test_newer_schema_is_refused(tmp_path, cat):
    cat.close()
    with sqlite3.connect(tmp_path / "meta.sqlite") as db:
        db.execute("UPDATE alembic_version SET version_num = 'ffff'")
    with pytest.raises(CatalogError, match="newer") as info:
        Catalog(tmp_path / "meta.sqlite")
    assert "ffff" in str(info.value)
    assert _revision(tmp_path / "meta.sqlite") == [("ffff",)]  # left as it was


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "meta.sqlite"
    data = np.random.default_rng(0).bytes(8192)
    path.write_bytes(data)
    with pytest.raises(CatalogError, match="not a usable simsearch database") as info:
        Catalog(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == data  # not overwritten


def test_config_round_trip(cat):
    config = IndexConfig(tile_size=128, tile_stride=96, weights_sha256="ab" * 32, k_neighbours=3)
    before = time.time()
    cat.write_config(config, "9.9.9")
    got, row = cat.read_config()
    assert got == config
    assert row["fingerprint"] == config.fingerprint
    assert row["simsearch_version"] == "9.9.9"
    assert row["generation"] == 0 and row["next_vector_id"] == 0
    assert row["created_at"] >= before - 1
    assert cat.state() == {"generation": 0, "next_vector_id": 0}
    with pytest.raises(IntegrityError):  # one configuration per index
        cat.write_config(config, "9.9.9")


def _image_row(n, sha=None):
    return {"path": f"/data/img{n}.png", "sha256": sha or f"{n:064x}", "width": 100, "height": 80, "added_at": 1.0}


def _cells(first_id, n_tiles, rows=2, cols=3):
    # (faiss id, tile number, row, col, x, y)
    out = []
    fid = first_id
    for r in range(rows):
        for c in range(cols):
            out.append((fid, (r * cols + c) % n_tiles, r, c, 8 * c, 8 * r))
            fid += 1
    return np.asarray(out, dtype=np.int64)


def test_insert_describe_and_delete(cat):
    cat.write_config(IndexConfig(), "0")
    boxes = [(0, 0, 64, 64), (32, 0, 64, 64)]
    with cat.engine.begin() as conn:
        a = cat.insert_reference(conn, _image_row(1), boxes, _cells(0, 2))
        b = cat.insert_reference(conn, _image_row(2), boxes[:1], _cells(6, 1))
        empty = cat.insert_reference(conn, _image_row(3), [], np.zeros((0, 6), np.int64))
    assert a != b
    assert cat.counts() == {"reference_images": 3, "calibration_images": 0, "tiles": 3, "vectors": 12}
    refs = cat.images("reference")
    assert [r["id"] for r in refs] == [a, b, empty]
    assert [r["n_vectors"] for r in refs] == [6, 6, 0]
    assert {r["role"] for r in refs} == {"reference"}

    desc = cat.describe_vectors([5, 6, -1, 5, 999])
    assert sorted(desc) == [5, 6]
    assert desc[5] == {"id": 5, "x": 16, "y": 8, "row": 1, "col": 2, "path": "/data/img1.png", "sha256": f"{1:064x}"}
    assert desc[6]["path"] == "/data/img2.png" and (desc[6]["row"], desc[6]["col"]) == (0, 0)
    assert cat.describe_vectors([-1]) == {}

    # cell rows point at the image's own tiles, by their number within the image
    with cat.engine.connect() as conn:
        t = catalog_module.tiles
        v = catalog_module.vectors
        tile_of = dict(conn.execute(select(v.c.id, v.c.tile_id)).all())
        tile_x = dict(conn.execute(select(t.c.id, t.c.x)).all())
        tile_img = dict(conn.execute(select(t.c.id, t.c.image_id)).all())
        assert [tile_x[tile_of[i]] for i in range(6)] == [0, 32, 0, 32, 0, 32]
        assert all(tile_img[tile_of[i]] == a for i in range(6))
        assert all(tile_img[tile_of[i]] == b for i in range(6, 12))
        assert sorted(cat.vector_ids_of(conn, [a]).tolist()) == list(range(6))
        assert sorted(cat.vector_ids_of(conn, [a, b]).tolist()) == list(range(12))
        assert cat.vector_ids_of(conn, [empty]).dtype == np.int64
        assert cat.vector_ids_of(conn, [empty]).size == 0

    with cat.engine.begin() as conn:
        cat.delete_images(conn, [a])
    assert cat.counts() == {"reference_images": 2, "calibration_images": 0, "tiles": 1, "vectors": 6}
    assert cat.describe_vectors(range(12)).keys() == set(range(6, 12))
    with cat.engine.connect() as conn:
        assert cat.vector_ids_of(conn, [a]).size == 0


def test_duplicate_sha256_is_refused(cat):
    with cat.engine.begin() as conn:
        cat.insert_reference(conn, _image_row(1, sha="f" * 64), [], np.zeros((0, 6), np.int64))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        with cat.engine.begin() as conn:
            cat.insert_reference(conn, _image_row(2, sha="f" * 64), [], np.zeros((0, 6), np.int64))
    assert cat.counts()["reference_images"] == 1  # the failed transaction left nothing


def test_calibration_images_hashes_and_find(cat):
    with cat.engine.begin() as conn:
        cat.insert_calibration_images(conn, [_image_row(7, sha="abcdef12" + "0" * 56)])
        cat.insert_calibration_images(conn, [])
        cat.insert_reference(conn, _image_row(8), [], np.zeros((0, 6), np.int64))
    assert [r["path"] for r in cat.images("calibration")] == ["/data/img7.png"]
    assert cat.images("calibration")[0]["n_vectors"] == 0
    assert len(cat.images()) == 2
    known = cat.known_hashes(["abcdef12" + "0" * 56, "nope"])
    assert list(known) == ["abcdef12" + "0" * 56] and known["abcdef12" + "0" * 56]["role"] == "calibration"
    found, missing = cat.find_images(["abcdef12", "/data/img8.png", "abcdef1", "zzzzzzzz"])
    assert sorted(r["path"] for r in found) == ["/data/img7.png", "/data/img8.png"]
    assert missing == ["abcdef1", "zzzzzzzz"]


def test_bump_generation(cat):
    cat.write_config(IndexConfig(), "0")
    with cat.engine.begin() as conn:
        assert cat.bump_generation(conn) == 1
        assert cat.bump_generation(conn, next_vector_id=500) == 2
        assert cat.state(conn) == {"generation": 2, "next_vector_id": 500}
    with cat.engine.begin() as conn:
        assert cat.bump_generation(conn) == 3
    assert cat.state() == {"generation": 3, "next_vector_id": 500}
    assert cat.read_config()[1]["generation"] == 3


def test_calibration_round_trip(cat):
    assert cat.latest_calibration() is None
    values = {"generation": 4, "target_fpr": 0.01, "image_threshold": 1.5, "pixel_threshold": 2.25,
              "min_region_area": 30, "f1_threshold": None, "n_good": 40, "n_defect": 0,
              "method": "2nd largest of 199", "details": {"scores": [1.0, 2.0], "k": 2}}
    with cat.begin() as conn:
        first = cat.insert_calibration(conn, values)
    assert values["details"] == {"scores": [1.0, 2.0], "k": 2}  # the caller's dict is not consumed
    with cat.begin() as conn:
        second = cat.insert_calibration(conn, dict(values, image_threshold=3.0, f1_threshold=2.5, details={}))
    assert second > first
    latest = cat.latest_calibration()
    assert latest["id"] == second
    assert latest["image_threshold"] == 3.0 and latest["f1_threshold"] == 2.5 and latest["details"] == {}
    assert "details_json" not in latest
    with cat.engine.begin() as conn:
        conn.execute(catalog_module.calibrations.delete().where(catalog_module.calibrations.c.id == second))
    latest = cat.latest_calibration()
    for key in ("generation", "target_fpr", "image_threshold", "pixel_threshold", "min_region_area",
                "f1_threshold", "n_good", "n_defect", "method", "details"):
        assert latest[key] == values[key], key
    assert latest["created_at"] > 0
