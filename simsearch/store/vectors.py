"""FAISS vector storage with stable ids, behind one small interface.

Strategies (`KINDS`, plus "auto" for `choose_kind`), with the index's own bytes per stored vector
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
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np

from ..faults import crash_point

APPROX_FROM = 200_000  # bank size from which "auto" switches from exact to an approximate index
AUTO_APPROX_KIND = "ivf-sq8"  # what "auto" picks from APPROX_FROM vectors (see docs/benchmarks.md)
IVF_KINDS = ("ivf-flat", "ivf-sq8", "ivf-pq")
KINDS = ("auto", "flat") + IVF_KINDS + ("hnsw",)
LOSSY_KINDS = ("ivf-sq8", "ivf-pq")  # kinds whose stored vectors are approximations
SPREAD_NEIGHBOURS = 8  # how many neighbours `VectorIndex.spread` averages over
ID_BYTES = 8  # an int64 id per stored vector (the IDMap's id array, or an inverted list's ids)
HNSW_LINKS = 32  # faiss's M: links per vector on each upper level, twice that on the base level
HNSW_BUILD_BREADTH = 40  # efConstruction: candidates kept while linking a new vector
# efSearch unless set: recall@1 0.97 on 1M real patch vectors, 0.93 at 64 (docs/benchmarks.md, "hnsw").
HNSW_SEARCH_BREADTH = 128


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


TRAIN_PER_LIST = 64  # k-means training points per inverted list (faiss warns below 39)
PQ_TRAIN = 256 * 40  # training points for the 256-centroid product-quantizer codebooks (faiss wants >= 39 per centroid)


def ivf_lists_for(n: int) -> int:
    """Number of inverted lists: about sqrt(n), a power of two, at least 64 vectors per list."""
    nlist = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(nlist, n // 64)))


def default_search_breadth(kind: str, nlist: int | None = None) -> int | None:
    """What `VectorIndex.nprobe` is unless set: `default_nprobe(nlist)` lists for an IVF kind,
    `HNSW_SEARCH_BREADTH` (efSearch) for hnsw, None for flat (exhaustive)."""
    if kind in IVF_KINDS:
        return default_nprobe(int(nlist))
    return HNSW_SEARCH_BREADTH if kind == "hnsw" else None


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


def bytes_per_vector(kind: str, dim: int) -> int:
    """Bytes an index of `kind` spends per stored vector of `dim` float32 dimensions (code + 8-byte id),
    without building one; `VectorIndex.bytes_per_vector` reports the same for a live index.
    flat, ivf-flat: 4 * dim + 8; ivf-sq8: dim + 8; ivf-pq: one byte per sub-quantizer + 8 (trained on
    fewer than 256 vectors it uses smaller codebooks and codes: the live index says); hnsw: 4 * dim + 8 plus
    its base level's 2 * `HNSW_LINKS` int32 links (upper levels, about 1 in `HNSW_LINKS` vectors, add a few
    bytes on average: `VectorIndex.memory_bytes` counts them)."""
    if kind in ("flat", "ivf-flat"):
        return 4 * dim + ID_BYTES
    if kind == "hnsw":
        return 4 * dim + ID_BYTES + 4 * 2 * HNSW_LINKS
    if kind == "ivf-sq8":
        return dim + ID_BYTES
    if kind == "ivf-pq":
        return pq_subquantizers(dim)[1] + ID_BYTES
    raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS[1:]}")


def training_count(kind: str, nlist: int) -> int:
    """How many vectors an IVF index of `kind` with `nlist` lists is trained on (at most)."""
    return max(nlist * TRAIN_PER_LIST, PQ_TRAIN) if kind == "ivf-pq" else nlist * TRAIN_PER_LIST


def sample_positions(n: int, count: int) -> np.ndarray:
    """(min(n, count),) sorted int64 positions of the training sample drawn from n vectors (seeded)."""
    if n <= count:  # k-means cost grows with the sample: keep it small
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(n, count, replace=False)).astype(np.int64)


def _train_sample(training: np.ndarray, count: int) -> np.ndarray:
    if len(training) <= count:
        return training
    return training[sample_positions(len(training), count)]


class VectorIndex:
    """A FAISS index holding (id -> vector); `kind` names the strategy."""

    def __init__(self, index: faiss.Index, nprobe: int | None = None):
        self.index = index
        self.dim = index.d
        # The inverted-file part (for nprobe, the lists and their codes), None for flat.
        self._ivf = None
        if isinstance(index, faiss.IndexIVF):
            self._ivf = index
        elif isinstance(index, faiss.IndexPreTransform):  # ivf-pq padded to an even dimension
            self._ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        # The graph of an hnsw bank (inside its id map), None for the other kinds.
        self._hnsw = None
        if isinstance(index, faiss.IndexIDMap2):
            inner = faiss.downcast_index(index.index)
            if isinstance(inner, faiss.IndexHNSW):
                self._hnsw = inner
        if nprobe is not None:
            self.nprobe = nprobe
        self._typical_spread: tuple[int, float] | None = None  # (neighbours, value), see typical_spread
        self._map_lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def flat(cls, dim: int) -> "VectorIndex":
        return cls(faiss.IndexIDMap2(faiss.IndexFlatL2(dim)))

    @classmethod
    def hnsw(cls, dim: int) -> "VectorIndex":
        graph = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_L2)
        graph.hnsw.efConstruction = HNSW_BUILD_BREADTH
        graph.hnsw.efSearch = HNSW_SEARCH_BREADTH
        return cls(faiss.IndexIDMap2(graph))

    @classmethod
    def create(cls, kind: str, dim: int, training: np.ndarray | None = None,
               nlist: int | None = None) -> "VectorIndex":
        """An empty index of `kind` ("flat", "hnsw" or one of `IVF_KINDS`; not "auto": see `choose_kind`).

        IVF kinds are trained on `training` (N, dim): the coarse k-means (`nlist` lists, default
        `ivf_lists_for(N)`) and, for ivf-sq8 / ivf-pq, the quantizer of the residuals. flat and hnsw
        need no training.
        """
        if kind == "flat":
            return cls.flat(dim)
        if kind == "hnsw":
            return cls.hnsw(dim)
        if kind not in IVF_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS[1:]}")
        if training is None or not len(training):
            raise ValueError("an IVF index is trained on its vectors: it cannot be built empty")
        training = _check(training, dim, "training vectors")
        nlist = int(nlist or ivf_lists_for(len(training)))
        count = training_count(kind, nlist)
        if kind == "ivf-flat":
            spec = f"IVF{nlist},Flat"
        elif kind == "ivf-sq8":
            spec = f"IVF{nlist},SQ8"
        else:
            padded, m = pq_subquantizers(dim)
            # 8-bit codes want 256 training points per sub-quantizer; tiny banks get smaller codebooks.
            nbits = int(min(8, max(1, math.floor(math.log2(min(len(training), count))))))
            # "np": no polysemous training (a slow Hamming-order optimisation only polysemous search uses).
            spec = (f"Pad{padded}," if padded != dim else "") + f"IVF{nlist},PQ{m}x{nbits}np"
        index = faiss.index_factory(dim, spec, faiss.METRIC_L2)
        index.train(_train_sample(training, count))
        return cls(index, nprobe=default_nprobe(nlist))

    @classmethod
    def ivf_flat(cls, training: np.ndarray, nlist: int | None = None) -> "VectorIndex":
        """An empty IVF-Flat index whose coarse quantizer is trained on `training` (N, D)."""
        return cls.create("ivf-flat", np.asarray(training).shape[1], training, nlist)

    @classmethod
    def ivf_sq8(cls, training: np.ndarray, nlist: int | None = None) -> "VectorIndex":
        """An empty IVF-SQ8 index (8-bit scalar-quantized residuals) trained on `training` (N, D)."""
        return cls.create("ivf-sq8", np.asarray(training).shape[1], training, nlist)

    @classmethod
    def ivf_pq(cls, training: np.ndarray, nlist: int | None = None) -> "VectorIndex":
        """An empty IVF-PQ index (product-quantized residuals, see `pq_subquantizers`) trained on `training`."""
        return cls.create("ivf-pq", np.asarray(training).shape[1], training, nlist)

    @classmethod
    def from_vectors(cls, kind: str, vectors: np.ndarray, ids: np.ndarray | None = None,
                     nlist: int | None = None) -> "VectorIndex":
        """An index of `kind` ("auto" resolved by size) trained on and holding `vectors` (ids default 0..N-1)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (N, D), got {vectors.shape}")
        kind = choose_kind(kind, len(vectors))
        out = cls.create(kind, vectors.shape[1], vectors if kind in IVF_KINDS else None, nlist)
        if len(vectors):
            out.add(vectors, np.arange(len(vectors)) if ids is None else ids)
        return out

    @property
    def kind(self) -> str:
        if self._hnsw is not None:
            return "hnsw"
        ivf = self._ivf
        if ivf is None:
            return "flat"
        if isinstance(ivf, faiss.IndexIVFFlat):
            return "ivf-flat"
        if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
            return "ivf-sq8"
        if isinstance(ivf, faiss.IndexIVFPQ):
            return "ivf-pq"
        return type(ivf).__name__  # not made here (a foreign file): named, never mistaken for one of ours

    @property
    def lossy(self) -> bool:
        """True when the index stores approximations of the vectors (ivf-sq8, ivf-pq)."""
        return self.kind in LOSSY_KINDS

    @property
    def nprobe(self) -> int | None:
        """How widely an approximate search looks: the IVF lists searched per query, or hnsw's efSearch
        (candidates kept while walking the graph); None for flat (exhaustive)."""
        if self._hnsw is not None:
            return int(self._hnsw.hnsw.efSearch)
        return int(self._ivf.nprobe) if self._ivf is not None else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._hnsw is not None:
            self._hnsw.hnsw.efSearch = int(max(1, value))
        elif self._ivf is not None:
            self._ivf.nprobe = int(min(max(1, value), self._ivf.nlist))

    def use_nprobe(self, value: int | None) -> None:
        """Search with breadth `value`, or with None `default_search_breadth` of this index (the engine
        calls it on every bank it loads: the policy of the running code wins over the breadth a file was
        saved with). No effect on flat."""
        default = default_search_breadth(self.kind, self._ivf.nlist if self._ivf is not None else None)
        if default is not None:
            self.nprobe = default if value is None else value

    def bytes_per_vector(self) -> int:
        """Bytes the index itself spends per stored vector: its code plus the 8-byte id.

        flat: 4 * D + 8 (IndexIDMap2 also keeps a reverse id -> position hash map in memory, not
        counted here, nor written to disk); IVF kinds: the inverted lists' code size + 8.
        """
        if self._hnsw is not None:
            return bytes_per_vector("hnsw", self.dim)
        if self._ivf is None:
            return 4 * self.dim + ID_BYTES
        return int(self._ivf.code_size) + ID_BYTES

    def memory_bytes(self) -> int:
        """Approximate bytes held: `bytes_per_vector` x ntotal plus the fixed trained parts (coarse
        centroids, quantizer tables, ivf-pq's precomputed residual table); for hnsw, the vectors, ids and
        every level's links with their per-vector level and offset."""
        if self._hnsw is not None:
            graph = self._hnsw.hnsw
            return (self.ntotal * (4 * self.dim + ID_BYTES) + 4 * graph.neighbors.size() + 4 * graph.levels.size()
                    + 8 * graph.offsets.size())
        total = self.ntotal * self.bytes_per_vector()
        ivf = self._ivf
        if ivf is None:
            return total
        total += ivf.nlist * ivf.d * 4  # coarse centroids
        if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
            total += 2 * ivf.d * 4  # per-dimension range
        elif isinstance(ivf, faiss.IndexIVFPQ):
            total += ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub * 4  # codebooks
            total += int(ivf.precomputed_table.size()) * 4
        return total

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # -- data -----------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        v = _check(vectors, self.dim)
        self._typical_spread = None
        self.index.add_with_ids(v, _check_ids(ids, len(v)))

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return 0
        self._typical_spread = None
        if self._hnsw is not None:
            return self._remove_by_rebuild(ids)
        if self._ivf is not None and self._ivf.direct_map.type == faiss.DirectMap.Hashtable:
            # faiss keeps an id -> list hash map in step only through an array selector.
            return int(self.index.remove_ids(faiss.IDSelectorArray(ids)))
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def _remove_by_rebuild(self, ids: np.ndarray) -> int:
        """hnsw: a new graph over the vectors not in `ids` (faiss cannot unlink a vector from the graph),
        streamed through `build_from_blocks`. Memory: both graphs and one block; time: a build of the kept bank."""
        gone = int(np.isin(self.ids(), ids).sum())
        if not gone:
            return 0

        def kept():
            for block_ids, vectors in self.iter_vectors():
                keep = ~np.isin(block_ids, ids)
                yield vectors[keep], block_ids[keep]
        fresh = build_from_blocks("hnsw", self.dim, self.ntotal - gone, kept)
        fresh.nprobe = self.nprobe
        self.index, self._hnsw = fresh.index, fresh._hnsw
        return gone

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(n,) stored ids -> (n, D) float32 vectors (reconstructions for the lossy kinds).

        An IVF index first gets an id -> list hash map (about 16 bytes per vector in memory and on disk).
        """
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        if self._ivf is not None and self._ivf.direct_map.type != faiss.DirectMap.Hashtable:
            with self._map_lock:  # queries in server threads may get here together; build the map once
                if self._ivf.direct_map.type != faiss.DirectMap.Hashtable:
                    self._ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
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
        """The median `spread` over `sample` stored vectors evenly spaced in id order (the same for the same
        bank); kept until the index changes."""
        if self._typical_spread is None or self._typical_spread[0] != neighbours:
            ids = np.sort(self.ids())
            picked = ids[np.unique(np.linspace(0, len(ids) - 1, min(sample, len(ids))).astype(np.int64))]
            self._typical_spread = (neighbours, float(np.median(self.spread(picked, neighbours))))
        return self._typical_spread[1]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> (M, k) L2 distances (float32, not squared) and (M, k) ids (-1 = none)."""
        q = _check(queries, self.dim, "queries")
        if self.ntotal == 0:
            raise ValueError("the index holds no vectors")
        d2, ids = self.index.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def _lists(self):
        """(list number, size) of every non-empty inverted list."""
        invlists = self._ivf.invlists
        for lst in range(self._ivf.nlist):
            n = invlists.list_size(lst)
            if n:
                yield lst, n

    def ids(self) -> np.ndarray:
        """(N,) int64: every id held, without reading the vectors."""
        if self._ivf is None:
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        invlists = self._ivf.invlists
        parts = [faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy() for lst, n in self._lists()]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def iter_vectors(self, block: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (id, vector) held, in blocks of about `block`: (n,) int64 and (n, D) float32 each,
        in the order `all_vectors` gives. Memory: one block (plus one inverted list), not the bank.

        flat and ivf-flat give back the vectors exactly as added. ivf-sq8 and ivf-pq store only codes:
        their vectors are reconstructions (each list's centroid plus the decoded residual, through
        `sa_decode`), approximations whose error is that of the quantizer (see `lossy`).
        """
        if self._ivf is None:
            all_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            for start in range(0, len(all_ids), block):
                n = min(block, len(all_ids) - start)
                yield all_ids[start:start + n], self.index.index.reconstruct_n(start, n)
            return
        invlists = self._ivf.invlists
        code_size = invlists.code_size
        coarse = self._ivf.coarse_code_size()
        ids, codes, count = [], [], 0

        def flush():
            block_ids = np.concatenate(ids).astype(np.int64)
            if self.kind == "ivf-flat":  # the codes are the float32 vectors themselves
                vecs = np.concatenate(codes).view(np.float32).reshape(-1, self.dim)
            else:  # sa_decode takes "list number (little-endian, coarse_code_size bytes) + code" per vector
                vecs = self.index.sa_decode(np.concatenate(codes))
            ids.clear()
            codes.clear()
            return block_ids, np.ascontiguousarray(vecs, np.float32)

        for lst, n in self._lists():
            ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
            c = faiss.rev_swig_ptr(invlists.get_codes(lst), n * code_size).reshape(n, code_size)
            if self.kind != "ivf-flat":
                prefix = np.frombuffer(np.int64(lst).astype("<i8").tobytes()[:coarse], np.uint8)
                c = np.concatenate([np.broadcast_to(prefix, (n, coarse)), c], axis=1)
            codes.append(c.copy())
            count += n
            if count >= block:
                yield flush()
                count = 0
        if ids:
            yield flush()

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) held: (N,) int64 and (N, D) float32 (see `iter_vectors`: lossy kinds give
        reconstructions). Used to rebuild as another kind and by the evaluation."""
        blocks = list(self.iter_vectors())
        if not blocks:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return (np.concatenate([b[0] for b in blocks]),
                np.ascontiguousarray(np.concatenate([b[1] for b in blocks]), np.float32))

    def rebuilt_as(self, kind: str, extra: tuple[np.ndarray, np.ndarray] | None = None) -> "VectorIndex":
        """A new index of `kind` ("flat", "hnsw" or one of `IVF_KINDS`) with this one's vectors plus `extra`
        (vectors, ids); an IVF kind is trained on all of them (a sample, see `build_from_blocks`).

        The vectors come from `iter_vectors`: when this index is lossy (ivf-sq8, ivf-pq), the new one is
        built from its reconstructions, not from the vectors first added, so it holds (and, for an IVF
        kind, is trained on) approximations; quantizing them again adds the new kind's error on top.
        Converting to "flat" then gives exact search over approximate vectors. To rebuild without that
        loss, keep the original vectors elsewhere and use `from_vectors`. `extra` is always exact.
        """
        if kind == "auto":
            raise ValueError("rebuilt_as needs a concrete kind: resolve 'auto' with choose_kind")
        extras = []
        if extra is not None:
            extras = [(_check(extra[0], self.dim), _check_ids(extra[1], len(extra[0])))]
        return self.grown_as(kind, lambda: ((v, i) for v, i in extras), sum(len(e[1]) for e in extras))

    def grown_as(self, kind: str, more: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                 n_more: int) -> "VectorIndex":
        """A new index of `kind` holding this one's vectors and then the (vectors, ids) blocks that
        `more()` yields (`n_more` vectors in all; `more` is called twice for an IVF kind). Memory: the new
        index plus one block and the training sample; this index is left unchanged."""
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
    nlist = ivf_lists_for(n) if kind in IVF_KINDS else None
    if kind in IVF_KINDS:
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


def fsync_directory(directory: str | Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def choose_kind(requested: str, n_vectors: int) -> str:
    """The kind to build for `n_vectors`: `requested` itself, or for "auto" exact "flat" below
    `APPROX_FROM` vectors and `AUTO_APPROX_KIND` from there on."""
    if requested not in KINDS:
        raise ValueError(f"unknown index kind {requested!r}; choose from {KINDS}")
    if requested != "auto":
        return requested
    return AUTO_APPROX_KIND if n_vectors >= APPROX_FROM else "flat"
