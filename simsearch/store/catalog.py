"""The index's SQLite catalog (SQLAlchemy Core): what every vector id means.

`meta.sqlite` is the source of truth for an index: its configuration and fingerprint, the bank
generation, the images (reference or calibration), their tiles, one row per FAISS vector id
(image, tile, grid cell, position) and the calibrations. The schema is created and upgraded by
the alembic scripts in `migrations/` when the catalog is opened; a database from a newer
simsearch is refused rather than guessed at.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from sqlalchemy import (Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, create_engine,
                        delete, event, func, insert, or_, select, update)
from sqlalchemy.engine import Connection, Engine

from ..config import IndexConfig
from ..errors import CatalogError

metadata = MetaData()

index_config = Table(
    "index_config", metadata,
    Column("id", Integer, primary_key=True),  # always 1: one configuration per index
    Column("config_json", Text, nullable=False),
    Column("fingerprint", String(32), nullable=False),
    Column("generation", Integer, nullable=False, default=0),
    Column("next_vector_id", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("simsearch_version", String(32), nullable=False),
)

images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("added_at", Float, nullable=False),
    Column("role", String(16), nullable=False),  # "reference" (in the bank) or "calibration" (held out)
    Column("n_vectors", Integer, nullable=False, default=0),
)

tiles = Table(
    "tiles", metadata,
    Column("id", Integer, primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False, index=True),
    # Box in original-image pixels.
    Column("x", Integer, nullable=False),
    Column("y", Integer, nullable=False),
    Column("w", Integer, nullable=False),
    Column("h", Integer, nullable=False),
)

vectors = Table(
    "vectors", metadata,
    Column("id", Integer, primary_key=True),  # the FAISS id
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("tile_id", Integer, ForeignKey("tiles.id", ondelete="CASCADE"), nullable=False),
    Column("row", Integer, nullable=False),  # grid cell in the image's patch grid
    Column("col", Integer, nullable=False),
    Column("x", Integer, nullable=False),  # cell's top-left corner in original-image pixels
    Column("y", Integer, nullable=False),
)

calibrations = Table(
    "calibrations", metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("generation", Integer, nullable=False),  # bank generation it was measured on
    Column("target_fpr", Float, nullable=False),
    Column("image_threshold", Float, nullable=False),
    Column("pixel_threshold", Float, nullable=False),
    Column("min_region_area", Integer, nullable=False),
    Column("f1_threshold", Float, nullable=True),
    Column("n_good", Integer, nullable=False),
    Column("n_defect", Integer, nullable=False),
    Column("method", Text, nullable=False),  # how it was obtained, in words
    Column("details_json", Text, nullable=False),
)

Index("ix_images_role", images.c.role)


def _sqlite_pragmas(dbapi_connection, _record, wal: bool = True) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL: readers do not block the writer. A bundle keeps a rollback journal instead: every commit then
    # lands in meta.sqlite itself, so the file its manifest hashes is the whole catalog.
    cursor.execute("PRAGMA journal_mode=WAL" if wal else "PRAGMA journal_mode=DELETE")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema this code knows; refuse a newer one."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic import command

    from .. import migrations

    script_location = str(Path(migrations.__file__).parent)
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    script = ScriptDirectory.from_config(cfg)
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise CatalogError(f"the index database has schema revision {current}, newer than this simsearch knows "
                          f"(head {script.get_current_head()}); upgrade simsearch to open it")
    if current != script.get_current_head():
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


class Catalog:
    def __init__(self, path: str | Path, wal: bool = True):
        self.path = Path(path)
        self.engine = create_engine(f"sqlite:///{self.path}", future=True)
        event.listen(self.engine, "connect", lambda conn, record: _sqlite_pragmas(conn, record, wal))
        try:
            migrate(self.engine)
        except CatalogError:
            self.engine.dispose()
            raise
        except Exception as exc:  # a damaged file surfaces here as a DBAPI error
            self.engine.dispose()
            raise CatalogError(f"{self.path}: not a usable simsearch database ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- configuration ------------------------------------------------------------------------
    def read_config(self) -> tuple[IndexConfig, dict] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(index_config)).mappings().first()
        if row is None:
            return None
        return IndexConfig.from_json(row["config_json"]), dict(row)

    def write_config(self, config: IndexConfig, version: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(index_config).values(
                id=1, config_json=config.to_json(), fingerprint=config.fingerprint, generation=0,
                next_vector_id=0, created_at=time.time(), simsearch_version=version))

    def state(self, conn: Connection | None = None) -> dict:
        def run(c: Connection) -> dict:
            return dict(c.execute(select(index_config.c.generation, index_config.c.next_vector_id)).mappings().one())
        if conn is not None:
            return run(conn)
        with self.engine.connect() as c:
            return run(c)

    # -- images -------------------------------------------------------------------------------
    def known_hashes(self, hashes: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(hashes), 500):
                chunk = hashes[start:start + 500]
                for row in conn.execute(select(images).where(images.c.sha256.in_(chunk))).mappings():
                    out[row["sha256"]] = dict(row)
        return out

    def images(self, role: str | None = None) -> list[dict]:
        stmt = select(images).order_by(images.c.id)
        if role:
            stmt = stmt.where(images.c.role == role)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def find_images(self, refs: list[str]) -> tuple[list[dict], list[str]]:
        """Images matching each ref (absolute path, as-stored path, full sha256 or a prefix of >= 8)."""
        found, missing = {}, []
        with self.engine.connect() as conn:
            for ref in refs:
                conds = [images.c.path == ref, images.c.path == os.path.abspath(ref)]
                if len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref.lower()):
                    conds.append(images.c.sha256.like(ref.lower() + "%"))
                rows = conn.execute(select(images).where(or_(*conds))).mappings().all()
                if not rows:
                    missing.append(ref)
                for r in rows:
                    found[r["id"]] = dict(r)
        return list(found.values()), missing

    def counts(self) -> dict:
        with self.engine.connect() as conn:
            by_role = dict(conn.execute(select(images.c.role, func.count()).group_by(images.c.role)).all())
            n_vectors = conn.execute(select(func.count()).select_from(vectors)).scalar_one()
            n_tiles = conn.execute(select(func.count()).select_from(tiles)).scalar_one()
        return {"reference_images": by_role.get("reference", 0), "calibration_images": by_role.get("calibration", 0),
                "tiles": n_tiles, "vectors": n_vectors}

    def insert_calibration_images(self, conn: Connection, rows: list[dict]) -> None:
        if rows:
            conn.execute(insert(images), [dict(r, role="calibration", n_vectors=0) for r in rows])

    def insert_reference(self, conn: Connection, image_row: dict, tile_boxes: list[tuple[int, int, int, int]],
                         cell_rows: np.ndarray) -> int:
        """One reference image with its tiles and vectors.

        cell_rows: (N, 6) int64 columns (faiss id, tile number within the image, row, col, x, y).
        Returns the image id.
        """
        image_id = conn.execute(insert(images).values(**image_row, role="reference",
                                                      n_vectors=len(cell_rows))).inserted_primary_key[0]
        tile_ids = [conn.execute(insert(tiles).values(image_id=image_id, x=x, y=y, w=w, h=h)).inserted_primary_key[0]
                    for (x, y, w, h) in tile_boxes]
        if len(cell_rows):
            conn.exec_driver_sql(
                "INSERT INTO vectors (id, image_id, tile_id, row, col, x, y) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(int(r[0]), image_id, tile_ids[int(r[1])], int(r[2]), int(r[3]), int(r[4]), int(r[5]))
                 for r in cell_rows])
        return image_id

    def vector_ids_of(self, conn: Connection, image_ids: list[int]) -> np.ndarray:
        rows = conn.execute(select(vectors.c.id).where(vectors.c.image_id.in_(image_ids))).scalars().all()
        return np.asarray(rows, dtype=np.int64)

    def delete_images(self, conn: Connection, image_ids: list[int]) -> None:
        conn.execute(delete(vectors).where(vectors.c.image_id.in_(image_ids)))
        conn.execute(delete(tiles).where(tiles.c.image_id.in_(image_ids)))
        conn.execute(delete(images).where(images.c.id.in_(image_ids)))

    def bump_generation(self, conn: Connection, next_vector_id: int | None = None) -> int:
        values = {"generation": index_config.c.generation + 1}
        if next_vector_id is not None:
            values["next_vector_id"] = next_vector_id
        conn.execute(update(index_config).values(**values))
        return conn.execute(select(index_config.c.generation)).scalar_one()

    def snapshot(self) -> dict:
        """Generation, every vector id and every reference image id, read in one transaction (one state)."""
        with self.engine.connect() as conn, conn.begin():
            state = self.state(conn)
            ids = conn.execute(select(vectors.c.id).order_by(vectors.c.id)).scalars().all()
            refs = conn.execute(select(images.c.id).where(images.c.role == "reference")
                                .order_by(images.c.id)).scalars().all()
        return {**state, "vector_ids": np.asarray(ids, np.int64), "reference_ids": np.asarray(refs, np.int64)}

    def vector_owners(self) -> np.ndarray:
        """(N, 2) int64 [faiss id, image id] of every vector, by id."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(vectors.c.id, vectors.c.image_id).order_by(vectors.c.id)).all()
        return np.asarray(rows, np.int64).reshape(-1, 2)

    def image_cells(self, image_id: int) -> np.ndarray:
        """(N, 3) int64 [faiss id, row, col] of one image's stored vectors."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(vectors.c.id, vectors.c.row, vectors.c.col)
                                .where(vectors.c.image_id == image_id).order_by(vectors.c.id)).all()
        return np.asarray(rows, np.int64).reshape(-1, 3)

    def describe_vectors(self, ids: list[int]) -> dict[int, dict]:
        """FAISS id -> {image (path), sha256, x, y, row, col} for the given ids."""
        ids = sorted({int(i) for i in ids if i >= 0})
        if not ids:
            return {}
        stmt = (select(vectors.c.id, vectors.c.x, vectors.c.y, vectors.c.row, vectors.c.col,
                       images.c.path, images.c.sha256)
                .join(images, images.c.id == vectors.c.image_id).where(vectors.c.id.in_(ids)))
        with self.engine.connect() as conn:
            return {r["id"]: dict(r) for r in conn.execute(stmt).mappings()}

    # -- calibration --------------------------------------------------------------------------
    def add_calibration(self, values: dict) -> int:
        values = dict(values)
        values["details_json"] = json.dumps(values.pop("details", {}), sort_keys=True)
        with self.engine.begin() as conn:
            return conn.execute(insert(calibrations).values(created_at=time.time(), **values)).inserted_primary_key[0]

    def latest_calibration(self) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(calibrations).order_by(calibrations.c.id.desc()).limit(1)).mappings().first()
        if row is None:
            return None
        out = dict(row)
        out["details"] = json.loads(out.pop("details_json"))
        return out
