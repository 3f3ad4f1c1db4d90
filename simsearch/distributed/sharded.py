"""A patch bank sharded across Ray actors, for banks larger than one node's memory.

Each actor holds one shard (a `VectorIndex` of the vectors whose global id falls to it, ids kept as they
are); a query batch is put in the object store once and every shard searches it; the k best of each shard
are merged with faiss's `ResultHeap`, so the answer is the one a single bank over the same vectors gives
(ties between equal distances aside). The searches run in parallel, one per shard.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..store.vectors import VectorIndex


class BankShard:
    """One shard (the body of a Ray actor): an exact or approximate bank of the vectors it was given."""

    def __init__(self, kind: str, dim: int, nprobe: int | None = None):
        self.bank = VectorIndex.create(kind, dim)
        self.bank.use_nprobe(nprobe)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> int:
        self.bank.add(vectors, ids)
        return self.bank.ntotal

    def ntotal(self) -> int:
        return self.bank.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> (M, k) L2 distances and global ids; an empty shard answers (inf, -1)."""
        if self.bank.ntotal == 0:
            return np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        return self.bank.search(queries, k)


def merge_results(results: Iterable[tuple[np.ndarray, np.ndarray]], n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest distances (and their ids) per query over the shards' (M, k) answers."""
    import faiss

    heap = faiss.ResultHeap(n_queries, k, keep_max=False)
    for distances, ids in results:
        heap.add_result(np.ascontiguousarray(distances, np.float32), np.ascontiguousarray(ids, np.int64))
    heap.finalize()
    return heap.D, heap.I


class ShardedBank:
    """`shards` Ray actors holding one bank between them (Ray already initialised: see cluster.ray_session).
    A vector goes to shard `id % shards`, so where an id lives is known without asking. `kind`: the
    shards' bank kind: "flat" (exact: the same results as one flat bank) or "hnsw"."""

    def __init__(self, shards: int, dim: int, kind: str = "flat", nprobe: int | None = None,
                 cpus_per_shard: float = 1):
        import ray

        if shards < 1:
            from ..errors import BadInput
            raise BadInput(f"a sharded bank needs >= 1 shard, got {shards}")
        actor = ray.remote(num_cpus=cpus_per_shard)(BankShard)
        self.ray, self.dim = ray, dim
        self.shards = [actor.remote(kind, dim, nprobe) for _ in range(shards)]

    @classmethod
    def of_bank(cls, bank: VectorIndex, shards: int, **options) -> "ShardedBank":
        """A sharded copy of `bank`'s vectors and ids (read block by block)."""
        sharded = cls(shards, bank.dim, **options)
        for ids, vectors in bank.iter_vectors():
            sharded.add(vectors, ids)
        return sharded

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """(N, D) float32 vectors with their (N,) int64 global ids, each sent to its shard."""
        ids = np.asarray(ids, np.int64)
        owner = ids % len(self.shards)
        self.ray.get([shard.add.remote(vectors[owner == s], ids[owner == s])
                      for s, shard in enumerate(self.shards) if (owner == s).any()])

    @property
    def ntotal(self) -> int:
        return int(sum(self.ray.get([shard.ntotal.remote() for shard in self.shards])))

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> (M, k) L2 distances (not squared) and global ids, as VectorIndex.search."""
        queries = np.ascontiguousarray(queries, np.float32)
        shared = self.ray.put(queries)  # sent once; every shard reads the same object
        answers = self.ray.get([shard.search.remote(shared, k) for shard in self.shards])
        return merge_results(answers, len(queries), k)

    def close(self) -> None:
        for shard in self.shards:
            self.ray.kill(shard)
        self.shards = []
