"""The index's SQLite catalog (SQLAlchemy Core): what every vector id means.

`meta.sqlite` is the source of truth for an index: its configuration and fingerprint, the bank
generation, the size, sha256 and vector count of that generation's FAISS files, the images
(reference or calibration), their tiles, one row per FAISS vector id (image, tile, grid cell,
position) and the calibrations. The schema is created by the alembic scripts in `migrations/` for a
new catalog and upgraded when an older one is opened; a database from a newer simsearch is refused
rather than guessed at.

A damaged file is never written to: an existing file is first looked at without any pragma or write
(an empty file, or one without a simsearch schema, is refused as it is, never given a schema), and any
error SQLite raises later (a damaged page met by a query) becomes one CatalogError naming the file,
never a traceback. `quick_check` reads every page (`simsearch index check` runs it).
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
from sqlalchemy import (Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, create_engine,
                        delete, event, func, insert, or_, select, text, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..config import IndexConfig
from ..errors import CatalogError, IndexBusy

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

bank_files = Table(
    "bank_files", metadata,  # the committed generation's FAISS files, as written (older rows go at commit)
    Column("generation", Integer, primary_key=True),
    Column("bank", String(16), primary_key=True),  # "patches" or "images"
    Column("bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("vectors", Integer, nullable=False),
)

Index("ix_images_role", images.c.role)
SQLITE_HEADER = b"SQLite format 3\x00"
_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: another connection holds it, nothing is damaged


def _sqlite_pragmas(dbapi_connection, _record, wal: bool = True) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL: readers do not block the writer. A bundle keeps a rollback journal instead: every commit then
    # lands in meta.sqlite itself, so the file its manifest hashes is the whole catalog.
    cursor.execute("PRAGMA journal_mode=WAL" if wal else "PRAGMA journal_mode=DELETE")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _reason(exc: BaseException) -> str:
    """One line for an SQLite error: its name and the first line of its message."""
    orig = getattr(exc, "orig", exc)
    name = getattr(orig, "sqlite_errorname", None) or type(orig).__name__
    return f"{name}: {(str(orig).splitlines() or [''])[0][:200]}"


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
    """The catalog at `path`: created (with the newest schema) when no file is there, else opened as it is
    (an older schema upgraded) after a look that writes nothing. `wal`: False for a bundle (a rollback
    journal keeps the whole catalog in meta.sqlite itself)."""

    def __init__(self, path: str | Path, wal: bool = True):
        self.path = Path(path)
        if self.path.exists():
            self._look()
        self.engine = create_engine(f"sqlite:///{self.path}", future=True)
        event.listen(self.engine, "connect", lambda conn, record: _sqlite_pragmas(conn, record, wal))
        try:
            with self._guard():
                migrate(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def _look(self) -> None:
        """Refuse a file that is not a simsearch catalog before anything (a pragma, a migration) writes to it."""
        def refuse(why: str) -> CatalogError:
            return CatalogError(f"{self.path}: not a usable simsearch database ({why}); nothing was changed. "
                                "Restore it from a backup, or build the index again in a new folder")
        with open(self.path, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
        if not header:
            raise refuse("the file is empty")
        if header != SQLITE_HEADER:
            raise refuse("not an SQLite file")
        try:
            with contextlib.closing(sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise refuse(_reason(exc)) from None
        if not {"alembic_version", "index_config"} <= tables:
            raise refuse("no simsearch schema in it")

    @contextlib.contextmanager
    def _guard(self):
        """SQLite's errors as the error tree's: busy as IndexBusy, anything else but a broken constraint (a bug,
        kept as it is) as CatalogError: a damaged page answers nothing but that one line."""
        try:
            yield
        except IntegrityError:
            raise
        except (DBAPIError, sqlite3.Error) as exc:
            orig = getattr(exc, "orig", exc)
            if getattr(orig, "sqlite_errorcode", 0) & 0xFF in _BUSY:
                raise IndexBusy(f"{self.path} is busy ({_reason(exc)}); try again") from None
            raise CatalogError(f"{self.path}: the catalog is damaged or unreadable ({_reason(exc)}); `simsearch "
                               "index repair` cannot rebuild it: restore it from a backup, or build the index "
                               "again in a new folder") from None

    @contextlib.contextmanager
    def connect(self):
        """A connection for reads (errors as CatalogError, see `_guard`)."""
        with self._guard(), self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def begin(self):
        """A write transaction, committed when the block ends (errors as CatalogError, see `_guard`)."""
        with self._guard(), self.engine.begin() as conn:
            yield conn

    def quick_check(self) -> list[str]:
        """SQLite's `PRAGMA quick_check` over every page: [] when sound, else its findings (at most 10)."""
        with self.connect() as conn:
            found = [r[0] for r in conn.execute(text("PRAGMA quick_check(10)"))]
        return [] if found == ["ok"] else found

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- configuration ------------------------------------------------------------------------
    def read_config(self) -> tuple[IndexConfig, dict] | None:
        with self.connect() as conn:
            row = conn.execute(select(index_config)).mappings().first()
        if row is None:
            return None
        return IndexConfig.from_json(row["config_json"]), dict(row)

    def write_config(self, config: IndexConfig, version: str) -> None:
        with self.begin() as conn:
            conn.execute(insert(index_config).values(
                id=1, config_json=config.to_json(), fingerprint=config.fingerprint, generation=0,
                next_vector_id=0, created_at=time.time(), simsearch_version=version))

    def state(self, conn: Connection | None = None) -> dict:
        def run(c: Connection) -> dict:
            return dict(c.execute(select(index_config.c.generation, index_config.c.next_vector_id)).mappings().one())
        if conn is not None:
            return run(conn)
        with self.connect() as c:
            return run(c)

    # -- images -------------------------------------------------------------------------------
    def known_hashes(self, hashes: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        with self.connect() as conn:
            for start in range(0, len(hashes), 500):
                chunk = hashes[start:start + 500]
                for row in conn.execute(select(images).where(images.c.sha256.in_(chunk))).mappings():
                    out[row["sha256"]] = dict(row)
        return out

    @contextlib.contextmanager
    def reading(self, conn: Connection | None = None):
        """`conn` (a writer's transaction, which sees its own uncommitted rows) if given, else a read connection."""
        if conn is not None:
            yield conn
        else:
            with self.connect() as c:
                yield c

    def images(self, role: str | None = None, conn: Connection | None = None) -> list[dict]:
        stmt = select(images).order_by(images.c.id)
        if role:
            stmt = stmt.where(images.c.role == role)
        with self.reading(conn) as c:
            return [dict(r) for r in c.execute(stmt).mappings()]

    def find_images(self, refs: list[str]) -> tuple[list[dict], list[str]]:
        """Images matching each ref (absolute path, as-stored path, full sha256 or a prefix of >= 8)."""
        found, missing = {}, []
        with self.connect() as conn:
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
        with self.connect() as conn:
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

    def make_calibration_images(self, conn: Connection, image_ids: list[int]) -> None:
        """Reference images become calibration images: their vector and tile rows go, their image rows stay."""
        conn.execute(delete(vectors).where(vectors.c.image_id.in_(image_ids)))
        conn.execute(delete(tiles).where(tiles.c.image_id.in_(image_ids)))
        conn.execute(update(images).where(images.c.id.in_(image_ids)).values(role="calibration", n_vectors=0))

    def bump_generation(self, conn: Connection, next_vector_id: int | None = None) -> int:
        values = {"generation": index_config.c.generation + 1}
        if next_vector_id is not None:
            values["next_vector_id"] = next_vector_id
        conn.execute(update(index_config).values(**values))
        return conn.execute(select(index_config.c.generation)).scalar_one()

    def record_bank_files(self, conn: Connection, generation: int, files: dict[str, dict]) -> None:
        """Record the files of `generation` (bank -> {bytes, sha256, vectors}), forgetting older generations'."""
        conn.execute(delete(bank_files))
        conn.execute(insert(bank_files), [dict(record, generation=generation, bank=bank)
                                          for bank, record in files.items()])

    def bank_state(self) -> tuple[int, dict[str, dict]]:
        """(the committed generation, bank -> its recorded {bytes, sha256, vectors}), read together; no records
        for an index written before they were kept."""
        with self.connect() as conn, conn.begin():
            generation = self.state(conn)["generation"]
            return generation, self._bank_files(conn, generation)

    @staticmethod
    def _bank_files(conn: Connection, generation: int) -> dict[str, dict]:
        rows = conn.execute(select(bank_files).where(bank_files.c.generation == generation)).mappings().all()
        return {r["bank"]: {k: r[k] for k in ("bytes", "sha256", "vectors")} for r in rows}

    def carry_calibration(self, conn: Connection, old: int, new: int, why: str, details: dict | None = None) -> None:
        """The latest calibration, if it was made on generation `old`, again for generation `new` (`details`
        merged into its details)."""
        row = conn.execute(select(calibrations).order_by(calibrations.c.id.desc()).limit(1)).mappings().first()
        if row is not None and row["generation"] == old:
            values = {k: v for k, v in row.items() if k != "id"}
            if details:
                values["details_json"] = json.dumps({**json.loads(row["details_json"]), **details}, sort_keys=True)
            conn.execute(insert(calibrations).values(**dict(values, generation=new, created_at=time.time(),
                                                            method=f"{row['method']}; {why}")))

    def snapshot(self) -> dict:
        """Generation, its bank files' records (see `bank_state`), every vector id and every reference image id,
        read in one transaction (one state)."""
        with self.connect() as conn, conn.begin():
            state = self.state(conn)
            files = self._bank_files(conn, state["generation"])
            ids = conn.execute(select(vectors.c.id).order_by(vectors.c.id)).scalars().all()
            refs = conn.execute(select(images.c.id).where(images.c.role == "reference")
                                .order_by(images.c.id)).scalars().all()
        return {**state, "bank_files": files, "vector_ids": np.asarray(ids, np.int64),
                "reference_ids": np.asarray(refs, np.int64)}

    def vector_owners(self, conn: Connection | None = None) -> np.ndarray:
        """(N, 2) int64 [faiss id, image id] of every vector, by id."""
        with self.reading(conn) as c:
            rows = c.execute(select(vectors.c.id, vectors.c.image_id).order_by(vectors.c.id)).all()
        return np.asarray(rows, np.int64).reshape(-1, 2)

    def image_cells(self, image_id: int) -> np.ndarray:
        """(N, 3) int64 [faiss id, row, col] of one image's stored vectors."""
        with self.connect() as conn:
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
        with self.connect() as conn:
            return {r["id"]: dict(r) for r in conn.execute(stmt).mappings()}

    # -- calibration --------------------------------------------------------------------------
    def insert_calibration(self, conn: Connection, values: dict) -> int:
        values = dict(values)
        values["details_json"] = json.dumps(values.pop("details", {}), sort_keys=True)
        return conn.execute(insert(calibrations).values(created_at=time.time(), **values)).inserted_primary_key[0]

    def latest_calibration(self, conn: Connection | None = None) -> dict | None:
        """The newest calibration row (details decoded), read through `conn` inside a writer's transaction."""
        with self.reading(conn) as c:
            row = c.execute(select(calibrations).order_by(calibrations.c.id.desc()).limit(1)).mappings().first()
        if row is None:
            return None
        out = dict(row)
        out["details"] = json.loads(out.pop("details_json"))
        return out
