"""simsearch.calibration: order-statistic thresholds and the F1 threshold."""
from __future__ import annotations

import numpy as np
import pytest

from simsearch.calibration import f1_best_threshold, threshold_for_fpr


def test_199_scores_at_1_percent():
    scores = np.random.default_rng(0).permutation(np.arange(1, 200, dtype=float))
    c = threshold_for_fpr(scores, 0.01)
    assert c.n == 199
    assert c.k == 2  # floor(0.01 * 200)
    assert c.threshold == 198.0  # the 2nd largest
    assert c.expected_fpr == pytest.approx(2 / 200)
    assert c.target_met
    assert c.needed_for_target == 99
    assert c.false_alarms_per_100 == pytest.approx(1.0)
    assert c.describe().startswith("image threshold = 2nd largest of 199 good scores")
    # exactly one good score in 199 lies above the threshold ("anomalous" is score > t)
    assert int((scores > c.threshold).sum()) == c.k - 1


def test_too_few_scores_takes_the_maximum():
    scores = np.array([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.4, 0.6])
    c = threshold_for_fpr(scores, 0.01)
    assert c.k == 1
    assert c.threshold == 0.9
    assert not c.target_met
    assert c.needed_for_target == 99
    assert c.expected_fpr == pytest.approx(1 / 9)
    assert "too few images" in c.describe() and "at least 99" in c.describe()


@pytest.mark.parametrize("n,target,k", [(99, 0.01, 1), (98, 0.01, 1), (19, 0.05, 1), (39, 0.05, 2),
                                        (100, 0.1, 10), (9, 0.1, 1), (1000, 0.001, 1), (9, 0.5, 5)])
def test_k_is_floor_of_target_times_n_plus_1(n, target, k):
    scores = np.arange(n, dtype=float)
    c = threshold_for_fpr(scores, target)
    assert c.k == k
    assert c.threshold == float(n - k)
    assert c.expected_fpr <= target + 1e-12 or not c.target_met


def test_k_is_at_most_n():
    c = threshold_for_fpr(np.array([5.0, 1.0]), 0.9)  # floor(0.9 * 3) = 2 = n
    assert c.k == 2 and c.threshold == 1.0 and c.target_met


def test_ordinals():
    assert "3rd largest" in threshold_for_fpr(np.arange(299.0), 0.01).describe()
    assert "11th largest" in threshold_for_fpr(np.arange(1099.0), 0.01).describe()


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_invalid_target_raises(target):
    with pytest.raises(ValueError, match="false-positive rate"):
        threshold_for_fpr(np.arange(10.0), target)


def test_no_scores_raises():
    with pytest.raises(ValueError, match="at least one"):
        threshold_for_fpr(np.array([]), 0.01)


def test_f1_on_separable_scores():
    good = np.array([0.1, 0.4, 0.35, 0.2, 0.3])
    bad = np.array([0.9, 0.6, 0.75])
    t, f1 = f1_best_threshold(good, bad)
    assert f1 == pytest.approx(1.0)
    assert (good <= t).all() and (bad > t).all()
    assert t == pytest.approx(0.4)  # the largest score below the best cut


def test_f1_flagging_is_strictly_greater():
    # A defect ties with the highest good score: flagging ">" must still give the reported F1.
    good = np.array([1.0, 2.0, 3.0])
    bad = np.array([3.0, 5.0])
    t, f1 = f1_best_threshold(good, bad)
    flagged = np.r_[good, bad] > t
    y = np.r_[np.zeros(3), np.ones(2)].astype(bool)
    tp, fp, fn = int((flagged & y).sum()), int((flagged & ~y).sum()), int((~flagged & y).sum())
    assert f1 == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert f1 == pytest.approx(0.8)  # either cut gives 0.8: flag {5} or {3, 3, 5}


def test_f1_when_every_image_must_be_flagged():
    # The best cut flags everything: the threshold sits just below the lowest score.
    t, f1 = f1_best_threshold(np.array([5.0]), np.array([1.0, 2.0, 3.0]))
    assert f1 == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert t < 1.0 and t == pytest.approx(1.0, abs=1e-5)


def test_f1_needs_defects():
    with pytest.raises(ValueError, match="defective"):
        f1_best_threshold(np.array([1.0, 2.0]), np.array([]))


def test_precision_recall_equals_scikit_learns_curve():
    from sklearn.metrics import precision_recall_curve

    from simsearch.calibration import precision_recall
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[0], labels[-1] = 0, 1
        scores = np.round(rng.normal(size=n), 1 if trial % 2 else 6)  # ties in half the trials
        p, r, t = precision_recall(labels, scores)
        sp, sr, st = precision_recall_curve(labels, scores)
        np.testing.assert_allclose(p, sp[:-1])
        np.testing.assert_allclose(r, sr[:-1])
        np.testing.assert_array_equal(t, st)
