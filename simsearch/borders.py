"""Border levels: how much higher good images score near their edges, so the image score can take it off.

A patch cell near the image's edge sees the tile's reflected margin and the edge of the part or sheet; on
good images such cells score higher than the interior (in `simsearch eval`, the outermost ring 1.12 to 1.22 x
on PIPED's categories, 1.36 x on Magnetic Tile), and a good part from a new batch is flagged by its edges, not
by a defect. The profile is learned by calibration from good images outside the bank (the same cross-scores
the threshold comes from): ring r's upper quantile of plain patch scores over the interior's. The image score
divides each candidate patch's score by its ring's factor to the configuration's power
(`border_discount`, 2: edges vary more between batches than between the calibration's folds; 1 left PIPED
at 0.9986 image AUROC in bench runs, 2 reached 0.9992; docs/benchmarks.md, "Border levels"); the map keeps
plain distances, so a defect on the edge still shows where it is. Factors are at least 1: an edge that scores
lower than the interior (an object on a plain background) is left as it is.

    grids of good patch scores -> border_profile -> border_divisors(shape) -> image score
"""
from __future__ import annotations

import numpy as np

RINGS = 8  # cells from the nearest edge with a level of their own; the deeper ones are the interior
QUANTILE = 0.9  # the image score is a mean of the highest patch scores: compare the rings' upper tails


def border_rings(shape: tuple[int, int], rings: int = RINGS) -> np.ndarray:
    """(Hc, Wc) grid shape -> (Hc, Wc) int64: each cell's distance in cells to the nearest edge, capped at
    `rings` (the interior)."""
    hc, wc = (int(s) for s in shape)
    if hc < 1 or wc < 1:
        raise ValueError(f"grid shape must be positive, got {shape}")
    rows = np.minimum(np.arange(hc), np.arange(hc)[::-1])
    cols = np.minimum(np.arange(wc), np.arange(wc)[::-1])
    return np.minimum(np.minimum(rows[:, None], cols[None, :]), rings).astype(np.int64)


def border_profile(grids: list[np.ndarray], rings: int = RINGS, quantile: float = QUANTILE) -> list[float]:
    """Plain patch-score grids [(Hc, Wc)] of good images, each scored against a bank without it -> `rings`
    factors >= 1: ring r's `quantile` over the interior's. A ring no grid reaches, or grids without an
    interior, give 1 (no change)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    by_ring: list[list[np.ndarray]] = [[] for _ in range(rings + 1)]
    for grid in grids:
        g = np.asarray(grid, np.float32)
        if g.ndim != 2:
            raise ValueError(f"patch-score grids must be (Hc, Wc), got {g.shape}")
        ring = border_rings(g.shape, rings)
        for r in range(rings + 1):
            by_ring[r].append(g[ring == r])
    levels = [float(np.quantile(np.concatenate(v), quantile)) if sum(len(x) for x in v) else np.nan
              for v in by_ring]
    interior = levels[rings]
    if not np.isfinite(interior) or interior <= 0:
        return [1.0] * rings
    return [max(1.0, level / interior) if np.isfinite(level) else 1.0 for level in levels[:rings]]


def border_divisors(shape: tuple[int, int], profile: list[float] | None, power: float) -> np.ndarray | None:
    """(Hc, Wc) grid shape, a `border_profile` and its power -> (Hc * Wc,) float32 divisors of the patch scores
    (row-major, as the grid's vectors), or None when there is nothing to divide (no profile, power 0)."""
    if not profile or power == 0:
        return None
    if power < 0:
        raise ValueError(f"border power must be >= 0, got {power}")
    factors = np.append(np.asarray(profile, np.float64), 1.0) ** power
    return factors[border_rings(shape, len(profile))].astype(np.float32).ravel()
