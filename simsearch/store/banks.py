"""The bank store: readers get an immutable view of one committed generation, writers a transaction
that builds the next one on private copies.

A `BankView` is a generation number and its two banks (patch vectors, pooled image vectors) taken
together; nothing ever changes a view's banks, so a query that took a view scores against exactly the
generation it names, whatever writers do meanwhile. A `BankTransaction` holds one catalog transaction;
the writer changes the catalog through `conn` and the banks through `patches` / `images` (clones of the
committed ones, made on first use), then `publish` writes the next generation's files inside it. Its
commit is the one moment the change takes effect; only then does the store's view move on. A writer
that fails or dies leaves the committed view, and its files, as they were (see bankfiles.py).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IndexDamaged
from ..faults import crash_point
from . import bankfiles
from .catalog import Catalog
from .spreads import SpreadTable, next_table
from .twostage import scoring_bank
from .vectors import SPREAD_NEIGHBOURS, VectorIndex, uses_two_stage

LOAD_ATTEMPTS = 5


@dataclass(frozen=True)
class BankView:
    generation: int
    patches: VectorIndex  # the PatchCore bank: one vector per reference patch cell
    images: VectorIndex  # one unit-length mean vector per reference image
    spreads: SpreadTable | None = None  # the patch bank's spread table, where it is searched in two stages


class BankStore:
    """The committed banks of one index, loaded once per generation and shared by every reader thread."""

    def __init__(self, directory: Path, catalog: Catalog, dim: int, nprobe: int | None, two_stage: str = "off"):
        self.directory = Path(directory)
        self.catalog = catalog
        self.dim = dim
        self.nprobe = nprobe
        self.two_stage = two_stage  # SearchConfig.two_stage: whether `scorer` wraps the patch bank
        self._scorer: tuple[int, object] | None = None  # (generation, the bank queries score against)
        self._view: BankView | None = None
        self._pinned: BankView | None = None
        self._lock = threading.Lock()  # one load per generation, even with many reader threads

    def _empty(self, generation: int) -> BankView:
        return BankView(generation, VectorIndex.flat(self.dim), VectorIndex.flat(self.dim))

    def view(self) -> BankView:
        """The banks of the catalog's current generation (reloaded when a writer has moved it on)."""
        if self._pinned is not None:
            return self._pinned
        generation = self.catalog.state()["generation"]
        view = self._view
        if view is not None and view.generation == generation:
            return view
        with self._lock:
            return self._load()

    def _load(self) -> BankView:
        for _attempt in range(LOAD_ATTEMPTS):
            generation, records = self.catalog.bank_state()
            if self._view is not None and self._view.generation == generation:
                return self._view
            try:  # the files are checked against what the catalog recorded at their commit (bankfiles.py)
                banks = bankfiles.load_generation(self.directory, generation, records)
            except FileNotFoundError as exc:
                if self.catalog.state()["generation"] != generation:
                    continue  # a writer committed a newer generation and removed this one: read again
                raise IndexDamaged(f"{exc}; run `simsearch index repair`") from None
            except ValueError as exc:
                raise IndexDamaged(f"{exc}; run `simsearch index repair`") from None
            if banks is None:
                view = self._empty(generation)
            else:
                banks["patches"].use_nprobe(self.nprobe)
                view = BankView(generation, banks["patches"], banks["images"], banks[bankfiles.SPREADS])
            self._view = view
            return view
        raise IndexDamaged(f"{self.directory}: the bank kept changing while being read; try again")

    def scorer(self, view: BankView):
        """The bank `view`'s queries score against: its patch bank, or over 'auto' / 'on' a two-stage search of it
        (store/twostage.py), built once per generation from the spread table the writer saved with it (an index
        without one computes it here: about 50 s per million vectors)."""
        if not uses_two_stage(self.two_stage, view.patches.ntotal) or getattr(view.patches, "two_stage", False):
            return view.patches
        with self._lock:
            cached = self._scorer
            if cached is None or cached[0] != view.generation or getattr(cached[1], "bank", cached[1]) is not view.patches:
                cached = (view.generation, self.scorer_for(view.patches, view.images, self.catalog.vector_owners,
                                                           view.spreads))
                self._scorer = cached
            return cached[1]

    def scorer_for(self, patches: VectorIndex, images: VectorIndex, owners, spreads: SpreadTable | None = None):
        """`scoring_bank` of these banks under this store's setting (a calibration fold's, too)."""
        return scoring_bank(patches, images, owners, self.two_stage, spreads)

    def spreads_for(self, patches: VectorIndex, previous: SpreadTable | None) -> SpreadTable | None:
        """The spread table a generation with these patches is saved with: where its queries search in two stages
        (`store/spreads.next_table`, from the committed generation's `previous`); None elsewhere."""
        if patches.ntotal <= SPREAD_NEIGHBOURS or not uses_two_stage(self.two_stage, patches.ntotal):
            return None
        return next_table(previous, patches)

    def pin(self, view: BankView) -> None:
        """Answer every read with `view` from now on, whatever the catalog says: a benchmark's seam for
        searching a bank of another size through the whole query path. Writers must not run after it."""
        self._pinned = view

    def forget(self) -> None:
        """Drop the loaded view (the next `view` reads the files again)."""
        with self._lock:
            self._view = None

    @contextlib.contextmanager
    def transaction(self, base: BankView | None = None):
        """A write on top of the committed generation (`base`, default the current view). Only under the
        index's writer lock. Yields a BankTransaction; its changes become visible when the block ends."""
        base = base or self.view()
        txn = BankTransaction(self, base)
        try:
            with self.catalog.begin() as conn:
                txn.conn = conn
                yield txn
                crash_point("before commit")
        except BaseException:
            if txn.published is not None:  # files written for a generation that never committed
                bankfiles.remove_stray(self.directory, base.generation)
            raise
        crash_point("committed")
        if txn.published is not None:
            self._view = txn.published
            bankfiles.remove_stray(self.directory, txn.published.generation)


class BankTransaction:
    """The next generation in the making: catalog changes through `conn`, bank changes on private copies."""

    def __init__(self, store: BankStore, base: BankView):
        self.store = store
        self.base = base
        self.conn = None
        self._patches: VectorIndex | None = None
        self._images: VectorIndex | None = None
        self.published: BankView | None = None

    @property
    def patches(self) -> VectorIndex:
        """The patch bank to change: a copy of the committed one (readers keep searching that)."""
        if self._patches is None:
            self._patches = self.base.patches.clone()
        return self._patches

    @patches.setter
    def patches(self, bank: VectorIndex) -> None:
        self._patches = bank

    @property
    def images(self) -> VectorIndex:
        if self._images is None:
            self._images = self.base.images.clone()
        return self._images

    @images.setter
    def images(self, bank: VectorIndex) -> None:
        self._images = bank

    def publish(self, next_vector_id: int | None = None) -> int:
        """Move the catalog to the next generation and write its FAISS files (inside the transaction)."""
        catalog = self.store.catalog
        generation = catalog.bump_generation(self.conn, next_vector_id=next_vector_id)
        patches = self._patches if self._patches is not None else self.base.patches
        images = self._images if self._images is not None else self.base.images
        spreads = self.store.spreads_for(patches, self.base.spreads)
        records = bankfiles.write_generation(self.store.directory, generation, {"patches": patches, "images": images},
                                             spreads=spreads)
        catalog.record_bank_files(self.conn, generation, records)
        self.published = BankView(generation, patches, images, spreads)
        return generation


def bank_diff(vector_ids: np.ndarray, reference_ids: np.ndarray, view: BankView | None) -> dict[str, np.ndarray]:
    """Where the catalog and the banks disagree: ids the catalog lists that a bank lacks, and ids a bank
    holds that the catalog does not know. (N,) int64 arrays; `view` None means no bank files."""
    bank_ids = view.patches.ids() if view is not None else np.zeros(0, np.int64)
    pooled_ids = view.images.ids() if view is not None else np.zeros(0, np.int64)
    return {"missing_from_bank": np.setdiff1d(vector_ids, bank_ids),
            "orphans_in_bank": np.setdiff1d(bank_ids, vector_ids),
            "missing_pooled": np.setdiff1d(reference_ids, pooled_ids),
            "orphan_pooled": np.setdiff1d(pooled_ids, reference_ids),
            "duplicate_ids": np.unique(_repeated(bank_ids))}


def _repeated(ids: np.ndarray) -> np.ndarray:
    s = np.sort(ids)
    return s[1:][np.diff(s) == 0]
