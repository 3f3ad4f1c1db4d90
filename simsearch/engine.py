"""The one API over every stage: the CLI, the server, the evaluation and Python users all go through `Engine`.

    from simsearch import Engine
    engine = Engine.create("index")              # or Engine.open("index")
    engine.add(["good/"], holdout=0.25)
    engine.calibrate(target_fpr=0.01)
    result = engine.query("part.png")           # or an (H, W, 3) RGB uint8 array
    result.is_anomalous, result.score, result.anomaly_map, result.regions

`Engine` is a thin facade; each job is a small collaborator a newcomer can name:

    IndexFolder  (store/layout.py)   the folder's layout and its writer lock
    Catalog      (store/catalog.py)  the SQLite source of truth
    BankStore    (store/banks.py)    immutable views of a generation for readers, transactions for writers
    embedders.py                     backbone / weights / head -> the Embedder, compatibility checks
    Ingest       (ingest.py)         add and remove
    Inspector    (inspection.py)     query, search, nearest reference
    Calibrator   (calibrator.py)     thresholds and their freshness
    Checker      (consistency.py)    check and repair
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .version import __version__
from .calibrator import Calibrator
from .config import IndexConfig
from .consistency import Checker
from .errors import (BadInput, CatalogError, EmbedderMismatch, IndexBusy, IndexDamaged, IndexMissing,
                     SimsearchError)
from .ingest import Ingest, remove_images
from .inspection import Inspector
from .records import AddReport, Calibration, NearestReference, Progress, QueryResult, RegionResult
from .store.banks import BankStore
from .store.catalog import Catalog
from .store.layout import DB, IndexFolder
from .store.querylog import QueryLog
from .store.vectors import VectorIndex, fsync_directory

# The error classes and records are part of the API; they live in errors.py and records.py.
__all__ = ["Engine", "QueryResult", "RegionResult", "NearestReference", "AddReport", "Calibration",
           "SimsearchError", "EmbedderMismatch", "IndexBusy"]


class Engine:
    DB = DB

    def __init__(self, directory: Path, catalog: Catalog, config: IndexConfig):
        self.folder = IndexFolder(directory)
        self.directory = self.folder.directory
        self.catalog = catalog
        self.config = config
        self.banks = BankStore(self.directory, catalog, config.feature_dim, config.nprobe, config.two_stage)
        self._embedder = None
        self.ingest = Ingest(self)
        self.inspector = Inspector(self)
        self.calibrations = Calibrator(self)
        self.checker = Checker(self)
        self.query_log = QueryLog(self.directory)
        self.record_queries = True  # queries log their scores for drift (store/querylog.py); False: they do not

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def exists(cls, directory: str | os.PathLike) -> bool:
        return IndexFolder(directory).exists()

    @classmethod
    def create(cls, directory: str | os.PathLike, *, backbone: str | None = None, weights: str | None = None,
               head: str | os.PathLike | None = None, embedder=None, **settings) -> "Engine":
        """A new, empty index. `weights`: None (embedded if shipped, else the hub), "hub", or a file.

        `head`: a fine-tuned projection head (`simsearch finetune`). A `weights` file whose safetensors
        metadata marks it as a head is taken as `head`, its base backbone weights then being the embedded
        (or hub) ones it was trained on. Settings not given are the head's base ones; given ones that
        differ from them are refused.
        `settings`: any IndexConfig field (scale, tile_size, tile_stride, dims, neighbourhood, index_kind, ...).
        `embedder`: a model built elsewhere, behind the Embedder interface (`config`, `embed`, `embed_many`),
        used instead of resolving one from the options; its configuration is the index's (the search
        settings among `settings` still apply).
        """
        from .embedders import for_inference, given_embedder, resolve_new
        from .images import file_sha256

        folder = IndexFolder(directory)
        if folder.exists():
            raise BadInput(f"{folder.directory} already holds an index; open it, or choose another --index")
        new = (resolve_new(backbone, weights, head, **settings) if embedder is None
               else given_embedder(embedder, **settings))
        config = new.config
        folder.directory.mkdir(parents=True, exist_ok=True)
        if new.weights_file is not None:
            # Copy the weights in, named by their hash, so the index directory is self-contained.
            stored = Path("weights") / f"{file_sha256(new.weights_file)[:16]}{new.weights_file.suffix}"
            folder.store_file(new.weights_file, stored)
            config = config.replace(weights=str(stored))
        if new.head_file is not None:
            stored = Path("weights") / f"head-{config.head_sha256[:16]}.safetensors"
            folder.store_file(new.head_file, stored)
            config = config.replace(head=str(stored))
        # Written under a temporary name and renamed: an index either exists with its configuration or not at all.
        tmp_db = folder.directory / (DB + ".creating")
        for suffix in ("", "-wal", "-shm"):
            Path(str(tmp_db) + suffix).unlink(missing_ok=True)
        with Catalog(tmp_db) as catalog:
            catalog.write_config(config, __version__)
        os.replace(tmp_db, folder.db_path)
        fsync_directory(folder.directory)
        engine = cls(folder.directory, Catalog(folder.db_path), config)
        model = new.embedder(config)
        engine._embedder = model if embedder is not None else for_inference(folder.directory, model)
        return engine

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Engine":
        """An existing index, or a bundle (verified against its manifest before anything is read)."""
        from .bundle import is_bundle, verify

        folder = IndexFolder(directory)
        if not folder.exists():
            raise IndexMissing(f"no index in {folder.directory} (run `simsearch index add` to create one)")
        bundle = is_bundle(folder.directory)
        if bundle:
            verify(folder.directory)
        catalog = Catalog(folder.db_path, wal=not bundle)
        try:
            stored = catalog.read_config()
            if stored is None:
                raise CatalogError(f"{folder.db_path} holds no index configuration")
            config, row = stored
            if row["fingerprint"] != config.fingerprint:
                raise IndexDamaged(f"{folder.directory}: stored fingerprint {row['fingerprint']} does not match its "
                                   f"configuration ({config.fingerprint}); the index was edited by hand or damaged")
        except BaseException:
            catalog.close()
            raise
        return cls(folder.directory, catalog, config)

    @classmethod
    def open_or_create(cls, directory: str | os.PathLike, **options) -> "Engine":
        """Open an existing index, refusing options that contradict its configuration; else create one."""
        if not cls.exists(directory):
            return cls.create(directory, **options)
        engine = cls.open(directory)
        try:
            engine.check_options(**options)
        except BaseException:
            engine.close()
            raise
        return engine

    @classmethod
    def discard_new(cls, directory: str | os.PathLike, *, remove_directory: bool) -> None:
        """Undo `create` of an index that never received an image (nothing a user stored is touched)."""
        folder = IndexFolder(directory)
        if folder.exists():
            with Catalog(folder.db_path) as catalog:
                counts = catalog.counts()
            if counts["reference_images"] or counts["calibration_images"]:
                return
        folder.discard(remove_directory)

    def check_options(self, backbone: str | None = None, weights: str | None = None,
                      head: str | os.PathLike | None = None, **settings) -> None:
        """Refuse an embedder other than the index's own (a fine-tuned head and the frozen embedder included)."""
        from .embedders import check_compatible
        check_compatible(self.config, self.directory, backbone, weights, head, **settings)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model and the banks ------------------------------------------------------------------
    @property
    def embedder(self):
        """The index's Embedder, loaded on first use (its weights and head checked against the hashes)."""
        if self._embedder is None:
            from .embedders import load_for_index
            self._embedder = load_for_index(self.directory, self.config)
        return self._embedder

    def use_embedder(self, embedder) -> None:
        """Use a model another Engine has loaded (a server loads it once per process); it must be this index's."""
        if embedder.config.fingerprint != self.config.fingerprint:
            raise EmbedderMismatch(f"{self.directory}: the shared model was built for index fingerprint "
                                   f"{embedder.config.fingerprint}, this index has {self.config.fingerprint}")
        self._embedder = embedder

    @property
    def bank(self) -> VectorIndex:
        """The patch bank of the committed generation (read-only: writers build the next one on a copy)."""
        return self.banks.view().patches

    @property
    def generation(self) -> int:
        """The committed bank generation."""
        return int(self.catalog.state()["generation"])

    @contextlib.contextmanager
    def writer_lock(self, clean: bool = True):
        """The index's writer lock (a context manager); `clean` deletes strays of killed writers once held.
        A bundle is sealed again before the lock is released (its manifest names the files as written)."""
        from .bundle import is_bundle, seal

        with self.folder.writer_lock((lambda: self.catalog.state()["generation"]) if clean else None):
            try:
                yield
            finally:
                if is_bundle(self.directory):
                    seal(self.directory, self.config.fingerprint, self.generation)

    # -- writing ------------------------------------------------------------------------------
    def add(self, inputs: Iterable[str | os.PathLike], *, holdout: float = 0.0, coreset: float | None = None,
            progress: Progress | None = None, recalibrate: bool = True, embedding=None) -> AddReport:
        """Add good images (files, folders, globs) to the bank.

        `holdout`: a deterministic fraction of the new images (the smallest sha256 values) is kept out of the
        bank and recorded for calibration. `coreset`: keep this fraction of the new patch vectors (greedy
        k-center against the existing bank). Explicitly named files that cannot be read abort the whole add
        (nothing is written); unreadable files found inside folders are skipped and reported.
        `recalibrate`: measure the latest calibration again on the new bank, in the same commit (see
        calibrator.py; the report's `calibration` says why not, when it could not).
        `embedding`: where the images are read and embedded (ingest.ImageEmbedding; default this process,
        or simsearch/distributed/ray_ingest.py's RayEmbedding on a Ray cluster).
        """
        return self.ingest.add(inputs, holdout=holdout, coreset=coreset, progress=progress, recalibrate=recalibrate,
                               embedding=embedding)

    def remove(self, refs: Iterable[str], *, recalibrate: bool = True) -> dict:
        """Remove images by path or sha256 (prefix of >= 8 hex digits): their vectors and rows go together."""
        return remove_images(self, refs, recalibrate=recalibrate)

    def hold_out(self, refs: Iterable[str], *, recalibrate: bool = True) -> dict:
        """Move bank images (paths or sha256 prefixes) into the calibration set: out of the bank, kept as
        calibration images, then the index recalibrated on them (when it was calibrated)."""
        return remove_images(self, refs, recalibrate=recalibrate, hold_out=True)

    # -- inspection ---------------------------------------------------------------------------
    def query(self, image: str | os.PathLike | np.ndarray) -> QueryResult:
        """Score one image (path, or (H, W, 3) RGB / (H, W) grey uint8 array) against the bank."""
        return self.inspector.query(image)

    def query_many(self, images: list) -> list[QueryResult]:
        """`query` of each image, all against one bank generation and one calibration."""
        return self.inspector.query_many(images)

    def search(self, image: str | os.PathLike | np.ndarray, k: int = 5) -> list[dict]:
        """The k reference images most similar overall (cosine of mean-pooled patch vectors)."""
        return self.inspector.search(image, k)

    # -- calibration --------------------------------------------------------------------------
    def calibrate(self, good: Iterable[str] | None = None, *, folds: int | None = None, target_fpr: float = 0.01,
                  defects: Iterable[str] | None = None, min_region_area: int | None = None,
                  progress: Progress | None = None, fold_order: str = "capture") -> Calibration:
        """Thresholds from good images outside the bank (default: the calibration images), or from `folds`
        folds of the bank itself, in `fold_order` ("capture" or "interleaved"); see calibrator.py."""
        return self.calibrations.calibrate(good, folds=folds, target_fpr=target_fpr, defects=defects,
                                           min_region_area=min_region_area, progress=progress,
                                           fold_order=fold_order)

    def current_calibration(self) -> tuple[dict | None, str | None]:
        """(the calibration verdicts use, or None; a warning if there is none, or it predates adds since)."""
        return self.calibrations.current()

    def latest_calibration(self) -> dict | None:
        return self.calibrations.latest()

    def default_min_region_area(self, height: int, width: int) -> int:
        return self.calibrations.default_min_region_area(height, width)

    # -- consistency --------------------------------------------------------------------------
    def check(self) -> dict:
        """Compare the catalog with the FAISS files of its generation; change nothing (see consistency.py)."""
        return self.checker.check()

    def repair(self, progress: Progress | None = None) -> dict:
        """Bring the FAISS files back in line with the catalog (see consistency.py)."""
        return self.checker.repair(progress)

    # -- what is stored -----------------------------------------------------------------------
    def images(self, role: str | None = None) -> list[dict]:
        """Catalog rows of the images ("reference", "calibration" or all), in the order they were added."""
        return self.catalog.images(role)

    def known_images(self, hashes: list[str]) -> dict[str, dict]:
        """sha256 -> catalog row, for those of `hashes` the index holds."""
        return self.catalog.known_hashes(hashes)

    def find_images(self, refs: list[str]) -> tuple[list[dict], list[str]]:
        """(rows matching each path or sha256 prefix, the refs that matched nothing)."""
        return self.catalog.find_images(refs)

    def vectors_by_image(self) -> dict[int, np.ndarray]:
        """image id -> (n, D) float32 bank vectors of that reference image, in id order."""
        ids, vecs = self.bank.all_vectors()
        order = np.argsort(ids)
        ids, vecs = ids[order], vecs[order]
        rows = self.catalog.vector_owners()
        owners = rows[np.searchsorted(rows[:, 0], ids), 1] if len(rows) else np.zeros(0, np.int64)
        by_owner = np.argsort(owners, kind="stable")  # vectors keep their id order within an image
        image_ids, starts = np.unique(owners[by_owner], return_index=True)
        return {int(i): g for i, g in zip(image_ids, np.split(vecs[by_owner], starts[1:]))}

    def info(self) -> dict:
        view = self.banks.view()
        counts = self.catalog.counts()
        cal, warning = self.calibrations.current(view.generation)
        latest = self.calibrations.latest()
        return {
            "index": str(self.directory), "fingerprint": self.config.fingerprint, "generation": view.generation,
            **counts, "bank_vectors": view.patches.ntotal, "bank_kind": view.patches.kind,
            "nprobe": view.patches.nprobe, "bank_bytes_per_vector": view.patches.bytes_per_vector(),
            "calibration": None if latest is None else {
                k: latest[k] for k in ("id", "image_threshold", "pixel_threshold", "min_region_area", "target_fpr",
                                       "f1_threshold", "n_good", "n_defect", "generation", "method")},
            "calibration_fresh": cal is not None and warning is None, "verdicts": cal is not None,
            "calibration_generation": None if cal is None else cal["details"].get("predates_adds_since",
                                                                                  cal["generation"]),
            "warning": warning, "drift": self.drift() if cal is not None else None,
            "bytes_on_disk": self.folder.bytes_on_disk(), "config": self.config.to_dict(),
        }

    def drift(self) -> dict:
        """How recent queries' scores compare with the calibration's good images (drift.py)."""
        from .drift import WINDOW, drift_summary
        return drift_summary(*self.query_log.recent(WINDOW))

