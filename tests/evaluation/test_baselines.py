"""The simpler approaches: each fits on good images and ranks an obvious outlier above a good image."""
import dataclasses
import functools

import cv2
import numpy as np
import pytest
import torch

from realdata import PIPED, needs_piped, piped_test, piped_train
from simsearch.evaluation.baselines import (BASELINES, ConvAutoencoder, HistogramIForest, ImageKNN, PooledOCSVM,
                                            colour_histogram, nearest_distance, unit_rows)
from simsearch.evaluation.baselines_neural import ConvVAE, Ganomaly, vae_loss
from simsearch.evaluation.feature_cache import FeatureCache
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
    assert set(BASELINES) == {"histogram-iforest", "pooled-ocsvm", "image-knn", "autoencoder", "vae", "ganomaly"}


def test_unit_rows_and_nearest_distance():
    refs = unit_rows(np.array([[3.0, 4.0], [0.0, 2.0]]))
    np.testing.assert_allclose(refs, [[0.6, 0.8], [0.0, 1.0]])
    assert nearest_distance(unit_rows(np.array([[0.0, 5.0]]))[0], refs) == pytest.approx(0.0, abs=1e-6)
    # (1, 0) has cosine 0.6 with (0.6, 0.8) and 0 with (0, 1): the nearest is the first, at sqrt(2 - 2 cos).
    query = unit_rows(np.array([[1.0, 0.0]]))[0]
    assert nearest_distance(query, refs) == pytest.approx(np.sqrt(2 - 2 * 0.6))


def test_image_knn_similarity_is_half_at_the_threshold():
    assert ImageKNN.similarity(0.0, 0.2) == 1.0
    assert ImageKNN.similarity(0.2, 0.2) == pytest.approx(0.5)
    assert ImageKNN.similarity(0.4, 0.2) == pytest.approx(0.25)
    assert ImageKNN.similarity(0.4, 0.0) is None  # no threshold, no similarity


def test_vae_loss_is_zero_only_for_a_perfect_standard_normal_fit():
    x = torch.rand(2, 3, 8, 8)
    zeros = torch.zeros(2, 4)
    assert vae_loss(x, x, zeros, zeros).item() == pytest.approx(0.0, abs=1e-6)
    assert vae_loss(x, x, zeros + 1.0, zeros).item() == pytest.approx(0.5 * 4)  # KL of N(1, 1) per image
    assert vae_loss(x, x * 0, zeros, zeros).item() == pytest.approx(float((x ** 2).flatten(1).sum(1).mean()))


@needs_piped
def test_image_knn_scores_a_reference_zero_and_others_by_their_distance():
    train = piped_train()[:6]
    detector = ImageKNN()
    detector.fit(train)
    assert detector.score(train[0]) == (pytest.approx(0.0, abs=1e-3), None)
    score, amap = detector.score(piped_test("impurity")[0])
    assert amap is None and 0.0 < score <= 2.0
    again = ImageKNN()
    again.fit(train)
    assert again.score(piped_test("impurity")[0])[0] == score


@needs_piped
@pytest.mark.parametrize("cls", [ConvVAE, Ganomaly])
def test_trained_baselines_fit_score_a_map_and_repeat_under_the_seed(cls):
    train, image = piped_train()[:6], piped_test("impurity")[0]
    first, second, other = cls(steps=4, batch=4), cls(steps=4, batch=4), cls(steps=4, batch=4, seed=1)
    for detector in (first, second, other):
        detector.fit(train)
    score, amap = first.score(image)
    assert amap.shape == cv2.imread(str(image)).shape[:2] and np.isfinite(amap).all() and score > 0
    assert first.fit_seconds > 0
    again, amap_again = second.score(image)
    assert again == score and np.array_equal(amap, amap_again)
    assert other.score(image)[0] != score  # the seed matters


@needs_piped
def test_vae_map_scores_the_reconstruction_error():
    detector = ConvVAE(steps=4, batch=4)
    detector.fit(piped_train()[:6])
    score, amap = detector.score(piped_test("impurity")[0])
    assert score == pytest.approx(float(amap.max()))


@needs_piped
def test_the_feature_cache_prepares_each_image_once_for_all_fits():
    cache = FeatureCache()
    train = piped_train()[:6]
    for part in (train, train[:3], train[3:]):
        detector = PooledOCSVM(cache=cache)
        detector.fit(part)
        detector.score(train[0])
    assert cache.misses == 6 and cache.hits == 6 + 3  # every later fit (and score) of a train image hits
    cached_score = detector.score(train[5])[0]
    fresh = PooledOCSVM()
    fresh.fit(train[3:])
    assert fresh.score(train[5])[0] == pytest.approx(cached_score, rel=1e-6)  # the same vectors as without it


@needs_piped
@pytest.mark.parametrize("method", ["vae", "ganomaly", "image-knn"])
def test_new_baselines_through_eval(method, monkeypatch):
    full = load_category(PIPED.parent, PIPED.name)
    category = dataclasses.replace(full, train=full.train[:8], test=full.test[::8])
    if method != "image-knn":  # a tiny training budget for the test
        monkeypatch.setitem(BASELINES, method, functools.partial(BASELINES[method], steps=4, batch=4))
    result = evaluate_category(category, method=method, folds=2)
    assert result.image_auroc is not None and result.threshold > 0
    assert (result.pixel_auroc is None) == (method == "image-knn")
