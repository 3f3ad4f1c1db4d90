"""simsearch: find defects in images by similarity to defect-free ones (PatchCore on FAISS + SQLite)."""
__version__ = "0.1.0"

__all__ = ["Engine", "QueryResult", "SimsearchError", "__version__"]


def __getattr__(name: str):
    # The engine pulls in torch, timm and faiss: load it on first use, not on `import simsearch.x`.
    if name in ("Engine", "QueryResult", "SimsearchError"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'simsearch' has no attribute {name!r}")
