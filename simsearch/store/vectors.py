"""FAISS vector storage with stable ids, behind one small interface.

Kinds (`KINDS`, plus "auto" for `choose_kind`), with the index's own bytes per stored vector
(codes + the 8-byte id; see `VectorIndex.bytes_per_vector`):
- "flat": exact search (IndexIDMap2 over IndexFlatL2), 4 * D + 8 bytes; the default while the bank is small.
- "ivf-flat": inverted lists over full float32 vectors (approximate in which lists are searched only),
  4 * D + 8 bytes.
- "ivf-sq8": inverted lists over 8-bit scalar-quantized residuals (IndexIVFScalarQuantizer QT_8bit),
  D + 8 bytes. Chosen by "auto" from `APPROX_FROM` vectors: about a quarter of flat's memory, distances
  within a fraction of a percent of the exact ones, and faster to scan than ivf-flat.
- "ivf-pq": inverted lists over product-quantized residuals (IndexIVFPQ, 8-bit codes, sub-vectors of
  2 to 4 dimensions, see `pq_subquantizers`), about D / 2 + 8 bytes. Smallest; its distances are those
  to the quantized vectors, a few percent off, and its recall@1 is the lowest (no exact re-ranking:
  IndexRefineFlat would keep a float32 copy of every vector, more memory than flat).
- "hnsw": a navigable small-world graph over full float32 vectors (IndexHNSWFlat, `HNSW_LINKS` links per
  vector), 4 * D + 8 + 8 * `HNSW_LINKS` bytes (the base level's links; more memory than flat). Never picked by
  "auto": the fastest search at recall@1 >= 0.95 on a 1M bank, but a slow build, and faiss HNSW cannot
  remove ids, so `remove` rebuilds the graph from the vectors kept (exact: they are stored in full).
All support add with ids and remove by id. Distances returned are L2 (not squared). The lossy kinds
(ivf-sq8, ivf-pq) search and return distances to their quantized vectors, and `all_vectors` gives back
reconstructions (approximations), not the vectors that were added.
Each kind is a strategy object in `kinds.py` (`KIND_STRATEGIES`); `VectorIndex` delegates to it.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np

from ..faults import crash_point
from .kinds import (HNSW_BUILD_BREADTH, HNSW_LINKS, HNSW_SEARCH_BREADTH, ID_BYTES, KIND_STRATEGIES,  # noqa: F401
                    PQ_TRAIN, TRAIN_PER_LIST, default_nprobe, direct_l2, ivf_lists_for, kind_of, pq_subquantizers,
                    sample_positions, sort_rows, strategy)

APPROX_FROM = 200_000  # bank size from which "auto" switches from exact to an approximate index
AUTO_APPROX_KIND = "ivf-sq8"  # what "auto" picks from APPROX_FROM vectors (see docs/benchmarks.md)
TWO_STAGE_FROM = APPROX_FROM  # bank size from which two_stage "auto" searches in two stages (store/twostage.py)
KINDS = ("auto",) + tuple(KIND_STRATEGIES)  # ("auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
IVF_KINDS = tuple(name for name, kind in KIND_STRATEGIES.items() if kind.needs_training)
LOSSY_KINDS = tuple(name for name, kind in KIND_STRATEGIES.items() if kind.lossy)  # stored vectors approximated
SPREAD_NEIGHBOURS = 8  # how many neighbours `VectorIndex.spread` averages over


def _check(vectors: np.ndarray, dim: int, name: str = "vectors") -> np.ndarray:
    v = np.asarray(vectors)
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"{name} must be (N, {dim}), got {v.shape}")
    if v.dtype != np.float32:
        v = v.astype(np.float32)
    return np.ascontiguousarray(v)


def _check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    i = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    if i.shape != (n,):
        raise ValueError(f"ids must be ({n},), got {i.shape}")
    return i


def default_search_breadth(kind: str, nlist: int | None = None) -> int | None:
    """What `VectorIndex.nprobe` is unless set: `default_nprobe(nlist)` lists for an IVF kind,
    `HNSW_SEARCH_BREADTH` (efSearch) for hnsw, None for flat (exhaustive) and any other name."""
    return KIND_STRATEGIES[kind].default_breadth(nlist) if kind in KIND_STRATEGIES else None


def bytes_per_vector(kind: str, dim: int) -> int:
    """Bytes an index of `kind` spends per stored vector of `dim` float32 dimensions (code + 8-byte id),
    without building one; `VectorIndex.bytes_per_vector` reports the same for a live index.
    flat, ivf-flat: 4 * dim + 8; ivf-sq8: dim + 8; ivf-pq: one byte per sub-quantizer + 8 (trained on
    fewer than 256 vectors it uses smaller codebooks and codes: the live index says); hnsw: 4 * dim + 8 plus
    its base level's 2 * `HNSW_LINKS` int32 links (upper levels, about 1 in `HNSW_LINKS` vectors, add a few
    bytes on average: `VectorIndex.memory_bytes` counts them)."""
    return strategy(kind).bytes_per_vector(dim)


def training_count(kind: str, nlist: int) -> int:
    """How many vectors an IVF index of `kind` with `nlist` lists is trained on (at most; 0 for flat, hnsw)."""
    return strategy(kind).training_count(nlist)


class VectorIndex:
    """A FAISS index holding (id -> vector); `kind` names its strategy (`kinds.IndexKind`), which does
    all that differs between kinds. Distances are L2, not squared."""

    spread_neighbours = SPREAD_NEIGHBOURS  # what `spread` averages over unless told: scoring asks the bank

    def __init__(self, index: faiss.Index, nprobe: int | None = None):
        self.index = index
        self.dim = index.d
        self._kind = kind_of(index)
        if nprobe is not None:
            self.nprobe = nprobe
        self._typical_spread: tuple[int, float] | None = None  # (neighbours, value), see typical_spread
        self._map_lock = threading.Lock()
        self._stored: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # search_near's id -> position map

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def flat(cls, dim: int) -> "VectorIndex":
        return cls.create("flat", dim)

    @classmethod
    def hnsw(cls, dim: int) -> "VectorIndex":
        return cls.create("hnsw", dim)

    @classmethod
    def create(cls, kind: str, dim: int, training: np.ndarray | None = None,
               nlist: int | None = None) -> "VectorIndex":
        """An empty index of `kind` ("flat", "hnsw" or one of `IVF_KINDS`; not "auto": see `choose_kind`).

        IVF kinds are trained on `training` (N, dim): the coarse k-means (`nlist` lists, default
        `ivf_lists_for(N)`) and, for ivf-sq8 / ivf-pq, the quantizer of the residuals. flat and hnsw
        need no training.
        """
        how = strategy(kind)
        if not how.needs_training:
            return cls(how.build(dim))
        if training is None or not len(training):
            raise ValueError("an IVF index is trained on its vectors: it cannot be built empty")
        return cls(how.build(dim, _check(training, dim, "training vectors"), nlist))

    @classmethod
    def from_vectors(cls, kind: str, vectors: np.ndarray, ids: np.ndarray | None = None,
                     nlist: int | None = None) -> "VectorIndex":
        """An index of `kind` ("auto" resolved by size) trained on and holding `vectors` (N, D) (ids (N,),
        default 0..N-1)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (N, D), got {vectors.shape}")
        kind = choose_kind(kind, len(vectors))
        out = cls.create(kind, vectors.shape[1], vectors if kind in IVF_KINDS else None, nlist)
        if len(vectors):
            out.add(vectors, np.arange(len(vectors)) if ids is None else ids)
        return out

    def clone(self) -> "VectorIndex":
        """A deep copy (same kind, search breadth and vectors) that changes independently of this one: a
        writer builds the next generation on it while readers keep searching this one."""
        with self._map_lock:  # not while a reconstruct builds an IVF id map
            copy = VectorIndex(faiss.clone_index(self.index), nprobe=self.nprobe)
        copy._typical_spread = self._typical_spread
        return copy

    # -- what kind -------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """One of `KINDS[1:]`, or the faiss type name of an index not made here."""
        return self._kind.name

    @property
    def lossy(self) -> bool:
        """True when the index stores approximations of the vectors (ivf-sq8, ivf-pq)."""
        return self._kind.lossy

    @property
    def nlist(self) -> int | None:
        """The number of inverted lists of an IVF kind, None for flat and hnsw."""
        return self._kind.nlist(self.index)

    @property
    def nprobe(self) -> int | None:
        """How widely an approximate search looks: the IVF lists searched per query (clamped to
        1..nlist), or hnsw's efSearch (candidates kept while walking the graph); None for flat (exhaustive)."""
        return self._kind.breadth(self.index)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._kind.set_breadth(self.index, value)

    def use_nprobe(self, value: int | None) -> None:
        """Search with breadth `value`, or with None `default_search_breadth` of this index (the engine
        calls it on every bank it loads: the policy of the running code wins over the breadth a file was
        saved with). No effect on flat."""
        default = self._kind.default_breadth(self.nlist)
        if default is not None:
            self.nprobe = default if value is None else value

    def bytes_per_vector(self) -> int:
        """Bytes the index itself spends per stored vector: its code plus the 8-byte id (see the module's
        table; IVF kinds: the inverted lists' code size, which a tiny ivf-pq bank makes smaller)."""
        return self._kind.code_bytes(self.index) + ID_BYTES

    def memory_bytes(self) -> int:
        """Approximate bytes held: `bytes_per_vector` x ntotal plus the fixed trained parts (coarse
        centroids, quantizer tables, ivf-pq's precomputed residual table); for hnsw, the vectors, ids and
        every level's links with their per-vector level and offset."""
        return self._kind.memory_bytes(self.index)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # -- data -----------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """(n, D) vectors under (n,) int64 ids."""
        v = _check(vectors, self.dim)
        self._typical_spread = self._stored = None
        self.index.add_with_ids(v, _check_ids(ids, len(v)))

    def remove(self, ids: np.ndarray) -> int:
        """(n,) ids -> how many of them were held and are now gone. hnsw rebuilds its graph from the
        vectors kept: it takes as long as a build."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return 0
        self._typical_spread = self._stored = None
        self.index, gone = self._kind.remove(self.index, ids)
        return gone

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(n,) stored ids -> (n, D) float32 vectors (reconstructions for the lossy kinds).

        An IVF index first gets an id -> list hash map (about 16 bytes per vector in memory and on disk).
        """
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        with self._map_lock:  # queries in server threads may get here together; build the map once
            self._kind.prepare_reconstruct(self.index)
        try:
            return np.ascontiguousarray(self.index.reconstruct_batch(ids), np.float32)
        except RuntimeError as exc:
            raise KeyError(f"an id is not in the index ({str(exc).splitlines()[0][:120]})") from None

    def spread(self, ids: np.ndarray, neighbours: int = SPREAD_NEIGHBOURS) -> np.ndarray:
        """(n,) stored ids -> (n,) float32: the mean distance from each of those stored vectors to its
        `neighbours` nearest other stored vectors (how sparse the bank is around it)."""
        if self.ntotal <= neighbours:
            raise ValueError(f"a spread over {neighbours} neighbours needs more than {neighbours} stored vectors")
        distances, _ = self.search(self.reconstruct(ids), neighbours + 1)
        return distances[:, 1:].mean(axis=1)  # the first is the vector itself (or an exact duplicate)

    def typical_spread(self, neighbours: int = SPREAD_NEIGHBOURS, sample: int = 4000) -> float:
        """The median `spread` over `sample` stored vectors (all of them in a smaller bank), picked by their
        content (`content_sample`), never by their ids: the same vectors give the same value whatever their ids
        and order, so removing images and adding them again gives the same scores back. Kept until the index
        changes."""
        if self._typical_spread is None or self._typical_spread[0] != neighbours:
            ids = self.ids() if self.ntotal <= sample else content_sample(self.iter_vectors(), sample)
            self._typical_spread = (neighbours, float(np.median(self.spread(ids, neighbours))))
        return self._typical_spread[1]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> (M, k) L2 distances (float32, not squared) and (M, k) ids (-1 = none)."""
        q = _check(queries, self.dim, "queries")
        if self.ntotal == 0:
            raise ValueError("the index holds no vectors")
        d2, ids = self.index.search(q, k)
        d = np.sqrt(np.maximum(d2, 0.0))
        if self._kind.blas_distances:
            found = ids >= 0
            neighbours = np.zeros(ids.shape + (self.dim,), np.float32)
            neighbours[found] = self.index.reconstruct_batch(np.ascontiguousarray(ids[found]))
            d, ids = sort_rows(np.where(found, direct_l2(q, neighbours), d), ids)
        return d, ids

    def search_near(self, queries: np.ndarray, k: int, near_ids: np.ndarray, near_distances: np.ndarray,
                    breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """Like `search`, for (M, D) queries each with a stored vector already known to be near it: (M,) ids
        (-1 = none) and (M,) L2 distances to them (a cheaper first search's answers). A graph kind (hnsw) walks
        its base level from there with `breadth` candidates instead of descending from its entry point at its
        own breadth; the other kinds, and queries without a start, search as `search` does."""
        q = _check(queries, self.dim, "queries")
        near_ids = np.asarray(near_ids, np.int64).reshape(-1)
        if not self._kind.walks_graph or not len(q) or self.ntotal == 0:
            return self.search(q, k)
        with self._map_lock:
            if self._stored is None:  # ids in storage order, their argsort, the ids sorted
                stored = self._kind.ids(self.index)
                order = np.argsort(stored, kind="stable")
                self._stored = (stored, order, stored[order])
        stored, order, ascending = self._stored
        pos = order[np.minimum(np.searchsorted(ascending, near_ids), len(order) - 1)]
        known = stored[pos] == near_ids
        d, ids = np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
        if known.any():
            d2, at = self._kind.search_from(self.index, q[known], k, pos[known],
                                            np.square(np.asarray(near_distances, np.float32).reshape(-1)[known]),
                                            breadth)
            d[known] = np.sqrt(np.maximum(d2, 0.0))
            ids[known] = np.where(at >= 0, stored[np.maximum(at, 0)], -1)
        if not known.all():
            d[~known], ids[~known] = self.search(q[~known], k)
        return d, ids

    def ids(self) -> np.ndarray:
        """(N,) int64: every id held, without reading the vectors."""
        return self._kind.ids(self.index)

    def iter_vectors(self, block: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (id, vector) held, in blocks of about `block`: (n,) int64 and (n, D) float32 each,
        in the order `all_vectors` gives. Memory: one block (plus one inverted list), not the bank.

        flat, ivf-flat and hnsw give back the vectors exactly as added. ivf-sq8 and ivf-pq store only
        codes: their vectors are reconstructions (each list's centroid plus the decoded residual),
        approximations whose error is that of the quantizer (see `lossy`).
        """
        return self._kind.iter_vectors(self.index, block)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) held: (N,) int64 and (N, D) float32 (see `iter_vectors`: lossy kinds give
        reconstructions). Used to rebuild as another kind and by the evaluation."""
        blocks = list(self.iter_vectors())
        if not blocks:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return (np.concatenate([b[0] for b in blocks]),
                np.ascontiguousarray(np.concatenate([b[1] for b in blocks]), np.float32))

    def grown_as(self, kind: str, more: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                 n_more: int) -> "VectorIndex":
        """A new index of `kind` ("flat", "hnsw" or one of `IVF_KINDS`) holding this one's vectors and then
        the ((m, D) vectors, (m,) ids) blocks that `more()` yields (`n_more` vectors in all; `more` is called
        twice for an IVF kind, which is trained on a sample of all of them, see `build_from_blocks`).
        Memory: the new index plus one block and the training sample; this index is left unchanged.

        This index's vectors come from `iter_vectors`: when it is lossy (ivf-sq8, ivf-pq), the new one
        holds (and, for an IVF kind, is trained on) its reconstructions, not the vectors first added, and
        quantizing them again adds the new kind's error on top. To rebuild without that loss, keep the
        original vectors elsewhere and use `from_vectors`. The vectors from `more` are always exact.
        """
        def blocks():
            for ids, vectors in self.iter_vectors():
                yield vectors, ids
            yield from more()
        return build_from_blocks(kind, self.dim, self.ntotal + n_more, blocks)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file, fsynced, then renamed over `path`."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        crash_point(f"wrote {tmp.name}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        crash_point(f"fsynced {tmp.name}")
        os.replace(tmp, path)
        crash_point(f"renamed to {path.name}")
        fsync_directory(path.parent)

    @classmethod
    def load(cls, path: str | Path) -> "VectorIndex":
        """The index saved at `path`, its kind recognised from the faiss types in the file."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            if not Path(path).exists():  # deleted by a writer between listing and reading
                raise FileNotFoundError(f"{path}: no such file") from None
            raise ValueError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[0][:200]})") from None
        return cls(index)


def build_from_blocks(kind: str, dim: int, n: int,
                      blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]) -> VectorIndex:
    """An index of `kind` ("flat", "hnsw" or an IVF kind) over the `n` vectors that `blocks()` yields as
    ((m, dim) float32 vectors, (m,) int64 ids) blocks, without holding them all at once.

    An IVF kind is trained on the sample `sample_positions(n, training_count(kind, nlist))` picks
    (one pass through `blocks()` gathers it), then filled (a second pass): the same index as
    `create(kind, dim, all_vectors)` followed by one add of all of them.
    """
    if strategy(kind).needs_training:
        nlist = ivf_lists_for(n)
        pick = sample_positions(n, training_count(kind, nlist))
        sample, seen = [], 0
        for vectors, _ in blocks():
            lo, hi = np.searchsorted(pick, [seen, seen + len(vectors)])
            sample.append(_check(vectors, dim)[pick[lo:hi] - seen])
            seen += len(vectors)
        if seen != n:
            raise ValueError(f"the blocks held {seen} vectors, not the {n} announced")
        index = VectorIndex.create(kind, dim, np.concatenate(sample), nlist)
    else:
        index = VectorIndex.create(kind, dim)
    added = 0
    for vectors, ids in blocks():
        if len(ids):
            index.add(vectors, ids)
            added += len(ids)
    if added != n:
        raise ValueError(f"the blocks held {added} vectors, not the {n} announced")
    return index


def content_sample(blocks: Iterable[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """The ids of the `n` vectors with the smallest hash of their bytes, from ((m,) ids, (m, D) vectors) blocks:
    a uniform sample that depends on the set of vectors only (one pass, memory for one block and `n` keys)."""
    best_keys, best_ids = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    weights = None
    for ids, vectors in blocks:
        words = np.ascontiguousarray(vectors, np.float32).view(np.uint32).astype(np.uint64)
        if weights is None:  # odd multipliers, fixed: a multiply-add hash of the float bits, then mixed
            weights = np.random.default_rng(0).integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
        with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
            keys = (words * weights).sum(axis=1, dtype=np.uint64)
            keys ^= keys >> np.uint64(31)
            keys *= np.uint64(0x9E3779B97F4A7C15)
            keys ^= keys >> np.uint64(29)
        best_keys, best_ids = np.concatenate([best_keys, keys]), np.concatenate([best_ids, ids])
        if len(best_keys) > n:
            keep = np.argpartition(best_keys, n - 1)[:n]
            best_keys, best_ids = best_keys[keep], best_ids[keep]
    return np.sort(best_ids)


def fsync_directory(directory: str | Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def uses_two_stage(setting: str, n_vectors: int) -> bool:
    """Whether a bank of `n_vectors` is searched in two stages under SearchConfig.two_stage `setting`
    ("on", "off", or "auto": from `TWO_STAGE_FROM` vectors, where docs/benchmarks.md measured it faster)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"two stage must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and n_vectors >= TWO_STAGE_FROM)


def choose_kind(requested: str, n_vectors: int) -> str:
    """The kind to build for `n_vectors`: `requested` itself, or for "auto" exact "flat" below
    `APPROX_FROM` vectors and `AUTO_APPROX_KIND` from there on."""
    if requested not in KINDS:
        raise ValueError(f"unknown index kind {requested!r}; choose from {KINDS}")
    if requested != "auto":
        return requested
    return AUTO_APPROX_KIND if n_vectors >= APPROX_FROM else "flat"
