"""What a person reads: heatmap files and the eval tables (the overlay itself is overlay.heatmap_overlay, the HTML
report evaluation/report_page.py, the JSON record records.query_record)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .overlay import heatmap_overlay
from .records import QueryResult


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
    """`query --heatmap-dir`: the image's overlay (regions numbered as in its JSON record) as a PNG in directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / heatmap_name(result.image, taken)
    overlay = heatmap_overlay(rgb, result.anomaly_map, pixel_threshold, result.regions, score=result.score,
                              image_threshold=result.threshold)
    if not cv2.imwrite(str(path), overlay):
        raise OSError(f"could not write {path}")
    return str(path)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def eval_table_rows(results: list, mean: dict | None = None) -> list[dict]:
    """One dict of formatted cells per category (and the mean), in display order."""
    rows = []
    for r in results:
        rows.append({"category": r.category, "method": r.method, "image AUROC": _fmt(r.image_auroc), "pixel AUROC": _fmt(r.pixel_auroc),
                     "AUPRO@0.3": _fmt(r.aupro), "F1@thr": _fmt(r.f1_at_threshold), "best F1": _fmt(r.best_f1),
                     "FPR good": f"{_fmt(r.fpr_good, 3)} (target {r.target_fpr:g})",
                     "seconds": _fmt(round(sum(r.seconds.values()), 1), 1), "peak RSS MiB": _fmt(r.peak_rss_mib, 0)})
    if mean is not None:
        rows.append({"category": "mean", "method": results[0].method if results else "-",
                     "image AUROC": _fmt(mean["image_auroc"]),
                     "pixel AUROC": _fmt(mean["pixel_auroc"]), "AUPRO@0.3": _fmt(mean["aupro"]),
                     "F1@thr": _fmt(mean["f1_at_threshold"]), "best F1": _fmt(mean["best_f1"]),
                     "FPR good": _fmt(mean["fpr_good"], 3), "seconds": _fmt(mean["seconds"], 1),
                     "peak RSS MiB": "-"})
    return rows


def markdown_table(rows: list[dict]) -> list[str]:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
