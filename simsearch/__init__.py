"""simsearch: find defects in images by similarity to defect-free ones (PatchCore on FAISS + SQLite)."""
import os

__version__ = "0.1.0"

# Before torch or faiss load their OpenMP runtimes: idle threads sleep rather than spin, so that on
# shared cores they do not steal time from working ones (simsearch/runtime.py; docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Engine", "QueryResult", "SimsearchError", "__version__"]


def __getattr__(name: str):
    # The engine pulls in torch, timm and faiss: load it on first use, not on `import simsearch.x`.
    if name in ("Engine", "QueryResult", "SimsearchError"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'simsearch' has no attribute {name!r}")
