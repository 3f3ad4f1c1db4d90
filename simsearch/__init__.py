"""simsearch: find defects in images by similarity to defect-free ones (PatchCore on FAISS + SQLite)."""
__version__ = "0.1.0"

from .engine import Engine, QueryResult, SimsearchError  # noqa: E402

__all__ = ["Engine", "QueryResult", "SimsearchError", "__version__"]
