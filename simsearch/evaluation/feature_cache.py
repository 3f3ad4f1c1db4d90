"""A memo of per-image inputs for the baselines, one `evaluate_category` run long.

The threshold needs k refits on parts of train/good, and each used to decode (and embed) every train image
again; with one cache shared by the full fit and the k fold fits each image is prepared once. In memory only:
a few tens of MB for Magnetic Tile's 761 images at 128 px or as pooled vectors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


class FeatureCache:
    def __init__(self) -> None:
        self._inputs: dict[tuple[str, str], object] = {}
        self._shared: dict[str, object] = {}
        self.hits = self.misses = 0

    def get(self, kind: str, path: Path, compute: Callable[[Path], T]) -> T:
        """compute(path), once per (kind, path); `kind` names what was computed and how (size, backbone)."""
        key = (kind, str(path))
        if key in self._inputs:
            self.hits += 1
        else:
            self.misses += 1
            self._inputs[key] = compute(path)
        return self._inputs[key]  # type: ignore[return-value]

    def shared(self, kind: str, build: Callable[[], T]) -> T:
        """One object (a loaded backbone) for every detector of the run."""
        if kind not in self._shared:
            self._shared[kind] = build()
        return self._shared[kind]  # type: ignore[return-value]


def cached(cache: FeatureCache | None, kind: str, path: Path, compute: Callable[[Path], T]) -> T:
    """compute(path) through the cache when there is one."""
    return compute(path) if cache is None else cache.get(kind, path, compute)
