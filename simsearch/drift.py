"""Drift: are recent queries scoring like the good images the calibration was measured on?

The drift line is the calibration's own order statistic at 5%: the k-th largest of its N good scores with
k = floor(0.05 (N + 1)) (at least 1), which a new good part exceeds with probability exactly k / (N + 1) if it
looks like the calibration's parts (calibration.py). Over a window of recent comparable queries, the count
above the line is then binomial; a count far in its upper tail (one-sided exact test) says the parts, the
light or the lens have changed before the false alarms at the verdict threshold pile up. Defective parts
count too: a line with a few per cent defects raises the share by about that much.
"""
from __future__ import annotations

import math

import numpy as np

from .calibration import threshold_for_fpr

DRIFT_RATE = 0.05
WINDOW = 200  # recent queries tested
MIN_QUERIES = 30  # fewer say nothing either way
ALPHA = 0.001  # one-sided p-value below which the index is reported as drifting


def drift_line(good_scores: list[float]) -> tuple[float, float]:
    """(N,) calibration good scores -> (the drift line, the share of good parts expected above it)."""
    choice = threshold_for_fpr(np.asarray(good_scores, dtype=np.float64), DRIFT_RATE)
    return choice.threshold, choice.expected_fpr


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sum; n is a window, a few hundred)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


def drift_summary(above: np.ndarray, expected: np.ndarray) -> dict:
    """(n,) bool above the drift line and (n,) expected shares of recent queries -> the drift report."""
    n = int(len(above))
    k = int(np.count_nonzero(above))
    p = float(expected.mean()) if n else None
    report = {"queries": n, "above_line": k, "share": (k / n) if n else None, "expected_share": p,
              "window": WINDOW, "p_value": None, "drifting": None}
    if n >= MIN_QUERIES:
        report["p_value"] = binomial_upper_tail(k, n, p)
        report["drifting"] = bool(report["p_value"] < ALPHA)
    return report
