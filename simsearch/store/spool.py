"""A temporary file of float32 vectors: where an add keeps its new patch vectors between embedding
and writing, so that memory holds one block of them at a time, never all of them.

Read back with plain file reads (`blocks`), not a memory map: mapped pages stay resident and
would count against the process, which is what the spool is there to avoid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np


class VectorSpool:
    """Append-only (N, dim) float32 rows in a file; `blocks` reads them back in order."""

    def __init__(self, path: str | Path, dim: int):
        self.path = Path(path)
        self.dim = int(dim)
        self.count = 0
        self._fh = open(self.path, "wb")

    def append(self, vectors: np.ndarray) -> tuple[int, int]:
        """Write (m, dim) vectors; returns their (start, stop) row range."""
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"vectors must be (m, {self.dim}), got {v.shape}")
        self._fh.write(np.ascontiguousarray(v, dtype=np.float32).tobytes())
        start = self.count
        self.count += len(v)
        return start, self.count

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __len__(self) -> int:
        return self.count

    def blocks(self, rows: int = 65_536) -> Iterator[np.ndarray]:
        """(m, dim) float32 blocks of at most `rows` rows, in the order written."""
        self._fh.flush()
        with open(self.path, "rb") as fh:
            for start in range(0, self.count, rows):
                n = min(rows, self.count - start)
                block = np.fromfile(fh, dtype=np.float32, count=n * self.dim)
                if block.size != n * self.dim:
                    raise ValueError(f"{self.path}: spool file shorter than the {self.count} rows written")
                yield block.reshape(n, self.dim)

    def __enter__(self) -> "VectorSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
