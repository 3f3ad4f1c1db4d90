"""simsearch.store.twostage and scoring.two_stage_neighbours on a small synthetic bank: stage 1's distances are
upper bounds of the exact ones, refined patches get the exact answer, and the image score is exact search's."""
from __future__ import annotations

import numpy as np
import pytest

from realdata import needs_piped, piped_test, piped_train
from simsearch import Engine
from simsearch.config import SearchConfig
from simsearch.images import load_image
from simsearch.scoring import refine_candidates, score_vectors, two_stage_neighbours
from simsearch.store.spreads import bank_spreads
from simsearch.store.twostage import (TwoStageBank, flat_knn, gather, image_groups, merge_neighbours,
                                      unit_mean)
from simsearch.store.vectors import VectorIndex

DIM = 16


def synthetic_bank(images: int = 40, per_image: int = 60, seed: int = 0):
    """Reference images whose patches cluster around an image-specific mean (so pooled retrieval has meaning)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(images, DIM)).astype(np.float32) * 3
    vectors = np.concatenate([c + rng.normal(size=(per_image, DIM)).astype(np.float32) for c in centres])
    owners = np.stack([np.arange(len(vectors)) * 3 + 7, np.repeat(np.arange(images) * 10 + 1, per_image)], axis=1)
    return vectors, owners, centres, rng


def two_stage(vectors, owners, images_per_query=3, spreads=True):
    bank = VectorIndex.from_vectors("flat", vectors, owners[:, 0])
    pooled = np.stack([unit_mean(vectors[owners[:, 1] == i]) for i in np.unique(owners[:, 1])])
    images = VectorIndex.from_vectors("flat", pooled, np.unique(owners[:, 1]))
    if spreads:
        return TwoStageBank.build(bank, images, owners, images_per_query=images_per_query), bank
    return TwoStageBank(bank, images, image_groups(owners), None, images_per_query), bank


def test_groups_gather_each_images_ids():
    owners = np.array([[5, 2], [1, 9], [3, 2], [8, 9], [4, 4]])
    groups = image_groups(owners)
    assert groups.images.tolist() == [2, 4, 9]
    assert gather(groups, np.array([9, 2])).tolist() == [1, 8, 3, 5]
    assert gather(groups, np.array([7])).tolist() == []  # an unknown image gives nothing


def test_flat_knn_is_exact_and_pads_past_the_base():
    rng = np.random.default_rng(1)
    base, q = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    d, i = flat_knn(q, base, np.arange(5) + 100, 7)
    full = np.linalg.norm(q[:, None] - base[None], axis=2)
    assert np.allclose(d[:, :5], np.sort(full, axis=1), atol=1e-4)
    assert (i[:, :5] == np.argsort(full, axis=1) + 100).all() and (i[:, 5:] == -1).all()


def test_merge_keeps_the_nearest_of_both_once():
    d, i = merge_neighbours(np.array([[1.0, 3.0]]), np.array([[10, 11]]), np.array([[0.5, 1.0]]),
                            np.array([[12, 10]]), 2)
    assert i.tolist() == [[12, 10]] and d.tolist() == [[0.5, 1.0]]


def test_stage_one_distances_are_upper_bounds_of_exact():
    vectors, owners, centres, rng = synthetic_bank()
    ts, bank = two_stage(vectors, owners)
    query = centres[4] + rng.normal(size=(50, DIM)).astype(np.float32)
    d1, i1 = ts.coarse_search(query, 3)
    de, _ = bank.search(query, 3)
    assert (d1 >= de - 1e-4).all()
    assert np.isin(i1, owners[:, 0]).all()  # distances to real stored vectors
    # the gathered vectors are those of the 3 images nearest the pooled query: image 4 among them
    assert np.isin(i1[:, 0], owners[owners[:, 1] == 41, 0]).mean() > 0.5


@pytest.mark.parametrize("k", [1, 3])
def test_two_stage_equals_exact_on_refined_and_in_the_image_score(k):
    vectors, owners, centres, rng = synthetic_bank()
    ts, bank = two_stage(vectors, owners, spreads=False)  # the bank's own spreads: the same discount as exact
    search = SearchConfig(k_neighbours=k, image_top_k=4)
    query = np.concatenate([centres[7] + rng.normal(size=(60, DIM)), rng.normal(size=(5, DIM)) * 6]).astype(np.float32)
    d, ids, refined = two_stage_neighbours(ts, query, search)
    de, ie = bank.search(query, k)
    assert np.allclose(d[refined], de[refined], atol=1e-4) and (ids[refined] == ie[refined]).all()
    assert (d >= de - 1e-4).all()  # unrefined ones keep their upper bounds
    assert 0 < refined.sum() < len(query)  # not everything went to stage 2
    assert refined[-5:].all()  # the far-off patches are among the refined
    exact = score_vectors(bank, query, search)
    got = score_vectors(ts, query, search)
    assert got.image_score == pytest.approx(exact.image_score, rel=1e-5)
    assert got.refined is not None and exact.refined is None


def test_search_near_walks_hnsw_from_the_given_start_and_falls_back_without_one():
    vectors, owners, centres, rng = synthetic_bank(images=30, per_image=100)
    ids = owners[:, 0]
    graph = VectorIndex.from_vectors("hnsw", vectors, ids)
    exact = VectorIndex.from_vectors("flat", vectors, ids)
    query = centres[rng.integers(0, 30, 200)] + rng.normal(size=(200, DIM)).astype(np.float32)
    de, ie = exact.search(query, 2)
    # start each walk at a stored vector that is near but not the nearest (the exact search's second)
    start_d = np.linalg.norm(query - vectors[np.searchsorted(ids, ie[:, 1])], axis=1)
    d, i = graph.search_near(query, 2, ie[:, 1], start_d, breadth=32)
    assert d.shape == i.shape == (200, 2) and d.dtype == np.float32
    assert (i[:, 0] == ie[:, 0]).mean() >= 0.95  # the walk finds the nearest from a near start
    assert np.allclose(d, np.linalg.norm(query[:, None] - vectors[np.searchsorted(ids, i)], axis=2), atol=1e-3)
    # an unknown start (-1, or an id the bank lacks) is searched from the entry point instead
    starts = ie[:, 1].copy()
    starts[:5], starts[5:10] = -1, 10 ** 9
    d2, i2 = graph.search_near(query, 2, starts, start_d, breadth=32)
    plain_d, plain_i = graph.search(query[:10], 2)
    assert (i2[:10] == plain_i).all() and np.allclose(d2[:10], plain_d)
    # kinds without a graph ignore the start: the same answers as `search`
    assert all((a == b).all() for a, b in zip(exact.search_near(query, 2, ie[:, 1], start_d, 32), (de, ie)))
    with pytest.raises(ValueError, match="holds no vectors"):  # an empty graph refuses as `search` does
        VectorIndex.create("hnsw", DIM).search_near(query, 1, ie[:, 1], start_d, 32)


def test_refine_candidates_by_level_and_floor():
    upper = np.array([5.0, 1.0, 3.0, 2.0])
    done = np.array([True, False, False, False])
    assert refine_candidates(upper, done, 2.5, None).tolist() == [False, False, True, False]
    assert refine_candidates(upper, done, 2.5, 1.5).tolist() == [False, False, True, True]


def test_bank_spreads_match_the_exact_spread_on_a_small_bank():
    vectors, owners, _, _ = synthetic_bank(images=30, per_image=100)
    bank = VectorIndex.from_vectors("flat", vectors)
    exact = bank.spread(np.arange(len(vectors)))
    approx = bank_spreads(vectors)
    assert (approx >= exact - 1e-4).all()  # fewer candidates can only lengthen the distances
    assert np.median(approx / exact) < 1.02


@needs_piped
def test_engine_scores_through_the_two_stage_bank_on_real_images(tmp_path):
    """An index with two_stage "on": queries and calibration folds score in two stages; the refined patches and
    the image score are exact search's (up to the spread table, which is approximate)."""
    engine = Engine.create(tmp_path / "ix", two_stage="on")
    engine.add([str(p) for p in piped_train()[:6]])
    view = engine.banks.view()
    scorer = engine.banks.scorer(view)
    assert scorer.kind == "two-stage/flat" and engine.banks.scorer(view) is scorer  # built once per generation
    grid = engine.embedder.embed(load_image(piped_test("impurity")[0]))
    vectors = grid.features.reshape(-1, grid.features.shape[-1])
    two = score_vectors(scorer, vectors, engine.config.search)
    exact = score_vectors(view.patches, vectors, engine.config.search)
    assert np.allclose(two.scores[two.refined], exact.scores[two.refined], atol=1e-4)
    assert (two.scores >= exact.scores - 1e-4).all() and two.refined.sum() < len(vectors)
    assert two.image_score == pytest.approx(exact.image_score, rel=0.02)
    assert engine.query(str(piped_test("impurity")[0])).score == pytest.approx(two.image_score, rel=1e-6)
    engine.calibrate(folds=2)
    assert engine.latest_calibration()["image_threshold"] > 0
    engine.close()
