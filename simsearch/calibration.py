"""Thresholds from good images that are not in the bank.

The rule (order statistics, no distribution assumed): with N good scores and target false-positive
rate a, the threshold is the k-th largest score, k = floor(a * (N + 1)), and "anomalous" means
score > threshold. If good scores are exchangeable with a new good part's, the chance that the new
part exceeds the k-th largest of N is exactly k / (N + 1): that is the expected false-alarm rate,
and it is at most a. With fewer than 1/a - 1 images k would be 0; the rule then takes the largest
score (k = 1) and reports the rate it can promise, 1 / (N + 1), which is above the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ThresholdChoice:
    threshold: float
    k: int  # the threshold is the k-th largest good score
    n: int
    expected_fpr: float  # k / (n + 1)
    target_met: bool
    needed_for_target: int  # good images the target needs: 1/a - 1

    @property
    def false_alarms_per_100(self) -> float:
        return 100.0 * self.expected_fpr

    def describe(self, what: str = "image") -> str:
        rule = f"{what} threshold = {self.k}{_ordinal(self.k)} largest of {self.n} good scores"
        meaning = f"about {self.false_alarms_per_100:.2g} false alarms per 100 good parts"
        if not self.target_met:
            need = self.needed_for_target
            meaning += f" (too few images to reach the target: it needs at least {need})"
        return f"{rule}; {meaning}"


def _ordinal(k: int) -> str:
    return "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")


def threshold_for_fpr(good_scores: np.ndarray, target_fpr: float) -> ThresholdChoice:
    """(N,) good scores -> the k-th largest as threshold (see module docstring)."""
    s = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())[::-1]
    if not len(s):
        raise ValueError("calibration needs at least one good image")
    if not 0 < target_fpr < 1:
        raise ValueError(f"target false-positive rate must be in (0, 1), got {target_fpr}")
    n = len(s)
    k = math.floor(target_fpr * (n + 1) + 1e-9)
    met = k >= 1
    k = min(max(k, 1), n)
    return ThresholdChoice(threshold=float(s[k - 1]), k=k, n=n, expected_fpr=k / (n + 1), target_met=met,
                           needed_for_target=math.ceil(1 / target_fpr - 1 - 1e-9))


def f1_best_threshold(good_scores: np.ndarray, defect_scores: np.ndarray) -> tuple[float, float]:
    """The threshold (flag score > t) that maximises F1 on labelled scores -> (threshold, F1)."""
    good = np.asarray(good_scores, dtype=np.float64).ravel()
    bad = np.asarray(defect_scores, dtype=np.float64).ravel()
    if not len(bad):
        raise ValueError("the F1 threshold needs at least one defective image")
    y = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    s = np.r_[good, bad]
    precision, recall, thresholds = precision_recall(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    # The curve flags score >= t; take the largest score below t so that "> t" agrees.
    below = s[s < thresholds[best]]
    t = float(below.max()) if len(below) else float(thresholds[best]) - 1e-6
    return t, float(f1[best])


def precision_recall(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) 0/1 labels and (N,) scores -> precision, recall and thresholds (each (T,), thresholds the distinct
    scores, increasing) of flagging score >= threshold: scikit-learn's precision_recall_curve without its
    final (1, 0) point, in numpy, so that calibrating needs no scikit-learn."""
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last position of each distinct score
    tps = np.cumsum(hits)[last]
    fps = last + 1 - tps
    precision = np.where(tps + fps > 0, tps / np.maximum(tps + fps, 1), 0.0)
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps, dtype=float)
    return precision[::-1], recall[::-1], ranked[last][::-1]
