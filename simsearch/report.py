"""What a person reads: heatmap overlays and the eval report (the JSON record is records.query_record)."""
from __future__ import annotations

import html
import os
from pathlib import Path

import cv2
import numpy as np

from .records import QueryResult


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


def _showcase(result) -> list[tuple[str, tuple]]:
    """The cases a person should look at: best and worst detected defect, worst good image."""
    defects = sorted((c for c in result.cases if c[1] == 1), key=lambda c: c[2])
    goods = sorted((c for c in result.cases if c[1] == 0), key=lambda c: c[2])
    picks = []
    if defects:
        picks += [("best-scored defect", defects[-1]), ("worst-scored defect", defects[0])]
    if goods:
        picks.append(("highest-scored good image", goods[-1]))
    return picks


def write_eval_report(results: list, mean: dict, directory: str | os.PathLike, title: str) -> str:
    """report.md + report.html with the table and heatmap overlays of the showcase cases."""
    from .images import load_image

    directory = Path(directory)
    (directory / "heatmaps").mkdir(parents=True, exist_ok=True)
    rows = eval_table_rows(results, mean)
    header = list(rows[0])
    md = [f"# {title}", "", *markdown_table(rows)]
    body = [f"<h1>{html.escape(title)}</h1>", "<table border=1 cellpadding=4><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows]
    body.append("</table>")
    taken: set[str] = set()
    for result in results:
        md += ["", f"## {result.category}", "", f"Threshold {result.threshold:.4f} (from train/good cross-scores).", ""]
        body.append(f"<h2>{html.escape(result.category)}</h2>")
        for label, (path, _truth, score, amap) in _showcase(result):
            name = heatmap_name(path, taken)
            overlay = heatmap_overlay(load_image(path).rgb, amap, result.threshold)
            cv2.imwrite(str(directory / "heatmaps" / name), overlay)
            md += [f"**{label}**: `{path}`, score {score:.4f}", "", f"![{label}](heatmaps/{name})", ""]
            body.append(f"<figure><img src='heatmaps/{html.escape(name)}' style='max-width:480px'>"
                        f"<figcaption>{html.escape(label)}: {html.escape(path)}, score {score:.4f}</figcaption></figure>")
    (directory / "report.md").write_text("\n".join(md) + "\n")
    (directory / "report.html").write_text("<!doctype html><meta charset=utf-8><title>" + html.escape(title)
                                           + "</title>" + "\n".join(body) + "\n")
    return str(directory / "report.md")
