"""The index kinds behind `VectorIndex`, one small strategy object each (the table is in `vectors.py`).

A strategy is stateless and shared (`KIND_STRATEGIES`): every method takes the faiss index it works on,
so adding a kind is one class plus one registry entry. `kind_of` names the strategy of a faiss index read
from a file; an index this module did not make gets a strategy named by its faiss type, never one of ours.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..runtime import tuned_faiss

faiss = tuned_faiss()

ID_BYTES = 8  # an int64 id per stored vector (the IDMap's id array, or an inverted list's ids)
HNSW_LINKS = 32  # faiss's M: links per vector on each upper level, twice that on the base level
HNSW_BUILD_BREADTH = 40  # efConstruction: candidates kept while linking a new vector
# efSearch unless set: recall@1 0.97 on 1M real patch vectors, 0.93 at 64 (docs/benchmarks.md, "hnsw").
HNSW_SEARCH_BREADTH = 128
TRAIN_PER_LIST = 64  # k-means training points per inverted list (faiss warns below 39)
# Inverted lists per sqrt(N): on 1M real vectors 4,096 lists reach recall@1 0.95 in half the time of 1,024
# (docs/benchmarks.md, "Two-stage search": bench/ivf_lists.py); past MAX_LISTS the k-means that trains them
# costs minutes.
LISTS_PER_ROOT = 4
MAX_LISTS = 4096
PQ_TRAIN = 256 * 40  # training points for the 256-centroid product-quantizer codebooks (faiss wants >= 39 per centroid)


def ivf_lists_for(n: int) -> int:
    """Number of inverted lists: about LISTS_PER_ROOT * sqrt(n), a power of two, at most MAX_LISTS, at least 64
    vectors per list."""
    nlist = 2 ** round(math.log2(max(LISTS_PER_ROOT * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(nlist, MAX_LISTS, n // 64)))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query unless set: 2 * sqrt(nlist), at least 32 (all of them up to 32 lists).

    Measured on real patch features at the defaults (docs/benchmarks.md, "Recall@1"): ivf-sq8, the kind
    "auto" picks, needed nprobe 32 at 256 lists, about 48 at 512 and 64 at 1024 for recall@1 >= 0.95.
    """
    return int(min(nlist, max(32, math.ceil(2 * math.sqrt(nlist)))))


def pq_subquantizers(dim: int) -> tuple[int, int]:
    """(padded dimension, number of sub-quantizers) for ivf-pq: PQ needs the dimension to be a multiple
    of the number of sub-vectors. The largest divisor m of `dim` with m <= dim / 2 (sub-vectors of 2
    dimensions for every even dim); when that leaves sub-vectors of more than 4 dimensions (an odd
    dimension without a divisor in [dim/4, dim/2], e.g. a prime), the vectors are padded with one zero
    dimension and split in pairs."""
    best = max((m for m in range(1, dim // 2 + 1) if dim % m == 0), default=1)
    if dim >= 2 and 4 * best >= dim:
        return dim, best
    padded = dim + dim % 2
    return padded, max(1, padded // 2)


def sample_positions(n: int, count: int) -> np.ndarray:
    """(min(n, count),) sorted int64 positions of the training sample drawn from n vectors (seeded)."""
    if n <= count:  # k-means cost grows with the sample: keep it small
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(n, count, replace=False)).astype(np.int64)


def _id_map_inner(index: faiss.Index) -> faiss.Index | None:
    """The index inside our IndexIDMap2 (flat, hnsw), None for any other index."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The inverted-file part: the index itself, or inside the IndexPreTransform that pads ivf-pq."""
    if isinstance(index, faiss.IndexIVF):
        return index
    if isinstance(index, faiss.IndexPreTransform):
        ivf = faiss.try_extract_index_ivf(index)
        return None if ivf is None else faiss.downcast_index(ivf)
    return None


def direct_l2(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """(M, D) queries and (M, k, D) vectors -> (M, k) float32 L2 distances from the differences themselves.

    faiss's BLAS path (`runtime.BLAS_FROM_QUERIES`) computes |x|^2 + |q|^2 - 2 x.q, which loses the last digits where
    x and q are close: a stored image searched against its own bank scored 0.05 instead of 0. Which neighbours it
    finds is fine; their distances are recomputed here (k x D per query, nothing next to the search).
    """
    diff = np.asarray(neighbours, np.float32) - np.asarray(queries, np.float32)[:, None, :]
    return np.sqrt(np.einsum("mkd,mkd->mk", diff, diff)).astype(np.float32)


def sort_rows(distances: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, k) distances and ids -> both with each row in ascending distance (stable)."""
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)


def flat_knn(queries: np.ndarray, base: np.ndarray, base_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, D) queries against (C, D) base vectors with (C,) ids -> (M, k) L2 distances (not squared) and ids,
    exact (-1 / inf past C). One BLAS product: the cost of C vectors, not of the bank."""
    q = np.ascontiguousarray(queries, np.float32)
    b = np.ascontiguousarray(base, np.float32)
    kk = min(k, len(b))
    if kk == 0:
        return np.full((len(q), k), np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    _, pos = faiss.knn(q, b, kk)  # BLAS-path distances lose digits: recomputed from the vectors (`direct_l2`)
    d, pos = sort_rows(direct_l2(q, b[pos]), pos)
    ids = np.asarray(base_ids, np.int64)[pos]
    if kk < k:
        d = np.concatenate([d, np.full((len(q), k - kk), np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((len(q), k - kk), -1, np.int64)], axis=1)
    return d, ids


class IndexKind:
    """One kind of faiss index: how to build it and what of it differs between kinds.

    The defaults are those of an exhaustive index without search breadth; a method a kind cannot serve
    raises NotImplementedError (a foreign index: see `ForeignKind`).
    """

    name = "?"
    lossy = False  # the index stores approximations of the vectors added (search sees those)
    blas_distances = False  # its search's distances come from faiss's BLAS path: `direct_l2` recomputes them
    needs_training = False  # `build` needs training vectors (N, dim)

    def build(self, dim: int, training: np.ndarray | None = None, nlist: int | None = None) -> faiss.Index:
        """An empty faiss index of this kind over `dim` dimensions, at its default search breadth."""
        raise NotImplementedError(f"{self.name}: not built here")

    def recognises(self, index: faiss.Index) -> bool:
        """True when `index` (read from a file) is one this kind builds."""
        return False

    def training_count(self, nlist: int) -> int:
        """How many training vectors `build` uses at most (0: it needs none)."""
        return 0

    def nlist(self, index: faiss.Index) -> int | None:
        """The number of inverted lists, None for a kind without them."""
        return None

    def breadth(self, index: faiss.Index) -> int | None:
        """How widely a search looks (IVF: nprobe, hnsw: efSearch), None when it looks at everything."""
        return None

    def set_breadth(self, index: faiss.Index, value: int) -> None:
        """Set `breadth`, clamped to what the index allows; no effect on an exhaustive kind."""

    def default_breadth(self, nlist: int | None) -> int | None:
        """`breadth` unless set, for an index of this kind with `nlist` lists."""
        return None

    def bytes_per_vector(self, dim: int) -> int:
        """Bytes per stored vector of `dim` dimensions (code + id), without building an index."""
        raise NotImplementedError(f"{self.name}: size not known")

    def code_bytes(self, index: faiss.Index) -> int:
        """Bytes per stored vector of the live `index`, without its id."""
        return self.bytes_per_vector(index.d) - ID_BYTES

    def memory_bytes(self, index: faiss.Index) -> int:
        """Approximate bytes `index` holds: its stored vectors and ids and its fixed trained parts."""
        return int(index.ntotal) * (self.code_bytes(index) + ID_BYTES)

    def ids(self, index: faiss.Index) -> np.ndarray:
        """(N,) int64: every id held, without reading the vectors."""
        raise NotImplementedError(f"{self.name}: ids not readable")

    def iter_vectors(self, index: faiss.Index, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ((n,) int64 ids, (n, D) float32 vectors) held, in blocks of about `block`."""
        raise NotImplementedError(f"{self.name}: vectors not readable")

    def prepare_reconstruct(self, index: faiss.Index) -> None:
        """Make `index.reconstruct_batch` by id possible (called under the caller's lock)."""

    walks_graph = False  # `search_from` can start at given stored vectors (hnsw)

    def search_from(self, index: faiss.Index, queries: np.ndarray, k: int, starts: np.ndarray,
                    start_d2: np.ndarray, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) float32 queries, (M,) int32 storage positions to start from and (M,) float32 squared distances to
        them -> (M, k) squared distances and storage positions (-1 = none), found by a walk of `breadth`
        candidates from there. Only for `walks_graph` kinds."""
        raise NotImplementedError(f"{self.name}: no graph to walk")

    def remove(self, index: faiss.Index, ids: np.ndarray) -> tuple[faiss.Index, int]:
        """Remove (n,) int64 `ids`: (the index now holding the rest, how many were removed). The index is
        `index` itself, changed in place, unless the kind cannot remove in place (hnsw)."""
        return index, int(index.remove_ids(faiss.IDSelectorBatch(ids)))


class _IdMapKind(IndexKind):
    """An IndexIDMap2 over an index that stores vectors in insertion order (flat, hnsw)."""

    def ids(self, index):
        return faiss.vector_to_array(index.id_map).astype(np.int64)

    def iter_vectors(self, index, block):
        all_ids = self.ids(index)
        for start in range(0, len(all_ids), block):
            n = min(block, len(all_ids) - start)
            yield all_ids[start:start + n], index.index.reconstruct_n(start, n)


class FlatKind(_IdMapKind):
    """Exact search: IndexIDMap2 over IndexFlatL2."""

    name = "flat"
    blas_distances = True

    def build(self, dim, training=None, nlist=None):
        return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))

    def recognises(self, index):
        inner = _id_map_inner(index)
        return isinstance(inner, faiss.IndexFlat) and inner.metric_type == faiss.METRIC_L2

    def bytes_per_vector(self, dim):
        # IndexIDMap2's reverse id -> position hash map is in memory only, not counted (nor written to disk)
        return 4 * dim + ID_BYTES


class HNSWKind(_IdMapKind):
    """IndexIDMap2 over IndexHNSWFlat. faiss cannot unlink a vector from the graph: `remove` rebuilds it."""

    name = "hnsw"

    def build(self, dim, training=None, nlist=None):
        graph = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_L2)
        graph.hnsw.efConstruction = HNSW_BUILD_BREADTH
        graph.hnsw.efSearch = HNSW_SEARCH_BREADTH
        return faiss.IndexIDMap2(graph)

    def recognises(self, index):
        return isinstance(_id_map_inner(index), faiss.IndexHNSW)

    def breadth(self, index):
        return int(_id_map_inner(index).hnsw.efSearch)

    def set_breadth(self, index, value):
        _id_map_inner(index).hnsw.efSearch = int(max(1, value))

    def default_breadth(self, nlist):
        return HNSW_SEARCH_BREADTH

    walks_graph = True

    def search_from(self, index, queries, k, starts, start_d2, breadth):
        # faiss's base-level search seeded per query (search_type 1: one walk per start), skipping the descent
        # through the upper levels from the global entry point
        graph = _id_map_inner(index)
        q = np.ascontiguousarray(queries, np.float32)
        seeds = np.ascontiguousarray(np.asarray(starts, np.int32).reshape(len(q), 1))
        seed_d2 = np.ascontiguousarray(np.asarray(start_d2, np.float32).reshape(len(q), 1))
        d2 = np.full((len(q), k), np.inf, np.float32)
        positions = np.full((len(q), k), -1, np.int64)
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(max(breadth, k))
        graph.search_level_0(len(q), faiss.swig_ptr(q), k, faiss.swig_ptr(seeds), faiss.swig_ptr(seed_d2),
                             faiss.swig_ptr(d2), faiss.swig_ptr(positions), 1, 1, params)
        return d2, positions

    def bytes_per_vector(self, dim):
        """The vector, its id and its base level's 2 * HNSW_LINKS int32 links (upper levels, about 1 in
        HNSW_LINKS vectors, add a few bytes on average: `memory_bytes` counts them)."""
        return 4 * dim + ID_BYTES + 4 * 2 * HNSW_LINKS

    def memory_bytes(self, index):
        graph = _id_map_inner(index).hnsw
        return (int(index.ntotal) * (4 * index.d + ID_BYTES) + 4 * graph.neighbors.size()
                + 4 * graph.levels.size() + 8 * graph.offsets.size())

    def remove(self, index, ids):
        """A new graph over the vectors kept, streamed block by block: memory both graphs and one block,
        time a build of the kept bank (exact: the vectors are stored in full)."""
        gone = int(np.isin(self.ids(index), ids).sum())
        if not gone:
            return index, 0
        fresh = self.build(index.d)
        for block_ids, vectors in self.iter_vectors(index, 65_536):
            keep = ~np.isin(block_ids, ids)
            if keep.any():
                fresh.add_with_ids(np.ascontiguousarray(vectors[keep]), np.ascontiguousarray(block_ids[keep]))
        self.set_breadth(fresh, self.breadth(index))
        return fresh, gone


class IVFKind(IndexKind):
    """Inverted lists (IndexIVF*): trained coarse k-means over `nlist` lists, searched `nprobe` at a time.

    Subclasses say which faiss class and factory string; the inverted-list handling is shared. An
    instance of this class itself serves an IVF index not made here (see `kind_of`).
    """

    needs_training = True
    faiss_type = faiss.IndexIVF
    codes_are_vectors = False  # ivf-flat: an inverted list's codes are the float32 vectors themselves

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name

    def factory(self, dim: int, nlist: int, n_training: int) -> str:
        """The `faiss.index_factory` string for `n_training` training vectors."""
        raise NotImplementedError(f"{self.name}: not built here")

    def build(self, dim, training=None, nlist=None):
        """Trained on `training` (N, dim) float32, a sample of `training_count(nlist)` when larger; `nlist`
        defaults to `ivf_lists_for(N)`."""
        nlist = int(nlist or ivf_lists_for(len(training)))
        count = self.training_count(nlist)
        if len(training) > count:
            training = training[sample_positions(len(training), count)]
        index = faiss.index_factory(dim, self.factory(dim, nlist, len(training)), faiss.METRIC_L2)
        index.train(training)
        self.set_breadth(index, self.default_breadth(nlist))
        return index

    def recognises(self, index):
        return isinstance(_ivf_of(index), self.faiss_type)

    def training_count(self, nlist):
        return nlist * TRAIN_PER_LIST

    def nlist(self, index):
        return int(_ivf_of(index).nlist)

    def breadth(self, index):
        return int(_ivf_of(index).nprobe)

    def set_breadth(self, index, value):
        ivf = _ivf_of(index)
        ivf.nprobe = int(min(max(1, value), ivf.nlist))

    def default_breadth(self, nlist):
        return default_nprobe(int(nlist))

    def code_bytes(self, index):
        return int(_ivf_of(index).code_size)

    def trained_bytes(self, ivf: faiss.IndexIVF) -> int:
        """Bytes of the trained parts besides the coarse centroids (quantizer tables)."""
        return 0

    def memory_bytes(self, index):
        ivf = _ivf_of(index)
        return super().memory_bytes(index) + ivf.nlist * ivf.d * 4 + self.trained_bytes(ivf)

    @staticmethod
    def _lists(ivf: faiss.IndexIVF) -> Iterator[tuple[int, int]]:
        """(list number, size) of every non-empty inverted list."""
        for lst in range(ivf.nlist):
            n = ivf.invlists.list_size(lst)
            if n:
                yield lst, n

    def ids(self, index):
        ivf = _ivf_of(index)
        parts = [faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).copy() for lst, n in self._lists(ivf)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def iter_vectors(self, index, block):
        """List by list; the quantized kinds decode each code with `sa_decode`, which takes the list
        number (little-endian, coarse_code_size bytes) before the code: reconstructions, not the vectors."""
        ivf = _ivf_of(index)
        invlists = ivf.invlists
        code_size = invlists.code_size
        coarse = ivf.coarse_code_size()
        ids, codes, count = [], [], 0

        def flush():
            block_ids = np.concatenate(ids).astype(np.int64)
            if self.codes_are_vectors:
                vecs = np.concatenate(codes).view(np.float32).reshape(-1, index.d)
            else:
                vecs = index.sa_decode(np.concatenate(codes))
            ids.clear()
            codes.clear()
            return block_ids, np.ascontiguousarray(vecs, np.float32)

        for lst, n in self._lists(ivf):
            ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
            c = faiss.rev_swig_ptr(invlists.get_codes(lst), n * code_size).reshape(n, code_size)
            if not self.codes_are_vectors:
                prefix = np.frombuffer(np.int64(lst).astype("<i8").tobytes()[:coarse], np.uint8)
                c = np.concatenate([np.broadcast_to(prefix, (n, coarse)), c], axis=1)
            codes.append(c.copy())
            count += n
            if count >= block:
                yield flush()
                count = 0
        if ids:
            yield flush()

    def prepare_reconstruct(self, index):
        """An id -> list hash map (about 16 bytes per vector in memory and on disk), built once."""
        ivf = _ivf_of(index)
        if ivf.direct_map.type != faiss.DirectMap.Hashtable:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def remove(self, index, ids):
        if _ivf_of(index).direct_map.type == faiss.DirectMap.Hashtable:
            # faiss keeps an id -> list hash map in step only through an array selector.
            return index, int(index.remove_ids(faiss.IDSelectorArray(ids)))
        return super().remove(index, ids)


class IVFFlatKind(IVFKind):
    """IndexIVFFlat: full float32 vectors, approximate only in which lists are searched."""

    name, faiss_type, codes_are_vectors = "ivf-flat", faiss.IndexIVFFlat, True

    def factory(self, dim, nlist, n_training):
        return f"IVF{nlist},Flat"

    def bytes_per_vector(self, dim):
        return 4 * dim + ID_BYTES


class IVFSQ8Kind(IVFKind):
    """IndexIVFScalarQuantizer QT_8bit: one byte per dimension of the residual."""

    name, faiss_type, lossy = "ivf-sq8", faiss.IndexIVFScalarQuantizer, True

    def factory(self, dim, nlist, n_training):
        return f"IVF{nlist},SQ8"

    def bytes_per_vector(self, dim):
        return dim + ID_BYTES

    def trained_bytes(self, ivf):
        return 2 * ivf.d * 4  # per-dimension range


class IVFPQKind(IVFKind):
    """IndexIVFPQ over `pq_subquantizers(dim)` sub-vectors (padded by an IndexPreTransform when needed)."""

    name, faiss_type, lossy = "ivf-pq", faiss.IndexIVFPQ, True

    def factory(self, dim, nlist, n_training):
        padded, m = pq_subquantizers(dim)
        # 8-bit codes want 256 training points per sub-quantizer; tiny banks get smaller codebooks.
        nbits = int(min(8, max(1, math.floor(math.log2(n_training)))))
        # "np": no polysemous training (a slow Hamming-order optimisation only polysemous search uses).
        return (f"Pad{padded}," if padded != dim else "") + f"IVF{nlist},PQ{m}x{nbits}np"

    def training_count(self, nlist):
        return max(nlist * TRAIN_PER_LIST, PQ_TRAIN)

    def bytes_per_vector(self, dim):
        """One byte per sub-quantizer + the id (trained on fewer than 256 vectors the codes are smaller:
        `code_bytes` of the live index says)."""
        return pq_subquantizers(dim)[1] + ID_BYTES

    def trained_bytes(self, ivf):
        pq = ivf.pq
        return pq.M * pq.ksub * pq.dsub * 4 + int(ivf.precomputed_table.size()) * 4  # codebooks, residual table


class ForeignIVFKind(IVFKind):
    """An IVF index not made here: the inverted lists are read alike, but no default breadth is imposed."""

    def default_breadth(self, nlist):
        return None


class ForeignKind(IndexKind):
    """Any other faiss index not made here: named, searched, added to and saved through faiss alone."""

    def __init__(self, name: str):
        self.name = name


KIND_STRATEGIES: dict[str, IndexKind] = {kind.name: kind for kind in
                                         (FlatKind(), IVFFlatKind(), IVFSQ8Kind(), IVFPQKind(), HNSWKind())}


def strategy(kind: str) -> IndexKind:
    """The strategy named `kind` (one of `KIND_STRATEGIES`); ValueError for any other name."""
    try:
        return KIND_STRATEGIES[kind]
    except KeyError:
        raise ValueError(f"unknown index kind {kind!r}; choose from {tuple(KIND_STRATEGIES)}") from None


def kind_of(index: faiss.Index) -> IndexKind:
    """The strategy that built `index`; a foreign index gets one named by its faiss type (of its inverted
    file when it has one), never mistaken for one of ours."""
    for kind in KIND_STRATEGIES.values():
        if kind.recognises(index):
            return kind
    ivf = _ivf_of(index)
    return ForeignKind(type(index).__name__) if ivf is None else ForeignIVFKind(type(ivf).__name__)
