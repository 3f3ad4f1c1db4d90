"""FAISS vector storage with stable ids, behind one small interface.

Strategies:
- "flat": exact search (IndexIDMap2 over IndexFlatL2); the default while the bank is small.
- "ivf-flat": inverted lists trained on the bank (approximate, much faster on large banks);
  chosen automatically once the bank passes `APPROX_FROM` vectors, or on request.
Both support add with ids and remove by id. Distances returned are L2 (not squared).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np

APPROX_FROM = 200_000  # bank size from which "auto" switches from exact to IVF
KINDS = ("auto", "flat", "ivf-flat")


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


def ivf_lists_for(n: int) -> int:
    """Number of inverted lists: about sqrt(n), a power of two, at least 64 vectors per list."""
    nlist = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(nlist, n // 64)))


class VectorIndex:
    """A FAISS index holding (id -> vector); `kind` names the strategy."""

    def __init__(self, index: faiss.Index, nprobe: int | None = None):
        self.index = index
        self.dim = index.d
        if nprobe is not None:
            self.nprobe = nprobe

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def flat(cls, dim: int) -> "VectorIndex":
        return cls(faiss.IndexIDMap2(faiss.IndexFlatL2(dim)))

    @classmethod
    def ivf_flat(cls, training: np.ndarray, nlist: int | None = None) -> "VectorIndex":
        """An empty IVF-Flat index whose coarse quantizer is trained on `training` (N, D)."""
        dim = training.shape[1]
        nlist = nlist or ivf_lists_for(len(training))
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
        sample = _check(training, dim, "training vectors")
        if len(sample) > nlist * TRAIN_PER_LIST:  # k-means cost grows with the sample: keep it small
            pick = np.random.default_rng(0).choice(len(sample), nlist * TRAIN_PER_LIST, replace=False)
            sample = sample[np.sort(pick)]
        index.train(sample)
        index.own_fields = True
        quantizer.this.disown()
        out = cls(index)
        out.nprobe = max(8, nlist // 64)
        return out

    @property
    def kind(self) -> str:
        return "ivf-flat" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @property
    def nprobe(self) -> int | None:
        return int(self.index.nprobe) if isinstance(self.index, faiss.IndexIVF) else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if isinstance(self.index, faiss.IndexIVF):
            self.index.nprobe = int(min(max(1, value), self.index.nlist))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # -- data -----------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        v = _check(vectors, self.dim)
        self.index.add_with_ids(v, _check_ids(ids, len(v)))

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> (M, k) L2 distances (float32, not squared) and (M, k) ids (-1 = none)."""
        q = _check(queries, self.dim, "queries")
        if self.ntotal == 0:
            raise ValueError("the index holds no vectors")
        d2, ids = self.index.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) held: (N,) int64 and (N, D) float32. Used to rebuild as another kind."""
        if isinstance(self.index, faiss.IndexIDMap):
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            vectors = self.index.index.reconstruct_n(0, self.index.index.ntotal)
            return ids, vectors
        invlists = self.index.invlists
        all_ids, all_vecs = [], []
        for lst in range(self.index.nlist):
            n = invlists.list_size(lst)
            if n == 0:
                continue
            all_ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
            codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size).copy()
            all_vecs.append(codes.view(np.float32).reshape(n, self.dim))
        if not all_ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(all_ids).astype(np.int64), np.concatenate(all_vecs)

    def rebuilt_as(self, kind: str, extra: tuple[np.ndarray, np.ndarray] | None = None) -> "VectorIndex":
        """A new index of `kind` with this one's vectors plus `extra` (vectors, ids)."""
        ids, vectors = self.all_vectors()
        if extra is not None:
            vectors = np.concatenate([vectors, _check(extra[0], self.dim)])
            ids = np.concatenate([ids, _check_ids(extra[1], len(extra[0]))])
        if kind != "flat" and not len(vectors):
            raise ValueError("an IVF index is trained on its vectors: it cannot be built empty")
        new = VectorIndex.flat(self.dim) if kind == "flat" else VectorIndex.ivf_flat(vectors)
        if len(ids):
            new.add(vectors, ids)
        return new

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file, fsynced, then renamed over `path`."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | Path) -> "VectorIndex":
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[0][:200]})") from None
        return cls(index)


def choose_kind(requested: str, n_vectors: int) -> str:
    if requested not in KINDS:
        raise ValueError(f"unknown index kind {requested!r}; choose from {KINDS}")
    if requested != "auto":
        return requested
    return "ivf-flat" if n_vectors >= APPROX_FROM else "flat"
