"""`simsearch eval --report R`: what a quality engineer reads and signs off.

    R/report.html      self-contained (inline CSS, no script, nothing from the network), per category: the metrics
                       with a row per defect type, the confusion counts, the ROC curve, the score histogram with
                       the threshold and the false-alarm rates, the PRO curve (masks permitting) and a gallery of
                       the worst cases as heatmap overlays with the ground-truth contour
    R/report.md        the tables and the gallery in markdown
    R/images.csv       one row per test image: its score, the threshold, the verdict, similarity, regions
    R/<category>/*.png the plots and overlays the pages show (overlays at the images' own resolution)
"""
from __future__ import annotations

import csv
import html
import os
import re
import time
from pathlib import Path

import cv2
import numpy as np

from ..overlay import FLOOR, TOP, heatmap_overlay
from ..report import eval_table_rows, heatmap_name, markdown_table
from ..scoring import similarity_from_score
from . import metrics, plots

GALLERY_SIZE = 4  # images per gallery row
CSV_COLUMNS = ("category", "path", "label", "defect_type", "score", "threshold", "verdict", "similarity", "regions",
               "pixel_threshold", "defect_pixels", "missed_pixels")

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2125}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c5ced8}header a{color:#9ecbff}
main{max-width:1220px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:6px 22px 18px;margin:18px 0}
h2{font-size:19px;border-bottom:2px solid #e3e7ec;padding-bottom:6px}h3{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{padding:5px 10px;border-bottom:1px solid #e3e7ec;text-align:right;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}td:first-child,th:first-child{text-align:left}
tr.sub td:first-child{padding-left:26px;color:#495057}
.facts{display:flex;flex-wrap:wrap;gap:8px 26px;margin:8px 0;color:#343a40}.facts b{color:#000}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px;align-items:start}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.plots img{width:100%;height:auto;border:1px solid #e3e7ec;border-radius:4px}
figure{margin:0;background:#fafbfc;border:1px solid #e3e7ec;border-radius:6px;padding:8px}
.gallery img{image-rendering:pixelated;display:block;width:100%;height:auto}
figcaption{font-size:12.5px;color:#343a40;margin-top:6px;overflow-wrap:anywhere}
.bad{color:#c92a2a;font-weight:600}.ok{color:#2b8a3e;font-weight:600}
.key{font-size:13px;color:#495057}.key span{display:inline-block;width:12px;height:12px;vertical-align:-1px;
margin:0 4px 0 12px;border-radius:2px}
"""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "category"


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _truth(case, shape: tuple[int, int]) -> np.ndarray | None:
    """(H, W) bool ground-truth mask of a case, None when it has none (or it cannot be read at that size)."""
    if case.mask_path is None:
        return None
    mask = cv2.imread(case.mask_path, cv2.IMREAD_GRAYSCALE)
    return None if mask is None or mask.shape != shape else mask > 0


def _missed(case, pixel_threshold: float | None) -> tuple[int, int]:
    """(defect pixels, those of them at or below the pixel threshold: not flagged)."""
    if case.anomaly_map is None:
        return 0, 0
    truth = _truth(case, case.anomaly_map.shape)
    if truth is None:
        return 0, 0
    n = int(truth.sum())
    if pixel_threshold is None:
        return n, 0
    return n, int((truth & (case.anomaly_map <= pixel_threshold)).sum())


def _verdict(score: float, threshold: float) -> str:
    return "ANOMALOUS" if score > threshold else "ok"


def image_rows(result) -> list[dict]:
    """images.csv's rows for one category's result, in the test set's order."""
    rows = []
    for case in result.cases:
        defect_px, missed = _missed(case, result.pixel_threshold)
        similarity = similarity_from_score(case.score, result.threshold)
        rows.append(dict(category=result.category, path=case.path, label=case.label, defect_type=case.defect_type,
                         score=f"{case.score:.6g}", threshold=f"{result.threshold:.6g}",
                         verdict=_verdict(case.score, result.threshold),
                         similarity="" if similarity is None else f"{similarity:.4f}", regions=len(case.regions),
                         pixel_threshold="" if result.pixel_threshold is None else f"{result.pixel_threshold:.6g}",
                         defect_pixels=defect_px, missed_pixels=missed))
    return rows


def worst_cases(result) -> list[tuple[str, list[tuple]]]:
    """[(heading, [(case, why), ...])]: the highest-scored good images, the lowest-scored defects and the
    defects with the most defect pixels left below the pixel threshold."""
    goods = sorted((c for c in result.cases if c.label == 0), key=lambda c: -c.score)[:GALLERY_SIZE]
    defects = sorted((c for c in result.cases if c.label == 1), key=lambda c: c.score)[:GALLERY_SIZE]
    out = [("Highest-scored good images (false alarms first)", [(c, "") for c in goods]),
           ("Lowest-scored defects (misses first)", [(c, "") for c in defects])]
    if result.pixel_threshold is not None:
        missed = [(c, *_missed(c, result.pixel_threshold)) for c in result.cases if c.label == 1]
        missed = sorted((m for m in missed if m[1]), key=lambda m: -m[2])[:GALLERY_SIZE]
        out.append(("Most missed defect pixels (below the pixel threshold)",
                    [(c, f"missed {lost} of {n} defect px ({lost / n:.0%})") for c, n, lost in missed]))
    return [(heading, picks) for heading, picks in out if picks]


def _overlay_file(case, result, folder: Path, taken: set[str]) -> tuple[str, int]:
    """Write a case's overlay PNG into folder; -> (file name, width px)."""
    from ..images import load_image

    name = heatmap_name(case.path, taken)
    rgb = load_image(case.path).rgb
    amap = case.anomaly_map if case.anomaly_map is not None else np.zeros(rgb.shape[:2], np.float32)
    overlay = heatmap_overlay(rgb, amap, result.pixel_threshold, case.regions, score=case.score,
                              image_threshold=result.threshold, truth=_truth(case, amap.shape))
    if not cv2.imwrite(str(folder / name), overlay):
        raise OSError(f"could not write {folder / name}")
    return name, overlay.shape[1]


def _metrics_table(result) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("images", "count", "image AUROC", "pixel AUROC", "AUPRO@0.3"))
    rows = [f"<tr><td>all defects vs good</td><td>{result.n_test_defect} + {result.n_test_good} good</td>"
            f"<td>{_fmt(result.image_auroc)}</td><td>{_fmt(result.pixel_auroc)}</td><td>{_fmt(result.aupro)}</td></tr>"]
    for kind, m in result.per_defect.items():
        rows.append(f"<tr class=sub><td>{html.escape(kind)}</td><td>{m['count']}</td><td>{_fmt(m['image_auroc'])}</td>"
                    f"<td>{_fmt(m['pixel_auroc'])}</td><td>{_fmt(m['aupro'])}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _confusion_table(result) -> str:
    c = result.confusion
    return ("<table><tr><th>at the threshold</th><th>flagged</th><th>passed</th></tr>"
            f"<tr><td>defective</td><td>TP {c.get('tp', '-')}</td><td class=bad>FN {c.get('fn', '-')}</td></tr>"
            f"<tr><td>good</td><td class=bad>FP {c.get('fp', '-')}</td><td>TN {c.get('tn', '-')}</td></tr></table>")


def _plots(result, folder: Path) -> list[tuple[str, str]]:
    """[(file name, alt text)] of the category's plots, written into folder."""
    labels = np.array([c.label for c in result.cases])
    scores = np.array([c.score for c in result.cases])
    out = []
    if 0 < labels.sum() < len(labels):
        plots.roc_plot(labels, scores, result.threshold, folder / "roc.png", f"{result.category}: ROC (images)")
        out.append(("roc.png", "ROC curve of the image scores"))
    plots.score_histogram(scores[labels == 0], scores[labels == 1], result.threshold, result.expected_fpr,
                          result.target_fpr, result.fpr_good, folder / "scores.png", f"{result.category}: image scores")
    out.append(("scores.png", "histogram of good and defective image scores with the threshold"))
    with_maps = [c for c in result.cases if c.anomaly_map is not None]
    if result.aupro is not None and len(with_maps) == len(result.cases):
        masks = [t if (t := _truth(c, c.anomaly_map.shape)) is not None else np.zeros(c.anomaly_map.shape, bool)
                 for c in result.cases]
        curve = metrics.pro_curve(masks, [c.anomaly_map for c in result.cases], max_fpr=0.3)
        if curve is not None:
            plots.pro_plot(curve[0], curve[1], result.aupro, 0.3, folder / "pro.png", f"{result.category}: PRO curve")
            out.append(("pro.png", "per-region-overlap curve"))
    return out


def _category_section(result, directory: Path, md: list[str]) -> str:
    slug = _slug(result.category)
    folder = directory / slug
    folder.mkdir(parents=True, exist_ok=True)
    pix = "-" if result.pixel_threshold is None else f"{result.pixel_threshold:.4f}"
    facts = [("image threshold", f"{result.threshold:.4f}"), ("pixel threshold", pix),
             ("min region", "-" if result.min_region_area is None else f"{result.min_region_area} px"),
             ("false alarms expected", f"{result.expected_fpr:.1%} (target {result.target_fpr:.1%})"),
             ("measured on test/good", "-" if result.fpr_good is None else f"{result.fpr_good:.1%}"),
             ("F1 at threshold", _fmt(result.f1_at_threshold, 3)), ("train/good", str(result.n_train))]
    parts = [f"<section id='{html.escape(slug)}'><h2>{html.escape(result.category)} "
             f"<small>({html.escape(result.method)})</small></h2>",
             "<div class=facts>" + "".join(f"<div>{k}: <b>{html.escape(v)}</b></div>" for k, v in facts) + "</div>",
             "<h3>Metrics</h3>", _metrics_table(result), _confusion_table(result), "<h3>Curves</h3><div class=plots>"]
    md += ["", f"## {result.category}", "", "  ".join(f"{k}: {v}" for k, v in facts), ""]
    for kind, m in result.per_defect.items():
        md.append(f"- {kind} ({m['count']}): image AUROC {_fmt(m['image_auroc'])}, pixel AUROC "
                  f"{_fmt(m['pixel_auroc'])}, AUPRO {_fmt(m['aupro'])}")
    c = result.confusion
    md += ["", f"TP {c.get('tp')}  FN {c.get('fn')}  FP {c.get('fp')}  TN {c.get('tn')}", ""]
    for name, alt in _plots(result, folder):
        parts.append(f"<img src='{slug}/{name}' alt='{html.escape(alt)}'>")
        md.append(f"![{alt}]({slug}/{name})")
    parts.append("</div>")
    taken: set[str] = set()
    for heading, picks in worst_cases(result):
        parts.append(f"<h3>{html.escape(heading)}</h3><div class=gallery>")
        md += ["", f"### {heading}", ""]
        for case, why in picks:
            name, width = _overlay_file(case, result, folder, taken)
            verdict = _verdict(case.score, result.threshold)
            css = "bad" if (verdict == "ok") == bool(case.label) else "ok"  # a wrong verdict in red
            caption = (f"<b>{html.escape(Path(case.path).name)}</b> ({html.escape(case.defect_type)})<br>"
                       f"score {case.score:.4f}: <span class={css}>{verdict}</span>, {len(case.regions)} regions"
                       + (f"<br>{html.escape(why)}" if why else ""))
            parts.append(f"<figure><img src='{slug}/{html.escape(name)}' width={max(width, 256)} "
                         f"alt='overlay of {html.escape(Path(case.path).name)}'><figcaption>{caption}</figcaption>"
                         "</figure>")
            md.append(f"- `{case.path}` ({case.defect_type}): score {case.score:.4f}, {verdict} {why}  \n"
                      f"  ![{Path(case.path).name}]({slug}/{name})")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def write_eval_report(results: list, mean: dict, directory: str | os.PathLike, title: str) -> str:
    """report.html, report.md, images.csv and the PNGs they show, in directory; -> the path of report.html."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerows(image_rows(result))
    rows = eval_table_rows(results, mean)
    md = [f"# {title}", "", *markdown_table(rows)]
    summary = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in rows[0]) + "</tr>"
               + "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
                         for row in rows) + "</table>")
    key = (f"<p class=key>Overlays: the image is unchanged where its anomaly map is below {FLOOR:g} x the pixel "
           "threshold;<span style='background:#8000ff'></span>violet from there,"
           "<span style='background:#ff00ff'></span>magenta at the pixel threshold,"
           f"<span style='background:#ff0000'></span>red at {TOP:g} x it;"
           "<span style='background:#00ffff'></span>boxes: flagged regions, numbered by score;"
           "<span style='background:#00e600'></span>contour: the ground-truth defect. The strip under each image "
           "gives its score against the image threshold and the colour bar.</p>")
    sections = [_category_section(result, directory, md) for result in results]
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
            "<meta name=viewport content='width=device-width,initial-scale=1'>",
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
            f"<header><h1>{html.escape(title)}</h1><p>generated {generated}; per image: "
            "<a href='images.csv'>images.csv</a>; markdown: <a href='report.md'>report.md</a></p></header><main>",
            "<section><h2>Summary</h2>", summary, key, "</section>", *sections, "</main></body></html>"]
    (directory / "report.md").write_text("\n".join(md) + "\n")
    (directory / "report.html").write_text("\n".join(page) + "\n")
    return str(directory / "report.html")
