"""Coreset subsampling of the patch bank: greedy k-center (PatchCore).

Greedy k-center picks, again and again, the vector farthest from everything picked so far, so the
kept subset covers the bank with the smallest radius it can find greedily (within twice the optimum).

Cost on a CPU: distances are computed on a random Gaussian projection to `projection_dim` dimensions
(Johnson-Lindenstrauss: squared distances are preserved in expectation, each within about
sqrt(2 / projection_dim) relative spread). Each pick costs one matrix-vector product over the
projected (N, projection_dim) float32 copy (||x||^2 - 2 x.c + ||c||^2, squared norms precomputed) and an
incremental min-update of the (N,) nearest-pick distances: memory is O(N * projection_dim), never N x N,
and the time is O(N * n_select * projection_dim), bound by memory bandwidth. The numpy (BLAS) matrix-vector
product is used rather than torch's, which was about 4x slower on CPU for this shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .errors import BadInput
from .runtime import tuned_faiss

faiss = tuned_faiss()

CHUNK = 65_536  # rows per block when comparing against an existing bank or measuring coverage


@dataclass
class Coreset:
    indices: np.ndarray  # (n_select,) int64 positions in the input, in pick order
    radius: float  # coverage radius in the projected space (see `select_coreset`)
    projected: bool  # whether `radius` was measured on a random projection (False: the original space)


def coreset_size(n: int, ratio: float | None = None, size: int | None = None) -> int:
    """How many of `n` vectors to keep, from a ratio in (0, 1] or an absolute size >= 1 (exactly one)."""
    if (ratio is None) == (size is None):
        raise ValueError("give exactly one of ratio and size")
    if n <= 0:
        return 0
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        return int(min(n, max(1, round(ratio * n))))
    if int(size) != size or size < 1:
        raise ValueError(f"coreset size must be an integer >= 1, got {size}")
    return int(min(n, size))


def _as_f32(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors)
    if v.ndim != 2:
        raise ValueError(f"vectors must be (N, D), got {v.shape}")
    return np.ascontiguousarray(v, dtype=np.float32)


def _projection(dim: int, projection_dim: int, seed: int) -> np.ndarray | None:
    if dim <= projection_dim:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim, projection_dim)) / np.sqrt(projection_dim)).astype(np.float32)


def _project(v: np.ndarray, proj: np.ndarray | None) -> np.ndarray:
    if proj is None:
        return v
    out = np.empty((len(v), proj.shape[1]), np.float32)
    for start in range(0, len(v), CHUNK):
        np.matmul(v[start:start + CHUNK], proj, out=out[start:start + CHUNK])
    return out


def _nearest(x: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) squared L2 distance from each row of x to its nearest row of `others` and that row's index,
    a faiss flat search in blocks of `others` (no N x M matrix)."""
    best = np.full(len(x), np.inf, np.float32)
    where = np.zeros(len(x), np.int64)
    for start in range(0, len(others), CHUNK):
        block = np.ascontiguousarray(others[start:start + CHUNK])
        d2, i = faiss.knn(x, block, 1)
        better = d2[:, 0] < best
        best[better] = d2[better, 0]
        where[better] = i[better, 0] + start
    return np.maximum(best, 0.0), where


def _greedy(x: np.ndarray, n_select: int, min_d2: np.ndarray, first: int) -> tuple[np.ndarray, float]:
    """Greedy k-center on x (N, P) float32 from the starting squared distances `min_d2` (modified in place).

    Returns the picks and the squared coverage radius after the last pick (max over unpicked points).
    """
    sq_norms = np.einsum("ij,ij->i", x, x)
    d2 = np.empty(len(x), np.float32)
    selected = np.empty(n_select, dtype=np.int64)
    current = first
    for i in range(n_select):
        selected[i] = current
        c = x[current]
        np.matmul(x, c, out=d2)  # x.c, one BLAS gemv over the projected copy
        d2 *= -2.0
        d2 += sq_norms
        d2 += float(c @ c)
        np.maximum(d2, 0.0, out=d2)  # rounding can make a duplicate's distance slightly negative
        np.minimum(min_d2, d2, out=min_d2)
        min_d2[current] = -np.inf  # never picked twice, even among exact duplicates (distance 0)
        current = int(np.argmax(min_d2))
    return selected, max(float(min_d2[current]), 0.0)


def select_coreset(vectors: np.ndarray, *, ratio: float | None = None, size: int | None = None,
                   existing: np.ndarray | None = None, existing_distances: np.ndarray | None = None,
                   projection_dim: int = 128, seed: int = 0) -> Coreset:
    """Greedy k-center subset of `vectors` (N, D), sized by `ratio` or `size` (see `coreset_size`).

    `existing` (M, D): vectors already in the bank; selection starts from them, so new vectors close
    to the existing bank are picked last. Comparing against the whole bank costs N x M distances;
    `existing_distances` (N,) is the cheaper alternative: each new vector's L2 distance to its nearest
    bank vector as the bank's own index reports it (e.g. `bank.search(vectors, 1)[0][:, 0]`, approximate
    for IVF kinds). Those distances are in the original space, mixed with projected distances for the
    new picks; the projection preserves squared distances in expectation, so the mix is consistent up
    to the projection's spread. Both may be given (the smaller distance wins).

    `radius` is the coverage radius the greedy search reaches: the largest distance from any vector
    (new ones; the bank counts as covered) to its nearest pick or bank vector, measured in the
    projected space when D > projection_dim (`projected` says which). It is 0 when every vector is
    picked. For the radius in the original space, call `coverage_radius`.
    """
    x = _as_f32(vectors)
    n, dim = x.shape
    n_select = coreset_size(n, ratio, size)
    if n_select == n:
        return Coreset(np.arange(n, dtype=np.int64), 0.0, dim > projection_dim)
    if existing is not None and len(existing):
        e = _as_f32(existing)
        if e.shape[1] != dim:
            raise ValueError(f"existing vectors must be (M, {dim}), got {e.shape}")
        proj = _projection(dim, projection_dim, seed)
        to_existing = np.sqrt(_nearest(_project(x, proj), _project(e, proj))[0])
        if existing_distances is not None:
            to_existing = np.minimum(to_existing, np.asarray(existing_distances, np.float32).reshape(to_existing.shape))
        existing_distances = to_existing
    return select_coreset_blocks(lambda: iter([x]), n, dim, size=n_select, existing_distances=existing_distances,
                                 projection_dim=projection_dim, seed=seed)


def select_coreset_blocks(blocks: Callable[[], Iterable[np.ndarray]], n: int, dim: int, *,
                          ratio: float | None = None, size: int | None = None,
                          existing_distances: np.ndarray | None = None, projection_dim: int = 128,
                          seed: int = 0) -> Coreset:
    """`select_coreset` over N = `n` vectors of `dim` dimensions that `blocks()` yields as (m, dim)
    blocks (called once), for a set too large to hold: only its projection, (n, min(dim,
    projection_dim)) float32, is kept. `existing_distances` as in `select_coreset`. The same picks as
    `select_coreset` on the concatenated blocks."""
    n_select = coreset_size(n, ratio, size)
    projected = dim > projection_dim
    if n_select == n:
        return Coreset(np.arange(n, dtype=np.int64), 0.0, projected)
    rng = np.random.default_rng(seed)
    proj = _projection(dim, projection_dim, seed)
    xp = np.empty((n, proj.shape[1] if proj is not None else dim), np.float32)
    filled = 0
    for block in blocks():
        b = _as_f32(block)
        if b.shape[1] != dim or filled + len(b) > n:
            raise ValueError(f"blocks must be (m, {dim}) and hold {n} vectors in all")
        xp[filled:filled + len(b)] = _project(b, proj)
        filled += len(b)
    if filled != n:
        raise ValueError(f"the blocks held {filled} vectors, not the {n} announced")
    min_d2 = np.full(n, np.inf, np.float32)
    if existing_distances is not None:
        ed = np.asarray(existing_distances, dtype=np.float32).reshape(-1)
        if ed.shape != (n,):
            raise ValueError(f"existing_distances must be ({n},), got {ed.shape}")
        np.minimum(min_d2, np.square(np.maximum(ed, 0.0)), out=min_d2)
    first = int(np.argmax(min_d2)) if np.isfinite(min_d2).any() else int(rng.integers(n))
    selected, radius2 = _greedy(xp, n_select, min_d2, first)
    return Coreset(selected, float(np.sqrt(radius2)), projected)


def coverage_radius(vectors: np.ndarray, selected: np.ndarray, existing: np.ndarray | None = None) -> float:
    """Largest L2 distance, in the original space, from any of `vectors` to its nearest selected vector
    (or `existing` vector, when given). Exact: a faiss flat search in blocks, O(N x n_selected) time and
    O(N) memory."""
    x = _as_f32(vectors)
    centres = x[np.asarray(selected, dtype=np.int64)]
    if existing is not None and len(existing):
        centres = np.concatenate([centres, _as_f32(existing)])
    if not len(x):
        return 0.0
    if not len(centres):
        raise ValueError("no selected or existing vectors to measure coverage from")
    worst = 0.0
    for start in range(0, len(x), CHUNK):
        block = x[start:start + CHUNK]
        _, nearest = _nearest(block, centres)
        # the search finds the nearest centre; its distance is recomputed directly, without the
        # rounding of ||x||^2 - 2 x.c + ||c||^2 (a point's distance to itself comes out 0)
        worst = max(worst, float(np.linalg.norm(block - centres[nearest], axis=1).max()))
    return worst


# -- samplers: which of an add's new patch vectors the bank keeps --------------------------------------
class KeepAll:
    """Keep every new vector (the default: PatchCore's full bank)."""

    uses_existing_distances = False  # whether `select` wants each new vector's distance to the bank

    def select(self, blocks: Callable[[], Iterable[np.ndarray]], n: int, dim: int,
               existing_distances: np.ndarray | None = None) -> np.ndarray:
        """(n,) int64 positions, in order, of the vectors kept from the `n` that `blocks()` yields."""
        return np.arange(n, dtype=np.int64)


class CoresetSampler(KeepAll):
    """Keep `ratio` of the new vectors: a greedy k-center coreset against the existing bank
    (`existing_distances`: each new vector's distance to it), as PatchCore subsamples its bank."""

    uses_existing_distances = True

    def __init__(self, ratio: float):
        if not 0 < ratio <= 1:
            raise BadInput(f"coreset ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio

    def select(self, blocks, n, dim, existing_distances=None):
        picked = select_coreset_blocks(blocks, n, dim, ratio=self.ratio, existing_distances=existing_distances)
        return np.sort(picked.indices)


def sampler_for(ratio: float | None) -> KeepAll:
    """The sampler an add's `coreset` option names: None or 1 keeps everything."""
    return KeepAll() if ratio is None or ratio == 1 else CoresetSampler(ratio)
