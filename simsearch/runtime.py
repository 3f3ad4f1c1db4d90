"""CPU thread settings shared by torch (the backbone) and faiss (the search), set in one place.

torch and faiss each bring their own OpenMP runtime. Left alone, faiss takes one thread per logical
CPU while torch takes one per physical core, and the two pools alternate within every query. Both
get the same count here: `SIMSEARCH_THREADS` when set, else torch's own choice (which follows
OMP_NUM_THREADS and any `torch.set_num_threads` the caller made first).

OMP_WAIT_POLICY=PASSIVE is set by `simsearch/__init__.py` before either library loads (unless the
environment already says otherwise): idle OpenMP threads then sleep instead of spinning, which on a
machine whose cores are shared (another process, or the other library's pool) keeps a spinning
thread from taking the time slice that the working one needs; see docs/benchmarks.md for the measurement.
"""
from __future__ import annotations

import os
import sys

from .errors import BadInput

# faiss's exact (flat) search takes its BLAS path only from this many queries at once. faiss 1.15's default,
# 128,000, sends a whole image's patches (about 770) down the per-query loop instead: about 6 x slower for
# 768 queries against 10,000 vectors on 2 cores (72.3 against 12.4 ms, `bench/query_floor.py`; docs/benchmarks.md,
# "Where a query's time goes").
BLAS_FROM_QUERIES = 20


def tuned_faiss():
    """The faiss module, with exact search's BLAS path from BLAS_FROM_QUERIES queries (a process-wide faiss
    setting; set once, on the first import through here)."""
    import faiss

    if faiss.cvar.distance_compute_blas_threshold != BLAS_FROM_QUERIES:
        faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES
    return faiss


def thread_count() -> int:
    """Threads for the network (torch or ONNX Runtime) and faiss: SIMSEARCH_THREADS, else torch's current
    setting where torch is loaded, else the CPUs this process may run on."""
    value = os.environ.get("SIMSEARCH_THREADS")
    if value:
        n = int(value)
        if n < 1:
            raise BadInput(f"SIMSEARCH_THREADS must be >= 1, got {value!r}")
        return n
    torch = sys.modules.get("torch")  # only where something already loaded it (None: hidden)
    if torch is not None:
        return int(torch.get_num_threads())
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_threads(n: int | None = None) -> int:
    """Give torch (where it is loaded) and faiss the same number of threads (`n`, default `thread_count()`);
    returns it. Cheap and idempotent: called whenever an Engine creates or loads its embedder."""
    faiss = tuned_faiss()
    n = int(n or thread_count())
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)
    return n
