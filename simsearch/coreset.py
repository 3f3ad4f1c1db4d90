"""Coreset subsampling of the patch bank: greedy k-center (PatchCore).

Greedy k-center picks, again and again, the vector farthest from everything picked so far, so the
kept subset covers the bank with the smallest radius it can find greedily. Distances are computed on
a random projection (Johnson-Lindenstrauss) to keep it cheap; min-distances are updated incrementally.
"""
from __future__ import annotations

import numpy as np
import torch


def greedy_coreset(vectors: np.ndarray, n_select: int, *, existing: np.ndarray | None = None,
                   projection_dim: int = 128, seed: int = 0) -> np.ndarray:
    """(N, D) float32 -> indices (n_select,) of the greedy k-center subset.

    `existing` (M, D): vectors already in the bank; selection starts from them, so new vectors
    close to the existing bank are picked last.
    """
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n, dim = x.shape
    n_select = int(min(max(n_select, 1), n))
    if n_select == n:
        return np.arange(n)
    gen = torch.Generator().manual_seed(seed)
    if dim > projection_dim:
        proj = torch.randn(dim, projection_dim, generator=gen) / projection_dim ** 0.5
        x = x @ proj
    else:
        proj = None
    min_dist = torch.full((n,), float("inf"))
    if existing is not None and len(existing):
        e = torch.from_numpy(np.ascontiguousarray(existing, dtype=np.float32))
        if proj is not None:
            e = e @ proj
        for start in range(0, len(e), 4096):
            min_dist = torch.minimum(min_dist, torch.cdist(x, e[start:start + 4096]).min(dim=1).values)
        current = int(torch.argmax(min_dist))
    else:
        current = int(torch.randint(n, (1,), generator=gen))
    selected = np.empty(n_select, dtype=np.int64)
    for i in range(n_select):
        selected[i] = current
        d = torch.linalg.vector_norm(x - x[current], dim=1)
        torch.minimum(min_dist, d, out=min_dist)
        min_dist[current] = 0
        current = int(torch.argmax(min_dist))
    return selected
