"""simsearch: find defects in images by similarity to defect-free ones (PatchCore on FAISS + SQLite)."""
import os

from .version import __version__

# Before torch or faiss load their OpenMP runtimes: idle threads sleep rather than spin, so that on
# shared cores they do not steal time from working ones (simsearch/runtime.py; docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Engine", "QueryResult", "SimsearchError", "__version__"]


def __getattr__(name: str):
    # The engine pulls in faiss (and, once a model loads, torch and timm): load it on first use.
    if name == "SimsearchError":
        from .errors import SimsearchError
        return SimsearchError
    if name in ("Engine", "QueryResult"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'simsearch' has no attribute {name!r}")
