"""The simpler approaches: each fits on good images and ranks an obvious outlier above a good image."""
import cv2
import numpy as np
import pytest

from realdata import PIPED, needs_piped, piped_test, piped_train
from simsearch.evaluation.baselines import (BASELINES, ConvAutoencoder, HistogramIForest, PooledOCSVM,
                                            colour_histogram)
from simsearch.evaluation.datasets import load_category
from simsearch.evaluation.runner import evaluate_category


def test_colour_histogram_blocks_are_normalised():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    h = colour_histogram(rgb, bins=16)
    assert h.shape == (96,)
    np.testing.assert_allclose(h.reshape(6, 16).sum(axis=1), 1.0, rtol=1e-6)
    assert h[15] == pytest.approx(1.0)  # every R value in the top bin
    assert h[16] == pytest.approx(1.0)  # every G value in the bottom bin


@pytest.fixture
def outlier(tmp_path):
    """A good PIPED image with a dark painted blotch, and its clean twin."""
    clean = cv2.imread(str(piped_test("good")[0]))
    dirty = clean.copy()
    cv2.circle(dirty, (64, 64), 18, (20, 20, 20), -1)
    path = tmp_path / "blotch.png"
    cv2.imwrite(str(path), dirty)
    return path, piped_test("good")[0]


@needs_piped
@pytest.mark.parametrize("make", [HistogramIForest, PooledOCSVM, lambda: ConvAutoencoder(steps=150)])
def test_outlier_scores_above_good(make, outlier):
    detector = make()
    detector.fit(piped_train()[:16])
    bad, good = outlier
    assert detector.score(bad)[0] > detector.score(good)[0]


@needs_piped
def test_autoencoder_map_is_at_image_size_and_highest_on_the_blotch(outlier):
    detector = ConvAutoencoder(steps=150)
    detector.fit(piped_train()[:16])
    score, amap = detector.score(outlier[0])
    assert amap.shape == (128, 128) and score == pytest.approx(float(amap.max()))
    inside = np.zeros((128, 128), bool)
    cv2.circle(inside.view(np.uint8), (64, 64), 18, 1, -1)
    assert amap[inside].mean() > 2 * amap[~inside].mean()


@needs_piped
def test_image_level_baseline_through_eval_has_no_pixel_metrics():
    result = evaluate_category(load_category(PIPED.parent, PIPED.name), method="histogram-iforest", folds=2)
    assert result.method == "histogram-iforest" and result.image_auroc is not None
    assert result.pixel_auroc is None and result.aupro is None
    assert set(BASELINES) == {"histogram-iforest", "pooled-ocsvm", "autoencoder"}
