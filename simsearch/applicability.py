"""Applicability: whether an image is the kind of image the bank holds, before its score means anything.

A grey photo against a colour bank, the wrong product on the belt or a lens cap must not turn into a
defect verdict, and least of all pass. Three checks, each against the good images a calibration was
measured on (never a fixed constant alone):
- colour: a grey image against a bank of colour parts (or the reverse), from the mean chroma
  (the mean over pixels of max(R, G, B) - min(R, G, B), 0 for grey);
- shape: an aspect ratio (width / height) outside the good images' range, with a tolerance;
- content: the distance of the image's pooled vector to its nearest reference image, against the good
  images' own distances times a margin. A defect changes a few patches, so its pooled vector stays near
  the references; another product or a lens cap moves all of them.
The margins were set on the dev sets as a whole (docs/benchmarks.md, "Foreign images").
"""
from __future__ import annotations

import numpy as np

# Below this mean chroma (of 255) an image is grey; JPEG's chroma noise on a grey part stays under it.
GREY_CHROMA = 2.0
# A colour bank's images must keep at least this share of their least colourful good image's chroma.
CHROMA_KEEP = 0.25
# A grey bank refuses images this many times more colourful than its most colourful good image (and
# above GREY_CHROMA x 4 in any case).
CHROMA_GROWTH = 4.0
ASPECT_TOLERANCE = 0.10  # relative, either side of the good images' range
# The pooled limit: the largest good image's pooled distance times POOLED_MARGIN. On the dev sets own defects
# reached 2.11 times it and the nearest image of another dev set 3.11 times (bench/applicability.py).
POOLED_MARGIN = 2.5
# ... and never below this (cosine 0.995): on a line whose good parts are near-identical the margin alone would
# call a small defect foreign; an image this close to a reference is the same kind of image.
MIN_POOLED_LIMIT = 0.1


def mean_chroma(rgb: np.ndarray) -> float:
    """(H, W, 3) uint8 RGB -> mean over pixels of max - min channel (0 for grey), on a subsample."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))  # ~250k pixels are plenty
    px = rgb[::step, ::step].astype(np.int16)
    return float((px.max(axis=2) - px.min(axis=2)).mean())


def image_stats(rgb: np.ndarray) -> dict:
    """The image-level numbers the checks use: {"chroma", "aspect"}."""
    return {"chroma": mean_chroma(rgb), "aspect": rgb.shape[1] / rgb.shape[0]}


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(M, D) and (N, D) float32 pooled vectors -> (M,) L2 distance of each query to its nearest reference."""
    if not len(references):
        return np.zeros(len(queries))
    d2 = (queries ** 2).sum(1)[:, None] - 2 * queries @ references.T + (references ** 2).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def fit_limits(stats: list[dict], pooled_distances: list[float]) -> dict:
    """Limits from the good calibration images: their stats and (N,) pooled nearest-reference distances."""
    if not stats or len(stats) != len(pooled_distances):
        raise ValueError("applicability needs the stats and the pooled distance of each good image")
    chroma = np.asarray([s["chroma"] for s in stats])
    aspect = np.asarray([s["aspect"] for s in stats])
    colour_bank = bool(chroma.min() > GREY_CHROMA)
    return {
        "colour_bank": colour_bank,
        "min_chroma": float(chroma.min() * CHROMA_KEEP) if colour_bank else None,
        "max_chroma": None if colour_bank else float(max(chroma.max() * CHROMA_GROWTH, GREY_CHROMA * 4)),
        "aspect": [float(aspect.min() * (1 - ASPECT_TOLERANCE)), float(aspect.max() * (1 + ASPECT_TOLERANCE))],
        "max_pooled_distance": float(max(max(pooled_distances) * POOLED_MARGIN, MIN_POOLED_LIMIT)),
        "good_pooled_distance_max": float(max(pooled_distances)),
    }


def judge(limits: dict, stats: dict, pooled_distance: float) -> str | None:
    """None when the image is comparable with the bank, else the reason in one line."""
    if limits["min_chroma"] is not None and stats["chroma"] < limits["min_chroma"]:
        return (f"a grey image (chroma {stats['chroma']:.1f}) against a bank of colour parts "
                f"(its good images' least is {limits['min_chroma'] / CHROMA_KEEP:.1f})")
    if limits["max_chroma"] is not None and stats["chroma"] > limits["max_chroma"]:
        return f"a colour image (chroma {stats['chroma']:.1f}) against a bank of grey parts"
    low, high = limits["aspect"]
    if not low <= stats["aspect"] <= high:
        return f"aspect ratio {stats['aspect']:.3f} outside the good images' {low:.3f}..{high:.3f}"
    if pooled_distance > limits["max_pooled_distance"]:
        return (f"unlike every reference image (pooled distance {pooled_distance:.3f}, good images reach "
                f"{limits['good_pooled_distance_max']:.3f})")
    return None
