"""Two-stage search of a patch bank (issue 19): every patch cheaply, only those that can change the result fully.

Stage 1 (`TwoStageBank.coarse_search`): the `images_per_query` reference images whose pooled vectors are nearest
the query's own pooled vector (the unit-length mean of its patch vectors, as `ingest.pooled_vector`), their
stored patch vectors gathered into one exact flat search. Every distance it returns is to a vector stored in the
bank, so it is an UPPER BOUND of the distance to the bank's nearest stored vector: true <= stage 1. (For the
lossy kinds, ivf-sq8 / ivf-pq, the gathered vectors are the index's reconstructions, the vectors its own search
measures; the bound then holds against the stored codes, not the vectors first added.)

Stage 2 (`TwoStageBank.refine`): the wrapped index itself (an hnsw graph walked from each patch's stage-1
neighbour, the other kinds searched at their own breadth), asked only about the patches
`scoring.two_stage_neighbours` picks: those that can still reach the image score's top k, and those above a
floor (the map near the pixel threshold). A refined patch keeps the better of both stages' neighbours.

The sparse discount needs each top patch's nearest reference's spread; instead of a k-NN search per patch at
query time, `TwoStageBank.spread` reads it from the bank generation's spread table (store/spreads.py), which the
writer computed and saved with the generation (or, for an index without one, `build` computes once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .kinds import flat_knn
from .spreads import SpreadTable
from .vectors import SPREAD_NEIGHBOURS, VectorIndex, uses_two_stage

IMAGES_PER_QUERY = 8  # reference images whose patches stage 1 searches (docs/benchmarks.md, "Two-stage search")
# hnsw's stage 2 walks its base level from each patch's stage-1 neighbour with this many candidates, as many as its
# own search from the entry point keeps: 64 missed the Magnetic Tile subset's image-AUROC bound by 0.0004
# (docs/benchmarks.md, "Two-stage search")
REFINE_BREADTH = 128


@dataclass(frozen=True)
class ImageGroups:
    """Which stored patch ids belong to which reference image, as compressed rows (CSR)."""

    images: np.ndarray  # (G,) int64 image ids, sorted
    offsets: np.ndarray  # (G + 1,) int64: image images[g]'s patch ids are ids[offsets[g]:offsets[g + 1]]
    ids: np.ndarray  # (N,) int64 patch ids, grouped by image


def image_groups(owners: np.ndarray) -> ImageGroups:
    """(N, 2) int64 [patch id, image id] rows (any order; `Catalog.vector_owners`) -> ImageGroups."""
    owners = np.asarray(owners, np.int64).reshape(-1, 2)
    order = np.lexsort((owners[:, 0], owners[:, 1]))
    patch_ids, image_ids = owners[order, 0], owners[order, 1]
    images, starts = np.unique(image_ids, return_index=True)
    return ImageGroups(images, np.append(starts, len(image_ids)).astype(np.int64), np.ascontiguousarray(patch_ids))


def gather(groups: ImageGroups, image_ids: np.ndarray) -> np.ndarray:
    """(R,) image ids (unknown ones ignored) -> (n,) int64 patch ids of those images, image by image."""
    pos = np.searchsorted(groups.images, np.asarray(image_ids, np.int64))
    pos = pos[(pos < len(groups.images)) & (groups.images[np.minimum(pos, len(groups.images) - 1)] == image_ids)]
    parts = [groups.ids[groups.offsets[p]:groups.offsets[p + 1]] for p in pos]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def unit_mean(vectors: np.ndarray) -> np.ndarray:
    """(N, D) patch vectors -> (D,) float32 unit-length mean (an image's pooled vector)."""
    v = np.asarray(vectors, np.float32).mean(axis=0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def merge_neighbours(d_a: np.ndarray, i_a: np.ndarray, d_b: np.ndarray, i_b: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Two (M, k) neighbour lists of the same queries (distances, ids; -1 = none) -> the (M, k) nearest of
    their union, an id found by both counted once (at the smaller distance)."""
    d = np.concatenate([d_a, d_b], axis=1)
    i = np.concatenate([i_a, i_b], axis=1)
    d = np.where(i < 0, np.inf, d)
    order = np.argsort(d, axis=1, kind="stable")
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    # an id already met earlier in its (sorted) row is a duplicate
    dup = np.triu(i[:, :, None] == i[:, None, :], 1).any(axis=1) & (i >= 0)
    d = np.where(dup, np.inf, d)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return d.astype(np.float32), np.where(np.isinf(d), -1, i)


class TwoStageBank:
    """A patch bank (`VectorIndex`) searched in two stages; what scoring needs of a bank (`search`, `ntotal`,
    `spread`, `typical_spread`, `spread_neighbours`) plus `coarse_search`. `images`: the pooled-vector bank
    whose ids are `groups.images`; `spreads`: the bank's spread table (store/spreads.py), or None to ask
    `bank.spread`."""

    two_stage = True
    spread_neighbours = SPREAD_NEIGHBOURS

    def __init__(self, bank: VectorIndex, images: VectorIndex, groups: ImageGroups,
                 spreads: SpreadTable | None = None, images_per_query: int = IMAGES_PER_QUERY):
        self.bank, self.images, self.groups = bank, images, groups
        self.images_per_query = int(images_per_query)
        self.spreads = spreads

    @classmethod
    def build(cls, bank: VectorIndex, images: VectorIndex, owners: np.ndarray, spreads: SpreadTable | None = None,
              **kw) -> "TwoStageBank":
        """Over `bank` with (N, 2) [patch id, image id] `owners` (rows whose id the bank lacks are left out) and
        the generation's spread table (None: computed here, `SpreadTable.computed`: one pass over the bank)."""
        held = np.sort(bank.ids())
        owners = np.asarray(owners, np.int64).reshape(-1, 2)
        pos = np.minimum(np.searchsorted(held, owners[:, 0]), max(len(held) - 1, 0))
        known = held[pos] == owners[:, 0] if len(held) else np.zeros(len(owners), bool)
        groups = image_groups(owners[known])
        if spreads is None and bank.ntotal > SPREAD_NEIGHBOURS:
            spreads = SpreadTable.computed(bank)
        return cls(bank, images, groups, spreads, **kw)

    # -- what scoring asks of a bank --------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self.bank.ntotal

    @property
    def dim(self) -> int:
        return self.bank.dim

    @property
    def kind(self) -> str:
        return f"two-stage/{self.bank.kind}"

    @property
    def nprobe(self) -> int | None:
        return self.bank.nprobe

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The whole bank at its own breadth."""
        return self.bank.search(queries, k)

    def refine(self, queries: np.ndarray, near_distances: np.ndarray, near_ids: np.ndarray,
               k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2: (M, D) queries with their (M, k) stage-1 distances and ids -> (M, k) from the whole bank,
        starting from the stage-1 nearest where the bank can (hnsw, `VectorIndex.search_near`)."""
        return self.bank.search_near(queries, k, np.asarray(near_ids)[:, 0], np.asarray(near_distances)[:, 0],
                                     REFINE_BREADTH)

    def coarse_search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: (M, D) patch vectors OF ONE IMAGE -> (M, k) exact distances and ids among the patches of the
        `images_per_query` reference images nearest their pooled vector: upper bounds of the bank's nearest."""
        q = np.ascontiguousarray(queries, np.float32)
        r = min(self.images_per_query, self.images.ntotal)
        _, image_ids = self.images.search(unit_mean(q)[None, :], r)
        ids = gather(self.groups, image_ids[0][image_ids[0] >= 0])
        if not len(ids):
            return np.full((len(q), k), np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        return flat_knn(q, self.bank.reconstruct(ids), ids, k)

    def spread(self, ids: np.ndarray, neighbours: int = SPREAD_NEIGHBOURS) -> np.ndarray:
        """(n,) stored ids -> (n,) float32 spreads, read from the table (the bank's own search without one)."""
        ids = np.asarray(ids, np.int64)
        if self.spreads is None or neighbours != SPREAD_NEIGHBOURS:
            return self.bank.spread(ids, neighbours)
        out, found = self.spreads.lookup(ids)
        if not found.all():
            out[~found] = self.bank.spread(ids[~found], neighbours)
        return out

    def typical_spread(self, neighbours: int = SPREAD_NEIGHBOURS, sample: int = 4000) -> float:
        """The median of the spread table (the bank's own `typical_spread` without one)."""
        if self.spreads is None or neighbours != SPREAD_NEIGHBOURS:
            return self.bank.typical_spread(neighbours, sample)
        return self.spreads.typical

    def bytes_per_vector(self) -> int:
        """The wrapped index's bytes per vector (the groups and the spread table: `memory_bytes`)."""
        return self.bank.bytes_per_vector()

    def ids(self) -> np.ndarray:
        return self.bank.ids()

    def memory_bytes(self) -> int:
        """The wrapped index's bytes plus the groups (8 bytes a vector) and the float16 spread table (2 + 8)."""
        extra = self.groups.ids.nbytes + self.groups.offsets.nbytes + self.groups.images.nbytes
        if self.spreads is not None:
            extra += self.spreads.ids.nbytes + self.spreads.values.nbytes
        return self.bank.memory_bytes() + extra


def scoring_bank(patches, images: VectorIndex, owners: Callable[[], np.ndarray], setting: str,
                 spreads: SpreadTable | None = None):
    """The bank to score against: `patches` itself, or a TwoStageBank over it when SearchConfig.two_stage `setting`
    says so for its size (`vectors.uses_two_stage`) and there are pooled image vectors to retrieve by.
    `owners()` gives the (N, 2) [patch id, image id] rows (`Catalog.vector_owners`), read only then."""
    if getattr(patches, "two_stage", False) or not images.ntotal or not uses_two_stage(setting, patches.ntotal):
        return patches
    return TwoStageBank.build(patches, images, owners(), spreads)
