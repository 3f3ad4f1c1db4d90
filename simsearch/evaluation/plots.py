"""The eval report's plots as PNG files (matplotlib, Agg backend; imported inside each function so that the
CLI starts without it). Each takes plain arrays and a path, and returns the path written."""
from __future__ import annotations

from pathlib import Path

import numpy as np

GOOD_COLOUR, DEFECT_COLOUR, THRESHOLD_COLOUR = "#2b8a3e", "#c92a2a", "#1c1c1c"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never a window, never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return str(path)


def roc_plot(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path, title: str) -> str:
    """ROC curve of image scores (labels (N,) 1 = defective, scores (N,)), the calibrated threshold marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    flagged = scores > threshold
    at_fpr = flagged[labels == 0].mean() if (labels == 0).any() else 0.0
    at_tpr = flagged[labels == 1].mean() if (labels == 1).any() else 0.0
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.plot(fpr, tpr, color=DEFECT_COLOUR, lw=2, label=f"AUROC {roc_auc_score(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], color="#adb5bd", lw=1, ls="--", label="chance")
    ax.plot([at_fpr], [at_tpr], "o", color=THRESHOLD_COLOUR, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="false-positive rate (good flagged)", ylabel="true-positive rate (defects flagged)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_histogram(good: np.ndarray, defect: np.ndarray, threshold: float, expected_fpr: float,
                    target_fpr: float, measured_fpr: float | None, path: Path, title: str) -> str:
    """Histograms of good (N_g,) and defective (N_d,) image scores with the threshold line, and in the legend
    the false-alarm rate the threshold rule expects next to the one measured on the good test images."""
    plt = _pyplot()
    values = np.concatenate([good, defect, [threshold]])
    bins = np.linspace(values.min(), values.max(), 31)
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    if good.size:
        ax.hist(good, bins=bins, color=GOOD_COLOUR, alpha=0.6, label=f"good ({good.size})")
    if defect.size:
        ax.hist(defect, bins=bins, color=DEFECT_COLOUR, alpha=0.6, label=f"defective ({defect.size})")
    measured = "-" if measured_fpr is None else f"{measured_fpr:.1%}"
    ax.axvline(threshold, color=THRESHOLD_COLOUR, lw=2, ls="--",
               label=f"threshold {threshold:.3f}\nfalse alarms: expected {expected_fpr:.1%}\n"
                     f"(target {target_fpr:.1%}), measured {measured}")
    ax.set(xlabel="image score (higher = more anomalous)", ylabel="test images", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pro_plot(fpr: np.ndarray, pro: np.ndarray, aupro: float | None, max_fpr: float, path: Path, title: str) -> str:
    """The PRO curve (fpr (K,), pro (K,) from metrics.pro_curve) up to max_fpr, the integrated part shaded."""
    plt = _pyplot()
    inside = fpr <= max_fpr
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.plot(fpr[inside], pro[inside], color="#1864ab", lw=2,
            label="PRO" + ("" if aupro is None else f" (AUPRO@{max_fpr:g} {aupro:.3f})"))
    ax.fill_between(fpr[inside], pro[inside], color="#1864ab", alpha=0.15)
    ax.set(xlabel="false-positive rate (normal pixels flagged)", ylabel="per-region overlap",
           xlim=(0, max_fpr), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def metric_bars(table: dict[str, dict[str, float | None]], metric: str, path: Path, title: str) -> str:
    """One bar per method per group: table = {group (dataset or category): {method: value or None}}."""
    plt = _pyplot()
    groups = list(table)
    methods = sorted({m for row in table.values() for m in row})
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(groups) * max(1, len(methods)) + 3), 3.8))
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        values = [table[g].get(method) for g in groups]
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, heights, width, label=method)
        for bar, v in zip(bars, values):
            if v is not None:
                ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", fontsize=7)
    ax.set_xticks(x, groups)
    ax.set(ylabel=metric, ylim=(0, 1.1), title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
