"""The spread table: every stored patch vector's spread (the mean distance to its 8 nearest stored neighbours),
which the sparse discount reads for each top patch's nearest reference (scoring.discounted).

Computing it is the costly part of a two-stage bank (about 50 s per million vectors on 2 cores), so the writer
computes it when it publishes a generation and saves it beside that generation's FAISS files
(`spreads.g000008.safetensors`, recorded and checked like them: bankfiles.py). A reader never waits for it,
not after an add and not after a restart. A small add does not recompute it: the new vectors' spreads come from
the bank's own search and the old ones are kept (a new neighbour can only shorten an old vector's spread, so
kept values run a little high, and the discount errs on the side of a higher score). Once the vectors added or
removed since the last full computation pass STALE_FRACTION of it, the next publish computes it in full again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..faults import crash_point
from .kinds import faiss, flat_knn
from .vectors import SPREAD_NEIGHBOURS, VectorIndex, fsync_directory

# coarse cells besides its own among which a stored vector's spread neighbours are sought: with fewer, more are
# missed and the discount's spreads run high (docs/benchmarks.md, "Two-stage search": 4 cells lost up to 0.0023
# more image AUROC on Magnetic Tile)
SPREAD_PROBE = 12
# vectors added or removed since the table was last computed in full, as a share of the vectors then, past
# which a publish computes it in full again
STALE_FRACTION = 0.2
# `bank_spreads`: one k-means of sqrt(N) cells up to this many cells (1M vectors); beyond, cells of CELL_VECTORS
# found in two levels (one k-means of N / 1,000 cells would cost N^2 / 1,000 distances to assign)
FLAT_CELLS = 1024
CELL_VECTORS = 1000
FORMAT = "simsearch-spreads-1"


def bank_spreads(vectors: np.ndarray, neighbours: int = SPREAD_NEIGHBOURS, probe: int = SPREAD_PROBE,
                 seed: int = 0, flat_cells: int = FLAT_CELLS, cell_vectors: int = CELL_VECTORS) -> np.ndarray:
    """(N, D) stored vectors -> (N,) float32: each one's mean L2 distance to its `neighbours` nearest others,
    sought exactly among the vectors of its own k-means cell and of the `probe` cells nearest it: what
    `VectorIndex.spread` measures, at IVF-like recall, for every vector at once.

    Cells of about sqrt(N) vectors up to `flat_cells` cells (1M vectors), found by one k-means; beyond, cells of
    `cell_vectors` found in two levels (`two_level_cells`), so that the cost stays linear in N: about
    N * (probe + 1) * min(sqrt(N), cell_vectors) distances as BLAS products (1M vectors: 49 s on 2 cores,
    `bench/perf.py --steps spread-table`).
    """
    x = np.ascontiguousarray(vectors, np.float32)
    n = len(x)
    if n <= neighbours:
        raise ValueError(f"a spread over {neighbours} neighbours needs more than {neighbours} vectors")
    cells = int(max(1, min(round(np.sqrt(n)), n // 64)))
    if cells == 1:
        d, _ = flat_knn(x, x, np.arange(n), neighbours + 1)
        return d[:, 1:].mean(axis=1)
    if cells > flat_cells:
        cell_of, centroids = two_level_cells(x, max(flat_cells, n // cell_vectors), seed)
    else:
        cell_of, centroids = kmeans_cells(x, cells, seed)
    cells = len(centroids)
    _, near_cells = faiss.knn(centroids, centroids, min(probe + 1, cells))
    order, bounds = grouped(cell_of, cells)
    out = np.zeros(n, np.float32)
    for c in range(cells):
        members = order[bounds[c]:bounds[c + 1]]
        if not len(members):
            continue
        pool = np.concatenate([order[bounds[j]:bounds[j + 1]] for j in near_cells[c] if j >= 0])
        d, _ = flat_knn(x[members], x[pool], pool, neighbours + 1)
        out[members] = np.where(np.isfinite(d[:, 1:]), d[:, 1:], np.nan).mean(axis=1)
    return np.nan_to_num(out, nan=float(np.nanmedian(out)))


def two_level_cells(x: np.ndarray, cells: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 vectors -> (N,) int64 cell of each and (C, D) float32 cell centres, C about `cells`: a
    k-means of about sqrt(cells) groups, then a k-means within each group sized by its share of N. Assigning N
    vectors costs N * 2 * sqrt(cells) distances instead of N * cells for one k-means of that many cells."""
    n = len(x)
    groups = max(2, int(round(np.sqrt(cells))))
    group_of, _ = kmeans_cells(x, groups, seed)
    order, bounds = grouped(group_of, groups)
    cell_of = np.zeros(n, np.int64)
    centres = []
    for g in range(groups):
        members = order[bounds[g]:bounds[g + 1]]
        if not len(members):
            continue
        part = x[members]
        k = int(min(max(1, round(cells * len(members) / n)), len(members) // 2 or 1))
        if k == 1:
            found, centre = np.zeros(len(members), np.int64), part.mean(axis=0, keepdims=True)
        else:
            found, centre = kmeans_cells(part, k, seed)
        cell_of[members] = sum(len(c) for c in centres) + found
        centres.append(np.asarray(centre, np.float32))
    return cell_of, np.ascontiguousarray(np.concatenate(centres))


def kmeans_cells(x: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 vectors -> (N,) int64 cell of each and (k, D) float32 centres of a k-means (10 rounds on at
    most 64 points a centre)."""
    km = faiss.Kmeans(x.shape[1], k, niter=10, seed=seed, max_points_per_centroid=64)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0], km.centroids


def grouped(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels in [0, count) -> positions sorted by label and (count + 1,) bounds: label c's positions are
    order[bounds[c]:bounds[c + 1]]."""
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(count + 1))


@dataclass(frozen=True)
class SpreadTable:
    """Spreads by stored id. `ids`: (N,) int64, sorted and unique; `values`: (N,) float16 spreads (over
    SPREAD_NEIGHBOURS neighbours); `full_count`: vectors when it was last computed in full; `changed`: vectors
    added or removed since."""

    ids: np.ndarray
    values: np.ndarray
    full_count: int
    changed: int = 0
    typical: float = field(init=False)  # the median spread: the discount's reference (scoring.discounted)

    def __post_init__(self) -> None:
        ids, values = np.asarray(self.ids), np.asarray(self.values)
        if ids.ndim != 1 or ids.dtype != np.int64 or values.shape != ids.shape or values.dtype != np.float16:
            raise ValueError(f"a spread table needs (N,) int64 ids and (N,) float16 values, got {ids.dtype} "
                             f"{ids.shape} and {values.dtype} {values.shape}")
        if len(ids) and not (np.diff(ids) > 0).all():
            raise ValueError("a spread table's ids must be sorted and unique")
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError("a spread table's values must be finite and >= 0")
        object.__setattr__(self, "typical", float(np.median(values.astype(np.float32))) if len(values) else 0.0)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def computed(cls, bank: VectorIndex) -> "SpreadTable":
        """Every stored vector's spread, in full (`bank_spreads`, one pass over `bank.all_vectors()`)."""
        held, vectors = bank.all_vectors()
        order = np.argsort(held)
        values = bank_spreads(vectors[order])
        return cls(np.ascontiguousarray(held[order], np.int64), values.astype(np.float16), len(held))

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) ids -> (n,) float32 spreads and (n,) bool: whether the table holds each id (else 0)."""
        ids = np.asarray(ids, np.int64)
        if not len(self.ids):
            return np.zeros(len(ids), np.float32), np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        found = self.ids[pos] == ids
        return np.where(found, self.values[pos].astype(np.float32), 0.0).astype(np.float32), found

    def matches(self, bank: VectorIndex) -> bool:
        """Whether the table holds exactly the bank's ids."""
        return np.array_equal(self.ids, np.sort(bank.ids()))

    def save(self, path: Path) -> None:
        """Write atomically (temporary name, fsync, rename, fsync of the folder) as safetensors."""
        from safetensors.numpy import save_file
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"ids": self.ids, "values": self.values}, str(tmp),
                  metadata={"format": FORMAT, "full_count": str(self.full_count), "changed": str(self.changed)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        crash_point(f"wrote {tmp.name}")
        os.replace(tmp, path)
        fsync_directory(path.parent)

    @classmethod
    def load(cls, path: Path) -> "SpreadTable":
        """The table saved at `path`. FileNotFoundError if it is gone, ValueError if it is not one."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
                return cls(fh.get_tensor("ids"), fh.get_tensor("values"), int(meta["full_count"]),
                           int(meta["changed"]))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a damaged file
            raise ValueError(f"{path}: not a readable spread table ({str(exc).splitlines()[0][:200]})") from None


def next_table(previous: SpreadTable | None, bank: VectorIndex) -> SpreadTable:
    """The spread table of `bank` (the next generation's patches), from `previous` (the committed generation's,
    or None) where that is still close enough: the same table when the ids are the same; the kept vectors' old
    values plus the new ones' from the bank's own search (`VectorIndex.spread`) while the vectors added or
    removed since the last full computation stay within STALE_FRACTION of it; otherwise computed in full."""
    ids = np.sort(bank.ids())
    if previous is not None and np.array_equal(previous.ids, ids):
        return previous
    if previous is None:
        return SpreadTable.computed(bank)
    kept = np.isin(previous.ids, ids, assume_unique=True)
    new = np.setdiff1d(ids, previous.ids, assume_unique=True)
    changed = previous.changed + int((~kept).sum()) + len(new)
    if changed > STALE_FRACTION * previous.full_count:
        return SpreadTable.computed(bank)
    merged_ids = np.concatenate([previous.ids[kept], new])
    merged = np.concatenate([previous.values[kept], bank.spread(new).astype(np.float16)]) if len(new) else \
        previous.values[kept]
    order = np.argsort(merged_ids)
    return SpreadTable(merged_ids[order], merged[order], previous.full_count, changed)
