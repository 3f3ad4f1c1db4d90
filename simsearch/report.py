"""What a person or a machine reads: heatmap overlays and JSON-ready result records."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .engine import QueryResult


def heatmap_overlay(rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None,
                    regions: list | None = None) -> np.ndarray:
    """(H, W, 3) RGB image + (H, W) map -> (H, W, 3) BGR overlay ready for cv2.imwrite.

    Colours are absolute when a pixel threshold is known (the threshold sits in the middle of the
    colour scale, so images compare); without one the map is stretched to its own range.
    """
    if threshold is not None and threshold > 0:
        level = np.clip(anomaly_map / (2.0 * threshold), 0.0, 1.0)
    else:
        lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
        level = (anomaly_map - lo) / max(hi - lo, 1e-12)
    colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(bgr, 0.55, colour, 0.45, 0.0)
    for r in regions or []:
        cv2.rectangle(out, (r.x, r.y), (r.x + r.w - 1, r.y + r.h - 1), (255, 255, 255), 1)
    return out


def heatmap_name(source: str, taken: set[str]) -> str:
    """A readable, unique file name for an image's heatmap: <parent>__<stem>.png."""
    p = Path(source)
    base = f"{p.parent.name}__{p.stem}" if p.parent.name else p.stem
    name, n = f"{base}.png", 1
    while name in taken:
        n += 1
        name = f"{base}-{n}.png"
    taken.add(name)
    return name


def write_heatmap(result: QueryResult, rgb: np.ndarray, directory: str | os.PathLike, pixel_threshold: float | None,
                  taken: set[str]) -> str:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / heatmap_name(result.image, taken)
    if not cv2.imwrite(str(path), heatmap_overlay(rgb, result.anomaly_map, pixel_threshold, result.regions)):
        raise OSError(f"could not write {path}")
    return str(path)


def query_record(result: QueryResult) -> dict:
    """The JSON line of one query (see README: keys and units)."""
    def nearest(n):
        return None if n is None else {"image": n.image, "x": n.x, "y": n.y, "distance": round(n.distance, 6)}

    def region(r):
        return {"x": r.x, "y": r.y, "w": r.w, "h": r.h, "area": r.area, "score": round(r.score, 6),
                "nearest": nearest(r.nearest)}

    return {
        "image": result.image,
        "score": round(result.score, 6),
        "threshold": None if result.threshold is None else round(result.threshold, 6),
        "is_anomalous": result.is_anomalous,
        "similarity": None if result.similarity is None else round(result.similarity, 6),
        "regions": [region(r) for r in result.regions],
        "peak": region(result.peak),
        "heatmap": result.heatmap,
        "distance": "l2",
        "generation": result.generation,
        "calibration_id": result.calibration_id,
        "fingerprint": result.fingerprint,
        "warning": result.warning,
    }
