"""Drift: are recent queries scoring like the good images the calibration was measured on?

The drift line is the calibration's own order statistic at 5%: the k-th largest of its N good scores with
k = floor(0.05 (N + 1)) (at least 1), which a new good part exceeds with probability k / (N + 1) on average if
it looks like the calibration's parts (calibration.py). Over a window of n recent comparable queries the count
above the line is then beta-binomial, BetaBinomial(n, k, N + 1 - k), exactly, for any N: the chance p that
one part exceeds the line is itself Beta(k, N + 1 - k) distributed over calibrations, and the window's parts
share one calibration. (A plain binomial test with p = k / (N + 1) would ignore that and, with a few dozen
calibration images, cry drift on good parts far more often than its level.) A count far in the upper tail
(one-sided exact test) says the parts, the light or the lens have changed before the false alarms at the
verdict threshold pile up. Defective parts count too: a line with a few per cent defects raises the share
by about that much.
"""
from __future__ import annotations

import math

import numpy as np

from .calibration import threshold_for_fpr

DRIFT_RATE = 0.05
WINDOW = 200  # recent queries tested
MIN_QUERIES = 30  # fewer say nothing either way
ALPHA = 0.001  # one-sided p-value below which the index is reported as drifting


def drift_line(good_scores: list[float]) -> tuple[float, int, int]:
    """(N,) calibration good scores -> (the drift line, its rank k from the top, N)."""
    choice = threshold_for_fpr(np.asarray(good_scores, dtype=np.float64), DRIFT_RATE)
    return choice.threshold, choice.k, choice.n


def beta_binomial_upper_tail(x: int, n: int, k: int, n_cal: int) -> float:
    """P(X >= x) for X the number of n new exchangeable scores above the k-th largest of n_cal old ones:
    X ~ BetaBinomial(n, a = k, b = n_cal + 1 - k). Exact, in log space."""
    if x <= 0:
        return 1.0
    if x > n:
        return 0.0
    a, b = float(k), float(n_cal + 1 - k)

    def log_beta(p: float, q: float) -> float:
        return math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_beta(i + a, n - i + b)
            - log_beta(a, b) for i in range(x, n + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


def drift_summary(above: np.ndarray, k: int | None, n_cal: int | None) -> dict:
    """(n,) bool above the drift line of recent queries (newest first), and the (k, N) of the newest one's
    calibration -> the drift report."""
    n = int(len(above))
    count = int(np.count_nonzero(above))
    report = {"queries": n, "above_line": count, "share": (count / n) if n else None,
              "expected_share": (k / (n_cal + 1)) if n and k else None, "window": WINDOW, "p_value": None,
              "drifting": None}
    if n >= MIN_QUERIES and k:
        report["p_value"] = beta_binomial_upper_tail(count, n, k, n_cal)
        report["drifting"] = bool(report["p_value"] < ALPHA)
    return report
