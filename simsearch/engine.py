"""The one API over every stage: the CLI, the tests and Python users all go through `Engine`.

    from simsearch import Engine
    engine = Engine.create("index")              # or Engine.open("index")
    engine.add(["good/"], holdout=0.25)
    engine.calibrate(target_fpr=0.01)
    result = engine.query("part.png")           # or an (H, W, 3) RGB uint8 array
    result.is_anomalous, result.score, result.anomaly_map, result.regions
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__
from .backbones import EMBEDDED, Backbone, build_backbone, file_sha256, layers_for_strides
from .calibration import f1_best_threshold, threshold_for_fpr
from .config import DEFAULT_BACKBONE, IndexConfig
from .coreset import select_coreset_blocks
from .features import Embedder, PatchGrid
from .finetune import check_base, is_head_file, load_head, read_head_info
from .images import Image, ImageError, decode, expand_paths, load_image, read_ahead
from .runtime import configure_threads
from .scoring import (discounted_image_score, find_regions, patch_scores, region_level,
                      similarity_from_score, smooth)
from .faults import crash_point
from .store import bankfiles
from .store.catalog import Catalog
from .store.spool import VectorSpool
from .store.vectors import IVF_KINDS, VectorIndex, choose_kind, fsync_directory
from .tiling import grid_to_image

Progress = Callable[[int, int, str], None]
LOCK_TIMEOUT_S = float(os.environ.get("SIMSEARCH_LOCK_TIMEOUT", "60"))


class SimsearchError(RuntimeError):
    """An error a user can act on; the message says what to do."""


class EmbedderMismatch(SimsearchError):
    pass


class WriterBusy(SimsearchError):
    """Another writer held the index's lock for longer than SIMSEARCH_LOCK_TIMEOUT."""


@dataclass
class NearestReference:
    image: str  # reference image path as stored (absolute)
    x: int  # top-left of the reference patch, in that image's pixels
    y: int
    distance: float  # L2 distance between the two patch vectors
    sha256: str = ""  # the reference image's content hash (names it without a server path)


@dataclass
class RegionResult:
    x: int  # bounding box in the query image's pixels, (x, y) top-left
    y: int
    w: int
    h: int
    area: int  # pixels above the pixel threshold in this region
    score: float  # the anomaly map's maximum in the region
    nearest: NearestReference | None


@dataclass
class QueryResult:
    image: str  # the path exactly as given, or "<array>"
    score: float  # mean of the image_top_k highest patch distances to the bank (L2), sparse-bank discounted
    threshold: float | None  # image threshold of a fresh calibration, else None
    is_anomalous: bool | None  # None without a fresh calibration
    similarity: float | None  # 0.5 ** (score / threshold): 1 identical, 0.5 at the threshold
    regions: list[RegionResult]
    peak: RegionResult  # the single most anomalous patch, with its nearest reference
    anomaly_map: np.ndarray = field(repr=False)  # (H, W) float32 at the image's own resolution
    generation: int = 0
    calibration_id: int | None = None
    fingerprint: str = ""
    warning: str | None = None
    heatmap: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("anomaly_map")
        return d


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)  # paths now in the bank
    held_out: list[str] = field(default_factory=list)  # paths kept for calibration
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    vectors_added: int = 0
    generation: int = 0


@dataclass
class _NewReference:
    """A new reference image's catalog data, its vectors waiting in the add's spool."""

    row: dict  # the images row
    boxes: list[tuple[int, int, int, int]]  # tile boxes in original pixels
    table: np.ndarray  # (n, 5) int64 [tile, row, col, x, y] per vector, in spool order
    pooled: np.ndarray  # (D,) float32 unit-length mean of its vectors


@dataclass
class Calibration:
    id: int
    image_threshold: float
    pixel_threshold: float
    min_region_area: int
    target_fpr: float
    expected_fpr: float
    n_good: int
    n_defect: int
    method: str
    f1_threshold: float | None = None
    f1: float | None = None
    generation: int = 0


class Engine:
    DB = "meta.sqlite"

    def __init__(self, directory: Path, catalog: Catalog, config: IndexConfig):
        self.directory = directory
        self.catalog = catalog
        self.config = config
        self._embedder: Embedder | None = None
        self._bank: VectorIndex | None = None
        self._pooled: VectorIndex | None = None
        self._bank_generation: int | None = None
        # Threads sharing one Engine (the server's queries) load each generation once, never an older one.
        self._bank_lock = threading.RLock()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def exists(cls, directory: str | os.PathLike) -> bool:
        return (Path(directory) / cls.DB).is_file()

    @staticmethod
    def base_embedder(backbone: str | None = None, weights: str | None = None,
                      **settings) -> tuple[IndexConfig, Backbone, Path | None]:
        """The frozen embedder these options name, built but written nowhere: (configuration, network,
        weights file or None). The configuration's `weights` is "embedded", "hub" or "file".

        `weights`: None (embedded if shipped, else the hub), "embedded", "hub", or a backbone weights file.
        """
        backbone = backbone or DEFAULT_BACKBONE
        weights_file = None
        if weights is None:
            source = "embedded" if backbone in EMBEDDED else "hub"
        elif weights in ("embedded", "hub"):
            source = weights
        else:
            weights_file = Path(weights)
            if not weights_file.is_file():
                raise SimsearchError(f"{weights}: no such weights file")
            source = "file"
        if settings.get("scale") is not None and "short_side" not in settings:
            settings["short_side"] = None  # a fixed scale replaces the default short side
        layers = tuple(settings.pop("layers", None) or layers_for_strides(backbone, (8, 16)))
        net = build_backbone(backbone, source, layers, weights_file)
        config = IndexConfig(backbone=backbone, weights=source, weights_sha256=net.weights_sha256,
                             mean=net.mean, std=net.std, interpolation=net.interpolation, layers=layers,
                             patch_stride=net.reductions[0], **settings)
        return config.replace(feature_dim=config.dims or sum(net.channels)), net, weights_file

    @staticmethod
    def _store_file(directory: Path, source: Path, stored: Path) -> None:
        """Copy `source` to `directory / stored` (written under a temporary name, then renamed)."""
        (directory / stored).parent.mkdir(exist_ok=True)
        if not (directory / stored).exists():
            tmp = directory / (str(stored) + ".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, directory / stored)

    @classmethod
    def create(cls, directory: str | os.PathLike, *, backbone: str | None = None, weights: str | None = None,
               head: str | os.PathLike | None = None, **settings) -> "Engine":
        """A new, empty index. `weights`: None (embedded if shipped, else the hub), "hub", or a file.

        `head`: a fine-tuned projection head (`simsearch finetune`). A `weights` file whose safetensors
        metadata marks it as a head is taken as `head`, its base backbone weights then being the embedded
        (or hub) ones it was trained on. Settings not given are the head's base ones; given ones that
        differ from them are refused.
        `settings`: any IndexConfig field (scale, tile_size, tile_stride, dims, neighbourhood, index_kind, ...).
        """
        directory = Path(directory)
        if cls.exists(directory):
            raise SimsearchError(f"{directory} already holds an index; open it, or choose another --index")
        if weights not in (None, "embedded", "hub") and is_head_file(weights):
            if head is not None:
                raise SimsearchError(f"{weights} is a fine-tuned head, and a head was given too; give one")
            head, weights = weights, None
        head_module = head_info = None
        if head is not None:
            head_module, head_info = load_head(head)
            base = head_info.base
            if backbone is not None and backbone != base["backbone"]:
                raise EmbedderMismatch(f"{head} was fine-tuned on {base['backbone']}, not {backbone}")
            backbone = base["backbone"]
            if weights is None:
                if head_info.base_weights == "file":
                    raise SimsearchError(f"{head} was fine-tuned on a backbone weights file: give that file too "
                                         "(Python: Engine.create(..., weights=FILE, head=HEAD))")
                weights = head_info.base_weights
            if settings.get("scale") is None and settings.get("short_side") is None:
                settings["short_side"], settings["scale"] = base["short_side"], base["scale"]
            for key in ("layers", "neighbourhood", "dims"):
                if settings.get(key) is None:
                    settings[key] = tuple(base[key]) if key == "layers" else base[key]
        config, net, weights_file = cls.base_embedder(backbone, weights, **settings)
        if head_info is not None:
            check_base(head_info, config, "this index")
        directory.mkdir(parents=True, exist_ok=True)
        if weights_file is not None:
            # Copy the weights in, named by their hash, so the index directory is self-contained.
            stored = Path("weights") / f"{file_sha256(weights_file)[:16]}{weights_file.suffix}"
            cls._store_file(directory, weights_file, stored)
            config = config.replace(weights=str(stored))
        if head_module is not None:
            stored = Path("weights") / f"head-{head_info.sha256[:16]}.safetensors"
            cls._store_file(directory, Path(head), stored)
            config = config.replace(head=str(stored), head_sha256=head_info.sha256, feature_dim=head_module.out_dim)
        # Written under a temporary name and renamed: an index either exists with its configuration or not at all.
        tmp_db = directory / (cls.DB + ".creating")
        for suffix in ("", "-wal", "-shm"):
            Path(str(tmp_db) + suffix).unlink(missing_ok=True)
        with Catalog(tmp_db) as catalog:
            catalog.write_config(config, __version__)
        os.replace(tmp_db, directory / cls.DB)
        fsync_directory(directory)
        engine = cls(directory, Catalog(directory / cls.DB), config)
        engine._embedder = Embedder(config, net, head_module)
        configure_threads()
        return engine

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Engine":
        directory = Path(directory)
        if not cls.exists(directory):
            raise SimsearchError(f"no index in {directory} (run `simsearch index add` to create one)")
        catalog = Catalog(directory / cls.DB)
        stored = catalog.read_config()
        if stored is None:
            catalog.close()
            raise SimsearchError(f"{directory / cls.DB} holds no index configuration")
        config, row = stored
        if row["fingerprint"] != config.fingerprint:
            catalog.close()
            raise SimsearchError(f"{directory}: stored fingerprint {row['fingerprint']} does not match its "
                                 f"configuration ({config.fingerprint}); the index was edited by hand or damaged")
        return cls(directory, catalog, config)

    @classmethod
    def open_or_create(cls, directory: str | os.PathLike, **options) -> "Engine":
        """Open an existing index, refusing options that contradict its configuration; else create one."""
        if not cls.exists(directory):
            return cls.create(directory, **options)
        engine = cls.open(directory)
        engine.check_options(**options)
        return engine

    @classmethod
    def discard_new(cls, directory: str | os.PathLike, *, remove_directory: bool) -> None:
        """Undo `create` of an index that never received an image (nothing a user stored is touched)."""
        directory = Path(directory)
        if cls.exists(directory):
            with Catalog(directory / cls.DB) as catalog:
                counts = catalog.counts()
            if counts["reference_images"] or counts["calibration_images"]:
                return
        for name in (cls.DB, cls.DB + "-wal", cls.DB + "-shm", ".lock"):
            (directory / name).unlink(missing_ok=True)
        for path in [*directory.glob("patches*.faiss*"), *directory.glob("images*.faiss*")]:
            path.unlink(missing_ok=True)
        shutil.rmtree(directory / "weights", ignore_errors=True)
        if remove_directory:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty

    def check_options(self, backbone: str | None = None, weights: str | None = None,
                      head: str | os.PathLike | None = None, **settings) -> None:
        """Refuse an embedder other than the index's own (a fine-tuned head and the frozen embedder included)."""
        differences = []
        if backbone is not None and backbone != self.config.backbone:
            differences.append(f"backbone {backbone} (index: {self.config.backbone})")
        if weights not in (None, "embedded", "hub") and is_head_file(weights):
            head, weights = weights, None
        if head is not None:
            info = read_head_info(head)
            if not self.config.head_sha256:
                differences.append(f"fine-tuned head {head} (index: the frozen embedder)")
            elif info.sha256 != self.config.head_sha256:
                differences.append(f"head {head} (a different head from the index's)")
        elif weights is not None and self.config.head_sha256:
            differences.append(f"weights {weights} without a head (index: fine-tuned, head {self.config.head})")
        if weights is not None:
            if weights in ("embedded", "hub"):
                if weights != self.config.weights:
                    differences.append(f"weights {weights} (index: {self.config.weights})")
            else:
                net = build_backbone(self.config.backbone, "file", self.config.layers, Path(weights))
                if net.weights_sha256 != self.config.weights_sha256:
                    differences.append(f"weights {weights} (a different file from the index's)")
        for key, value in settings.items():
            if value is not None and getattr(self.config, key) != value:
                differences.append(f"{key} {value} (index: {getattr(self.config, key)})")
        if differences:
            raise EmbedderMismatch(f"{self.directory} was built with another embedder: " + "; ".join(differences)
                                   + ". Its configuration is fixed; use a new --index for a different one")

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lazily loaded parts --------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            cfg = self.config
            weights_file = self.directory / cfg.weights if cfg.weights not in ("embedded", "hub") else None
            if weights_file is not None and not weights_file.is_file():
                raise SimsearchError(f"{weights_file}: the index's weights file is missing")
            net: Backbone = build_backbone(cfg.backbone, "file" if weights_file else cfg.weights, cfg.layers,
                                           weights_file)
            if net.weights_sha256 != cfg.weights_sha256:
                raise EmbedderMismatch(f"the {cfg.backbone} weights found here differ from the ones this index was "
                                       f"built with (hash {net.weights_sha256[:12]} vs {cfg.weights_sha256[:12]})")
            head = None
            if cfg.head:
                head_file = self.directory / cfg.head
                if not head_file.is_file():
                    raise SimsearchError(f"{head_file}: the index's fine-tuned head file is missing")
                head, _info = load_head(head_file)
                if head.sha256() != cfg.head_sha256:
                    raise EmbedderMismatch(f"{head_file} is not the head this index was built with (hash "
                                           f"{head.sha256()[:12]} vs {cfg.head_sha256[:12]})")
            self._embedder = Embedder(cfg, net, head)
            configure_threads()
        return self._embedder

    def use_embedder(self, embedder: Embedder) -> None:
        """Use a model another Engine has loaded (a server loads it once per process); it must be this index's."""
        if embedder.config.fingerprint != self.config.fingerprint:
            raise EmbedderMismatch(f"{self.directory}: the shared model was built for index fingerprint "
                                   f"{embedder.config.fingerprint}, this index has {self.config.fingerprint}")
        self._embedder = embedder

    def _load_banks(self) -> None:
        """The banks of the catalog's current generation (reloaded when a writer has moved it on)."""
        with self._bank_lock:
            self._load_banks_unlocked()

    def _load_banks_unlocked(self) -> None:
        for _attempt in range(5):
            generation = self.catalog.state()["generation"]
            if self._bank is not None and self._bank_generation == generation:
                return
            try:
                banks = bankfiles.load_generation(self.directory, generation)
            except FileNotFoundError as exc:
                if self.catalog.state()["generation"] != generation:
                    continue  # a writer committed a newer generation and removed this one: read again
                raise SimsearchError(f"{exc}; run `simsearch index repair`") from None
            except ValueError as exc:
                raise SimsearchError(f"{exc}; run `simsearch index repair`") from None
            if banks is None:
                self._bank = VectorIndex.flat(self.config.feature_dim)
                self._pooled = VectorIndex.flat(self.config.feature_dim)
            else:
                self._bank, self._pooled = banks["patches"], banks["images"]
                self._bank.use_nprobe(self.config.nprobe)
            self._bank_generation = generation
            return
        raise SimsearchError(f"{self.directory}: the bank kept changing while being read; try again")

    @property
    def bank(self) -> VectorIndex:
        with self._bank_lock:
            self._load_banks()
            return self._bank

    @contextlib.contextmanager
    def _writer_lock(self, clean: bool = True):
        """One writer at a time: an flock the kernel releases if the writer dies."""
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WriterBusy(f"{self.directory} is being written by another process; gave up after "
                                             f"{LOCK_TIMEOUT_S:.0f} s (SIMSEARCH_LOCK_TIMEOUT)") from None
                    time.sleep(0.1)
            if clean:  # a writer killed before its commit leaves files of a generation never committed
                bankfiles.remove_stray(self.directory, self.catalog.state()["generation"])
            yield
        finally:
            os.close(fd)

    # -- embedding helpers ----------------------------------------------------------------------
    def _cell_rows(self, grid: PatchGrid) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
        """Tile boxes in original pixels and (N, 5) [tile number, row, col, x, y] for each cell."""
        h0, w0 = grid.original_size
        sy, sx = grid.layout.height / h0, grid.layout.width / w0
        boxes = []
        for (x, y, w, h) in grid.layout.tile_boxes():
            x0, y0 = int(x / sx), int(y / sy)
            x1, y1 = min(int(np.ceil((x + w) / sx)), w0), min(int(np.ceil((y + h) / sy)), h0)
            boxes.append((x0, y0, max(x1 - x0, 0), max(y1 - y0, 0)))
        hc, wc = grid.grid_shape
        rows, cols = np.meshgrid(np.arange(hc), np.arange(wc), indexing="ij")
        cell_boxes = grid.cell_boxes()
        table = np.stack([grid.tile_index.ravel(), rows.ravel(), cols.ravel(),
                          cell_boxes[..., 0].ravel(), cell_boxes[..., 1].ravel()], axis=1).astype(np.int64)
        return boxes, table

    @staticmethod
    def _pooled_vector(grid: PatchGrid) -> np.ndarray:
        v = grid.features.reshape(-1, grid.features.shape[-1]).mean(axis=0)
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)

    # -- writing ------------------------------------------------------------------------------
    def add(self, inputs: Iterable[str | os.PathLike], *, holdout: float = 0.0, coreset: float | None = None,
            progress: Progress | None = None) -> AddReport:
        """Add good images (files, folders, globs) to the bank.

        `holdout`: a deterministic fraction of the new images (the smallest sha256 values) is kept out of the
        bank and recorded for calibration. `coreset`: keep this fraction of the new patch vectors (greedy
        k-center against the existing bank). Explicitly named files that cannot be read abort the whole add
        (nothing is written); unreadable files found inside folders are skipped and reported.
        """
        if not 0 <= holdout < 1:
            raise SimsearchError(f"holdout must be in [0, 1), got {holdout}")
        if coreset is not None and not 0 < coreset <= 1:
            raise SimsearchError(f"coreset ratio must be in (0, 1], got {coreset}")
        inputs = [os.fspath(p) for p in inputs]
        files, skipped = expand_paths(inputs)
        explicit = {os.path.abspath(p) for p in inputs if os.path.isfile(p)}
        report = AddReport(skipped=list(skipped))
        with self._writer_lock():
            # 1. hash; skip duplicates (in this batch or already stored). The bytes are read again to
            # decode: holding every file's bytes until then would cost the whole input in memory.
            hashed: dict[str, str] = {}  # sha256 -> path
            for path in files:
                try:
                    sha = file_sha256(path)
                except OSError as exc:
                    if os.path.abspath(path) in explicit:
                        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
                    report.skipped.append((path, f"cannot read ({exc.strerror or exc})"))
                    continue
                if sha in hashed:
                    report.skipped.append((path, f"same image as {hashed[sha]}"))
                    continue
                hashed[sha] = path
            stored = self.catalog.known_hashes(list(hashed))
            for sha, row in stored.items():
                report.skipped.append((hashed.pop(sha), f"already in the index ({row['role']}: {row['path']})"))
            # 2. hold out a deterministic slice for calibration
            order = sorted(hashed)
            n_hold = int(round(holdout * len(order)))
            if holdout > 0 and len(order) >= 2:
                n_hold = min(max(n_hold, 1), len(order) - 1)
            held = set(order[:n_hold])
            # 3. decode and embed the references, their vectors streamed to a spool file (nothing is
            # written to the index until all have worked), then write them in one transaction
            todo = [(hashed[sha], sha) for sha in sorted(hashed, key=lambda s: hashed[s])]
            with tempfile.TemporaryDirectory(prefix="simsearch-add-") as tmp, \
                    VectorSpool(Path(tmp) / "vectors.f32", self.config.feature_dim) as spool:
                new_refs, new_held = self._embed_new(todo, held, explicit, report, spool, progress)
                if progress:
                    progress(len(todo), len(todo), "writing")
                report.vectors_added, report.generation = self._write_additions(new_refs, new_held, spool, coreset)
        return report

    def _embed_new(self, todo: list[tuple[str, str]], held: set[str], explicit: set[str], report: AddReport,
                   spool: VectorSpool, progress: Progress | None) -> tuple[list[_NewReference], list[dict]]:
        """Decode `todo` ((path, sha256) pairs) a few images ahead, embed the references in batches
        across images and append their vectors to `spool`. Returns the references' catalog data (in
        spool order) and the held-out images' rows. Unreadable files named explicitly raise; others
        are skipped and reported."""
        new_refs: list[_NewReference] = []
        new_held: list[dict] = []
        rows: deque[dict] = deque()  # references handed to the embedder, not yet embedded

        def read(item: tuple[str, str]) -> np.ndarray:
            path, sha = item
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
            if hashlib.sha256(data).hexdigest() != sha:
                raise ImageError(f"{path}: changed while being added")
            return decode(data, path)

        def references():
            for i, ((path, sha), rgb, error) in enumerate(read_ahead(todo, read)):
                if progress:
                    progress(i, len(todo), path)
                if error is not None:
                    if not isinstance(error, ImageError) or os.path.abspath(path) in explicit:
                        raise error
                    report.skipped.append((path, str(error).split(": ", 1)[-1]))
                    continue
                row = dict(path=os.path.abspath(path), sha256=sha, width=int(rgb.shape[1]), height=int(rgb.shape[0]),
                           added_at=time.time())
                if sha in held:
                    new_held.append(row)
                    report.held_out.append(path)
                    continue
                rows.append(row)
                report.added.append(path)
                yield Image(rgb=rgb, sha256=sha, source=path)

        for grid in self.embedder.embed_many(references()):
            boxes, table = self._cell_rows(grid)
            spool.append(grid.features.reshape(-1, grid.features.shape[-1]))
            new_refs.append(_NewReference(rows.popleft(), boxes, table, self._pooled_vector(grid)))
        return new_refs, new_held

    def _write_additions(self, new_refs: list[_NewReference], new_held: list[dict], spool: VectorSpool,
                         coreset: float | None) -> tuple[int, int]:
        """One transaction: catalog rows, then the bank grown from the spool (block by block), then the
        next generation's files; its commit makes the add take effect."""
        state = self.catalog.state()
        if not new_refs and not new_held:
            return 0, state["generation"]
        self._load_banks()
        n_new = len(spool)
        keep = np.ones(n_new, dtype=bool)
        if coreset is not None and coreset < 1 and n_new:
            # Each new vector's distance to the bank: new vectors near it are picked last (never re-reads the bank).
            near = (np.concatenate([self._bank.search(block, 1)[0][:, 0] for block in spool.blocks()])
                    if self._bank.ntotal else None)
            chosen = select_coreset_blocks(spool.blocks, n_new, spool.dim, ratio=coreset, existing_distances=near)
            keep[:] = False
            keep[chosen.indices] = True
        keep_masks = np.split(keep, np.cumsum([len(r.table) for r in new_refs])[:-1]) if new_refs else []
        first_id = next_id = int(state["next_vector_id"])
        generation = state["generation"]
        with self._bank_transaction() as conn:
            self.catalog.insert_calibration_images(conn, new_held)
            pooled_ids, pooled_vecs = [], []
            for ref, mask in zip(new_refs, keep_masks):
                ids = np.arange(next_id, next_id + int(mask.sum()), dtype=np.int64)
                next_id += len(ids)
                image_id = self.catalog.insert_reference(conn, ref.row, ref.boxes, np.column_stack([ids, ref.table[mask]]))
                crash_point(f"catalog rows of {ref.row['path']}")
                pooled_ids.append(image_id)
                pooled_vecs.append(ref.pooled)
            n_added = next_id - first_id
            if new_refs:
                def kept_blocks():  # the j-th kept vector got id first_id + j
                    pos, given = 0, first_id
                    for block in spool.blocks():
                        mask = keep[pos:pos + len(block)]
                        pos += len(block)
                        n = int(mask.sum())
                        yield block[mask], np.arange(given, given + n, dtype=np.int64)
                        given += n
                self._bank = self._grown(self._bank, kept_blocks, n_added)
                self._pooled.add(np.stack(pooled_vecs), np.asarray(pooled_ids, dtype=np.int64))
                generation = self._publish(conn, next_vector_id=next_id)
        self._after_commit(generation)
        return n_added, generation

    def _grown(self, bank: VectorIndex, blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
               n_more: int) -> VectorIndex:
        """`bank` with the (vectors, ids) blocks of `blocks()` (`n_more` vectors) added, rebuilt as
        another kind when its new size calls for one; one block in memory at a time."""
        kind = choose_kind(self.config.index_kind, bank.ntotal + n_more)
        if self.config.index_kind == "auto" and bank.kind in IVF_KINDS:
            kind = bank.kind  # an approximate bank made by an older "auto" policy keeps its kind: no surprise rebuild
        if kind != bank.kind:
            grown = bank.grown_as(kind, blocks, n_more)
            grown.use_nprobe(self.config.nprobe)
            return grown
        for vectors, ids in blocks():
            if len(ids):
                bank.add(vectors, ids)
        return bank

    @contextlib.contextmanager
    def _bank_transaction(self):
        """One catalog transaction; its commit is the moment a change to the bank takes effect."""
        try:
            with self.catalog.engine.begin() as conn:
                yield conn
                crash_point("before commit")
            crash_point("committed")
        except BaseException:
            self._bank = self._pooled = self._bank_generation = None  # they may hold the uncommitted change
            raise

    def _publish(self, conn, next_vector_id: int | None = None) -> int:
        """Inside a bank transaction: move the catalog to the next generation and write its FAISS files."""
        generation = self.catalog.bump_generation(conn, next_vector_id=next_vector_id)
        bankfiles.write_generation(self.directory, generation, {"patches": self._bank, "images": self._pooled})
        return generation

    def _after_commit(self, generation: int) -> None:
        self._bank_generation = generation
        bankfiles.remove_stray(self.directory, generation)

    def remove(self, refs: Iterable[str]) -> dict:
        """Remove images by path or sha256 (prefix of >= 8 hex digits): their vectors and rows go together."""
        refs = list(refs)
        with self._writer_lock():
            found, missing = self.catalog.find_images(refs)
            if missing:
                raise SimsearchError("not in the index: " + ", ".join(missing))
            self._load_banks()
            ref_ids = [r["id"] for r in found if r["role"] == "reference"]
            with self._bank_transaction() as conn:
                vector_ids = self.catalog.vector_ids_of(conn, ref_ids) if ref_ids else np.zeros(0, np.int64)
                self.catalog.delete_images(conn, [r["id"] for r in found])
                generation = self.catalog.state(conn)["generation"]
                if ref_ids:
                    removed = self._bank.remove(vector_ids)
                    if removed != len(vector_ids):
                        raise SimsearchError(f"the FAISS bank held {removed} of the {len(vector_ids)} vectors of these "
                                             "images; the index needs `simsearch index repair`")
                    self._pooled.remove(np.asarray(ref_ids, dtype=np.int64))
                    generation = self._publish(conn)
            self._after_commit(generation)
        return {"removed": [r["path"] for r in found], "vectors_removed": int(len(vector_ids)),
                "generation": generation}

    # -- scoring ------------------------------------------------------------------------------
    def _score(self, image: Image) -> dict:
        grid = self.embedder.embed(image)
        bank = self.bank
        if bank.ntotal == 0:
            raise SimsearchError("the index has no reference images yet (run `simsearch index add`)")
        hc, wc = grid.grid_shape
        distances, ids = bank.search(grid.features.reshape(hc * wc, -1), self.config.k_neighbours)
        scores = patch_scores(distances).reshape(hc, wc)
        amap = grid_to_image(scores, grid.layout, image.height, image.width)
        amap = smooth(amap, self.config.blur_sigma / self.config.scale_for(image.height, image.width))
        return {"grid": grid, "scores": scores, "nn_ids": ids[:, 0].reshape(hc, wc),
                "nn_dist": distances[:, 0].reshape(hc, wc), "map": amap,
                "score": discounted_image_score(scores, ids[:, 0], bank, self.config.image_top_k,
                                                self.config.sparse_discount)}

    def default_min_region_area(self, height: int, width: int) -> int:
        """Two by two patch cells, in the pixels of an image of (height, width)."""
        side = 2 * self.config.patch_stride / self.config.scale_for(height, width)
        return int(round(side * side))

    def current_calibration(self) -> tuple[dict | None, str | None]:
        """(latest calibration if fresh, warning if there is none or it is stale)."""
        cal = self.catalog.latest_calibration()
        if cal is None:
            return None, "not calibrated: run `simsearch calibrate` to get verdicts"
        generation = self.catalog.state()["generation"]
        if cal["generation"] != generation:
            return None, (f"calibration {cal['id']} was made on bank generation {cal['generation']}, the bank is now "
                          f"at {generation}: run `simsearch calibrate` again to get verdicts")
        return cal, None

    def _nearest(self, scored: dict, x: int, y: int) -> NearestReference | None:
        grid: PatchGrid = scored["grid"]
        h0, w0 = grid.original_size
        row = min(int(y * grid.layout.height / h0) // grid.layout.cell, grid.grid_shape[0] - 1)
        col = min(int(x * grid.layout.width / w0) // grid.layout.cell, grid.grid_shape[1] - 1)
        vid = int(scored["nn_ids"][row, col])
        ref = self.catalog.describe_vectors([vid]).get(vid)
        if ref is None:
            return None
        return NearestReference(image=ref["path"], x=int(ref["x"]), y=int(ref["y"]),
                                distance=float(scored["nn_dist"][row, col]), sha256=ref["sha256"])

    def query(self, image: str | os.PathLike | np.ndarray) -> QueryResult:
        """Score one image (path, or (H, W, 3) RGB / (H, W) grey uint8 array) against the bank."""
        img = load_image(image)
        state = self.catalog.state()
        scored = self._score(img)
        cal, warning = self.current_calibration()
        amap = scored["map"]
        regions = []
        if cal is not None:
            for r in find_regions(amap, cal["pixel_threshold"], cal["min_region_area"]):
                regions.append(RegionResult(r.x, r.y, r.w, r.h, r.area, r.score, self._nearest(scored, *r.peak)))
        scores, grid = scored["scores"], scored["grid"]
        prow, pcol = np.unravel_index(int(np.argmax(scores)), scores.shape)
        px, py, pw, ph = (int(v) for v in grid.cell_boxes()[prow, pcol])
        peak = RegionResult(px, py, pw, ph, pw * ph, float(scores[prow, pcol]),
                            self._nearest(scored, px + pw // 2, py + ph // 2))
        threshold = cal["image_threshold"] if cal else None
        return QueryResult(
            image=img.source, score=scored["score"], threshold=threshold,
            is_anomalous=None if cal is None else bool(scored["score"] > threshold),
            similarity=similarity_from_score(scored["score"], threshold), regions=regions, peak=peak,
            anomaly_map=amap, generation=state["generation"], calibration_id=cal["id"] if cal else None,
            fingerprint=self.config.fingerprint, warning=warning)

    def search(self, image: str | os.PathLike | np.ndarray, k: int = 5) -> list[dict]:
        """The k reference images most similar overall (cosine of mean-pooled patch vectors)."""
        img = load_image(image)
        self._load_banks()
        if self._pooled.ntotal == 0:
            raise SimsearchError("the index has no reference images yet (run `simsearch index add`)")
        q = self._pooled_vector(self.embedder.embed(img))[None, :]
        distances, ids = self._pooled.search(q, min(k, self._pooled.ntotal))
        rows = {r["id"]: r for r in self.catalog.images("reference")}
        hits = []
        for d, i in zip(distances[0], ids[0]):
            if i < 0 or int(i) not in rows:
                continue
            hits.append({"image": rows[int(i)]["path"], "sha256": rows[int(i)]["sha256"], "distance": float(d),
                         "similarity": float(np.clip(1.0 - d * d / 2.0, 0.0, 1.0))})
        return hits

    # -- calibration --------------------------------------------------------------------------
    def calibrate(self, good: Iterable[str] | None = None, *, target_fpr: float = 0.01,
                  defects: Iterable[str] | None = None, min_region_area: int | None = None,
                  progress: Progress | None = None) -> Calibration:
        """Thresholds from good images outside the bank (default: the held-out ones); see calibration.py."""
        if not 0 < target_fpr < 1:
            raise SimsearchError(f"target false-positive rate must be in (0, 1), got {target_fpr}")
        if good:
            good_files, _ = expand_paths(list(good))
            in_bank = self.catalog.known_hashes([load_image(p).sha256 for p in good_files])
            bank_members = [r["path"] for r in in_bank.values() if r["role"] == "reference"]
            if bank_members:
                raise SimsearchError(f"{len(bank_members)} of these good images are in the bank (e.g. {bank_members[0]}); "
                                     "bank images score zero against themselves and cannot calibrate")
        else:
            held = self.catalog.images("calibration")
            if not held:
                raise SimsearchError("no held-out images to calibrate on: give good images that are not in the bank, "
                                     "or add images with --holdout")
            good_files = [r["path"] for r in held]
        defect_files = expand_paths(list(defects))[0] if defects else []
        if min_region_area is None:  # sized on the first good image (images of one product share a size)
            first = load_image(good_files[0])
            min_region_area = self.default_min_region_area(first.height, first.width)
        area = int(min_region_area)
        total = len(good_files) + len(defect_files)
        good_scores, levels, defect_scores, new_rows = [], [], [], []
        for i, path in enumerate(good_files + defect_files):
            if progress:
                progress(i, total, path)
            img = load_image(path)
            scored = self._score(img)
            if i < len(good_files):
                good_scores.append(scored["score"])
                levels.append(region_level(scored["map"], area))
                new_rows.append(dict(path=os.path.abspath(path), sha256=img.sha256, width=img.width,
                                     height=img.height, added_at=time.time()))
            else:
                defect_scores.append(scored["score"])
        if progress:
            progress(total, total, "done")
        image_choice = threshold_for_fpr(np.asarray(good_scores), target_fpr)
        pixel_choice = threshold_for_fpr(np.asarray(levels), target_fpr)
        f1_t = f1 = None
        if defect_scores:
            f1_t, f1 = f1_best_threshold(np.asarray(good_scores), np.asarray(defect_scores))
        method = image_choice.describe("image") + "; " + pixel_choice.describe(
            f"pixel (regions of >= {area} px)")
        generation = self.catalog.state()["generation"]
        with self._writer_lock():
            if good:  # remember the given good images so that a later `calibrate` can re-score them
                known = self.catalog.known_hashes([r["sha256"] for r in new_rows])
                with self.catalog.engine.begin() as conn:
                    self.catalog.insert_calibration_images(conn, [r for r in new_rows if r["sha256"] not in known])
            cal_id = self.catalog.add_calibration(dict(
                generation=generation, target_fpr=target_fpr, image_threshold=image_choice.threshold,
                pixel_threshold=pixel_choice.threshold, min_region_area=area, f1_threshold=f1_t,
                n_good=len(good_scores), n_defect=len(defect_scores), method=method,
                details={"good_scores": good_scores, "defect_scores": defect_scores, "region_levels": levels,
                         "expected_fpr": image_choice.expected_fpr, "k": image_choice.k,
                         "target_met": image_choice.target_met, "f1": f1}))
        return Calibration(id=cal_id, image_threshold=image_choice.threshold, pixel_threshold=pixel_choice.threshold,
                           min_region_area=area, target_fpr=target_fpr, expected_fpr=image_choice.expected_fpr,
                           n_good=len(good_scores), n_defect=len(defect_scores), method=method,
                           f1_threshold=f1_t, f1=f1, generation=generation)

    # -- consistency ------------------------------------------------------------------------------
    def _writer_active(self) -> bool:
        """Whether another process holds the writer lock right now."""
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops our lock, if we got it

    def check(self) -> dict:
        """Compare the catalog with the FAISS files of its generation; change nothing.

        `ok` is True when every vector id in the catalog is in the bank and vice versa, every reference
        image has its pooled vector, and no stray file is left (files of a writer at work are not strays).
        """
        snap = self.catalog.snapshot()
        generation = snap["generation"]
        problems: list[str] = []
        report = {"index": str(self.directory), "generation": generation, "catalog_vectors": len(snap["vector_ids"]),
                  "reference_images": len(snap["reference_ids"]), "bank_vectors": None,
                  "missing_from_bank": 0, "orphans_in_bank": 0, "missing_pooled": 0, "orphan_pooled": 0,
                  "stray_files": [], "problems": problems}
        try:
            banks = bankfiles.load_generation(self.directory, generation)
        except (FileNotFoundError, ValueError) as exc:
            banks = None
            problems.append(str(exc))
        else:
            if banks is None and len(snap["vector_ids"]):
                problems.append(f"no bank files, but the catalog lists {len(snap['vector_ids'])} vectors")
        if banks is not None:
            bank_ids, pooled_ids = banks["patches"].ids(), banks["images"].ids()
            report["bank_vectors"] = len(bank_ids)
            pairs = {"missing_from_bank": np.setdiff1d(snap["vector_ids"], bank_ids),
                     "orphans_in_bank": np.setdiff1d(bank_ids, snap["vector_ids"]),
                     "missing_pooled": np.setdiff1d(snap["reference_ids"], pooled_ids),
                     "orphan_pooled": np.setdiff1d(pooled_ids, snap["reference_ids"])}
            for key, ids in pairs.items():
                report[key] = int(len(ids))
                if len(ids):
                    problems.append(f"{key.replace('_', ' ')}: {len(ids)} ids (e.g. {int(ids[0])})")
            duplicates = len(bank_ids) - len(np.unique(bank_ids))
            if duplicates:
                problems.append(f"the bank holds {duplicates} duplicate ids")
        if not self._writer_active():
            report["stray_files"] = [p.name for p in bankfiles.stray_files(self.directory, generation)]
            if report["stray_files"]:
                problems.append(f"{len(report['stray_files'])} stray bank files (left by an interrupted writer)")
        report["ok"] = not problems
        return report

    def repair(self, progress: Progress | None = None) -> dict:
        """Bring the FAISS files back in line with the catalog, which is the source of truth.

        Stray files are deleted; bank ids the catalog does not know are removed; a reference image whose
        vectors or pooled vector are missing (or whose bank file is unreadable) is embedded again from its
        file when that file still has the stored sha256, and dropped from the index otherwise. Returns what
        it did, with a check before and after.
        """
        actions: list[str] = []
        with self._writer_lock(clean=False):
            before = self.check()
            generation = before["generation"]
            removed = bankfiles.remove_stray(self.directory, generation)
            if removed:
                actions.append(f"deleted {len(removed)} stray bank files: {', '.join(p.name for p in removed)}")
            snap = self.catalog.snapshot()
            changed = False
            try:
                banks = bankfiles.load_generation(self.directory, generation)
            except (FileNotFoundError, ValueError) as exc:
                actions.append(f"bank files of generation {generation} unusable ({exc}): rebuilding from the images")
                banks, changed = None, True
            if banks is None:
                bank, pooled = VectorIndex.flat(self.config.feature_dim), VectorIndex.flat(self.config.feature_dim)
            else:
                bank, pooled = banks["patches"], banks["images"]
            for name, index, known in (("bank vectors", bank, snap["vector_ids"]),
                                       ("pooled vectors", pooled, snap["reference_ids"])):
                orphans = np.setdiff1d(index.ids(), known)
                if len(orphans):
                    index.remove(orphans)
                    actions.append(f"removed {len(orphans)} {name} that the catalog does not know")
                    changed = True
            in_bank, in_pooled = bank.ids(), set(pooled.ids().tolist())
            lacking = []
            for row in self.catalog.images("reference"):
                cells = self.catalog.image_cells(row["id"])
                missing = ~np.isin(cells[:, 0], in_bank)
                if missing.any() or row["id"] not in in_pooled:
                    lacking.append((row, cells[missing]))
            dropped, vectors, ids = [], [], []
            for i, (row, cells) in enumerate(lacking):
                if progress:
                    progress(i, len(lacking), row["path"])
                try:
                    img = load_image(row["path"])
                    why = "its file has changed since it was added"
                except ImageError as exc:
                    img, why = None, str(exc)
                if img is None or img.sha256 != row["sha256"]:
                    dropped.append(row["id"])
                    actions.append(f"dropped {row['path']} from the index: {why}")
                    continue
                grid = self.embedder.embed(img)
                vectors.append(grid.features[cells[:, 1], cells[:, 2]])
                ids.append(cells[:, 0])
                if row["id"] not in in_pooled:
                    pooled.add(self._pooled_vector(grid)[None, :], np.asarray([row["id"]], np.int64))
                actions.append(f"re-embedded {row['path']} ({len(cells)} vectors restored)")
            with self._bank_transaction() as conn:
                if dropped:
                    gone = self.catalog.vector_ids_of(conn, dropped)
                    self.catalog.delete_images(conn, dropped)
                    bank.remove(gone)
                    pooled.remove(np.asarray(dropped, np.int64))
                if ids:
                    vectors, ids = np.concatenate(vectors), np.concatenate(ids)
                    bank = self._grown(bank, lambda: [(vectors, ids)], len(ids))
                self._bank, self._pooled = bank, pooled
                if changed or dropped or lacking:
                    generation = self._publish(conn)
            self._after_commit(generation)
        return {"actions": actions, "before": before, "after": self.check()}

    # -- information --------------------------------------------------------------------------
    def info(self) -> dict:
        counts = self.catalog.counts()
        state = self.catalog.state()
        self._load_banks()
        cal, warning = self.current_calibration()
        latest = self.catalog.latest_calibration()
        size = sum(f.stat().st_size for f in self.directory.rglob("*") if f.is_file())
        return {
            "index": str(self.directory), "fingerprint": self.config.fingerprint, "generation": state["generation"],
            **counts, "bank_vectors": self._bank.ntotal, "bank_kind": self._bank.kind, "nprobe": self._bank.nprobe,
            "bank_bytes_per_vector": self._bank.bytes_per_vector(),
            "calibration": None if latest is None else {
                k: latest[k] for k in ("id", "image_threshold", "pixel_threshold", "min_region_area", "target_fpr",
                                       "f1_threshold", "n_good", "n_defect", "generation", "method")},
            "calibration_fresh": cal is not None, "warning": warning, "bytes_on_disk": size,
            "config": self.config.to_dict(),
        }
