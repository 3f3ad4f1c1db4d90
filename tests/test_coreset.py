"""simsearch.coreset: greedy k-center selection on a random projection."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from simsearch.coreset import Coreset, coreset_size, coverage_radius, select_coreset


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """Tiny searches gain nothing from threads; on a busy machine OpenMP barriers only slow them."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _blobs(n, dim=16, n_clusters=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 6
    return (centres[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def _naive_greedy(x, k, first, start=None):
    """Reference k-center: full distance recomputation, float64."""
    x = x.astype(np.float64)
    min_d = np.full(len(x), np.inf) if start is None else start.astype(np.float64).copy()
    picks, current = [], first
    for _ in range(k):
        picks.append(current)
        min_d = np.minimum(min_d, np.linalg.norm(x - x[current], axis=1))
        min_d[picks] = -np.inf
        current = int(np.argmax(min_d))
    return np.array(picks)


def test_picks_n_select_distinct_indices():
    x = _blobs(3000)
    chosen = select_coreset(x, size=150).indices
    assert chosen.dtype == np.int64 and chosen.shape == (150,)
    assert len(set(chosen.tolist())) == 150 and chosen.min() >= 0 and chosen.max() < 3000
    np.testing.assert_array_equal(select_coreset(x[:40], size=40).indices, np.arange(40))
    with pytest.raises(ValueError, match="size"):
        select_coreset(x, size=0)


def test_exact_duplicates_are_still_picked_once_each():
    x = np.repeat(_blobs(5), 40, axis=0)  # 5 distinct vectors, 40 copies each
    chosen = select_coreset(x, size=199).indices
    assert len(set(chosen.tolist())) == 199
    assert len({tuple(v) for v in x[chosen[:5]]}) == 5  # one of each distinct vector comes first


def test_matches_a_naive_greedy_k_center_without_projection():
    x = _blobs(800, dim=16)
    result = select_coreset(x, size=60, projection_dim=128, seed=3)  # 16 <= 128: no projection
    assert not result.projected
    np.testing.assert_array_equal(result.indices, _naive_greedy(x, 60, int(result.indices[0])))
    # its radius is the true coverage radius then
    assert result.radius == pytest.approx(coverage_radius(x, result.indices), rel=1e-4)


def test_deterministic_with_a_seed_and_prefix_stable():
    x = _blobs(2000, dim=200)  # > projection_dim: the projection is used
    a = select_coreset(x, size=100, seed=5).indices
    np.testing.assert_array_equal(a, select_coreset(x, size=100, seed=5).indices)
    assert not np.array_equal(a, select_coreset(x, size=100, seed=6).indices)
    # greedy: a smaller coreset is the start of a larger one
    np.testing.assert_array_equal(select_coreset(x, size=30, seed=5).indices, a[:30])
    assert select_coreset(x, size=100, seed=5).projected


def test_coverage_radius_decreases_as_n_select_grows():
    x = _blobs(3000, dim=160)
    radii, projected = [], []
    for k in (4, 16, 64, 256):
        result = select_coreset(x, size=k, seed=1)
        radii.append(coverage_radius(x, result.indices))
        projected.append(result.radius)
    assert all(a > b for a, b in zip(radii, radii[1:])), radii
    assert all(a > b for a, b in zip(projected, projected[1:])), projected
    # the projection roughly preserves distances: the two radii agree to within a few tens of percent
    assert all(0.6 < p / r < 1.4 for p, r in zip(projected, radii))
    assert coverage_radius(x, np.arange(len(x))) == 0.0


def test_a_planted_far_outlier_is_picked_early():
    x = _blobs(4000, dim=160)
    x[1234] = 60.0  # far from every cluster
    chosen = select_coreset(x, size=40, seed=0).indices
    assert 1234 in chosen[:2].tolist()  # the first pick is random; the farthest point comes next at the latest
    assert 1234 in select_coreset(x, ratio=0.01, seed=9).indices[:2].tolist()


def test_existing_bank_makes_its_near_duplicates_come_last():
    rng = np.random.default_rng(4)
    bank = _blobs(500, dim=140, seed=1)
    fresh = _blobs(300, dim=140, seed=2) + 8.0  # not in the bank
    near_bank = bank[rng.choice(500, 300)] + 0.01 * rng.standard_normal((300, 140)).astype(np.float32)
    new = np.concatenate([near_bank, fresh])
    is_fresh = np.arange(len(new)) >= 300
    order = select_coreset(new, size=len(new) - 1, existing=bank).indices
    assert is_fresh[order[:300]].all()  # every fresh vector before any near-duplicate of the bank
    # the bank's own distances (as its index would give them) order the selection the same way
    nearest = np.sqrt(faiss.knn(new, bank, 1)[0][:, 0])
    order2 = select_coreset(new, size=len(new) - 1, existing_distances=nearest).indices
    assert is_fresh[order2[:300]].all()
    # a coreset of the fresh share covers the new vectors together with the bank
    picked = select_coreset(new, size=300, existing=bank)
    assert is_fresh[picked.indices].all()
    assert coverage_radius(new, picked.indices, existing=bank) < 0.5
    with pytest.raises(ValueError, match="existing_distances"):
        select_coreset(new, size=5, existing_distances=nearest[:10]).indices
    with pytest.raises(ValueError, match="existing vectors"):
        select_coreset(new, size=5, existing=bank[:, :10]).indices


def test_existing_start_matches_naive_greedy():
    bank = _blobs(300, dim=12, seed=5)
    new = _blobs(400, dim=12, seed=6)
    start = np.sqrt(faiss.knn(new, bank, 1)[0][:, 0])
    result = select_coreset(new, size=50, existing=bank)
    np.testing.assert_array_equal(result.indices, _naive_greedy(new, 50, int(np.argmax(start)), start))
    assert result.radius == pytest.approx(coverage_radius(new, result.indices, existing=bank), rel=1e-4)


def test_coreset_size_from_ratio_or_size():
    assert coreset_size(1000, ratio=0.1) == 100
    assert coreset_size(1000, ratio=1.0) == 1000
    assert coreset_size(1000, ratio=1e-6) == 1  # never empty
    assert coreset_size(1000, size=50) == 50
    assert coreset_size(10, size=50) == 10
    assert coreset_size(0, ratio=0.5) == 0
    for bad in ({}, {"ratio": 0.1, "size": 5}):
        with pytest.raises(ValueError, match="exactly one"):
            coreset_size(10, **bad)
    with pytest.raises(ValueError, match="ratio"):
        coreset_size(10, ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        coreset_size(10, ratio=1.5)
    with pytest.raises(ValueError, match="size"):
        coreset_size(10, size=0)
    result = select_coreset(_blobs(500), ratio=0.1)
    assert isinstance(result, Coreset) and len(result.indices) == 50
    full = select_coreset(_blobs(50), ratio=1.0)
    np.testing.assert_array_equal(full.indices, np.arange(50))
    assert full.radius == 0.0


def test_select_coreset_blocks_makes_the_same_picks_as_in_memory():
    from simsearch.coreset import select_coreset, select_coreset_blocks
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 160)).astype(np.float32)
    near = rng.uniform(0, 5, 3000).astype(np.float32)
    whole = select_coreset(x, ratio=0.05, existing_distances=near)
    streamed = select_coreset_blocks(lambda: (x[s:s + 700] for s in range(0, 3000, 700)), 3000, 160, ratio=0.05,
                                     existing_distances=near)
    np.testing.assert_array_equal(streamed.indices, whole.indices)
    assert streamed.radius == pytest.approx(whole.radius) and streamed.projected
    with pytest.raises(ValueError, match="announced"):
        select_coreset_blocks(lambda: iter([x[:10]]), 11, 160, size=2)
