"""simsearch.scoring: patch and image scores, map smoothing, regions and similarity."""
from __future__ import annotations

import numpy as np
import pytest

from simsearch.scoring import (discounted, discounted_image_score, find_regions, has_region, image_score,
                               patch_scores, region_level, similarity_from_score, smooth)


def test_patch_scores_k1_is_the_nearest_distance():
    d = np.array([[0.5], [2.0], [0.0]], dtype=np.float64)
    s = patch_scores(d)
    assert s.dtype == np.float32 and s.shape == (3,)
    assert s.tolist() == [0.5, 2.0, 0.0]
    s[0] = 99  # a copy, not a view of the input
    assert d[0, 0] == 0.5


def test_patch_scores_k_gt_1_is_the_mean():
    d = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    assert patch_scores(d).tolist() == [3.0, 1.0]


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((3, 0)), np.zeros((2, 2, 2))])
def test_patch_scores_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        patch_scores(bad)


def test_image_score_is_the_maximum():
    assert image_score(np.array([[0.1, 0.7], [0.3, 0.2]])) == pytest.approx(0.7)
    assert isinstance(image_score(np.array([1, 2], dtype=np.float32)), float)


def test_smooth_keeps_shape_and_mass():
    m = np.zeros((40, 60), np.float32)
    m[20, 30] = 1.0
    s = smooth(m, 4.0)
    assert s.shape == (40, 60) and s.dtype == np.float32
    assert s.max() < 1.0
    assert np.unravel_index(np.argmax(s), s.shape) == (20, 30)
    assert s.sum() == pytest.approx(1.0, rel=1e-3)  # away from the borders a Gaussian keeps the total
    # symmetric around the impulse
    assert s[20, 26] == pytest.approx(s[20, 34]) and s[16, 30] == pytest.approx(s[24, 30])


def test_smooth_sigma_zero_is_identity():
    m = np.random.default_rng(0).random((13, 17)).astype(np.float32)
    np.testing.assert_array_equal(smooth(m, 0), m)
    out = smooth(m.astype(np.float64), 0.0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, m)


@pytest.mark.parametrize("height, width", [(128, 128), (700, 1000), (7000, 7000)])
def test_the_map_is_smoothed_at_the_index_scale_equal_to_smoothing_the_original_within_half_a_percent(height, width):
    """Blurring at the original resolution (sigma 4 px at the index scale, 146 px on a 7000 px image) took
    75 s for one 7000 x 7000 query; blurring at the index scale then resizing gives the same map to within
    0.5% of its range (measured on PIPED's maps: 0.05%)."""
    import time

    from simsearch.config import IndexConfig
    from simsearch.scoring import anomaly_map
    from simsearch.tiling import grid_to_image, plan_tiles, scaled_size

    config = IndexConfig()
    scale = config.scale_for(height, width)
    layout = plan_tiles(*scaled_size(height, width, scale), config.tile_size, config.tile_stride,
                        config.patch_stride, config.context_margin)
    rng = np.random.default_rng(0)
    grid = rng.gamma(2.0, 10.0, layout.grid_shape).astype(np.float32)
    grid[3:6, 4:8] += 80  # a defect
    start = time.perf_counter()
    new = anomaly_map(grid, layout, height, width, config.blur_sigma)
    seconds = time.perf_counter() - start
    assert new.shape == (height, width) and new.dtype == np.float32
    assert seconds < 5
    if height * width > 10**7:
        return  # the old way is what took 75 s
    old = smooth(grid_to_image(grid, layout, height, width), config.blur_sigma / scale)
    assert np.abs(new - old).max() < 0.005 * (old.max() - old.min())


def test_smooth_constant_map_is_unchanged():
    assert np.allclose(smooth(np.full((20, 20), 2.0, np.float32), 3.0), 2.0)


def _two_blobs():
    m = np.zeros((50, 80), np.float32)
    m[5:15, 10:30] = 1.0  # big blob: 10 x 20 = 200 px, score 1.0 except its peak
    m[8, 12] = 1.5  # its peak
    m[30:34, 60:65] = 3.0  # small blob: 4 x 5 = 20 px, higher score
    m[32, 63] = 4.0
    return m


def test_find_regions_boxes_areas_sorted_by_score():
    regions = find_regions(_two_blobs(), threshold=0.5, min_area=1)
    assert len(regions) == 2
    small, big = regions  # sorted by score, highest first
    assert (small.x, small.y, small.w, small.h, small.area) == (60, 30, 5, 4, 20)
    assert small.score == pytest.approx(4.0) and small.peak == (63, 32)
    assert (big.x, big.y, big.w, big.h, big.area) == (10, 5, 20, 10, 200)
    assert big.score == pytest.approx(1.5) and big.peak == (12, 8)


def test_find_regions_min_area_filters():
    regions = find_regions(_two_blobs(), threshold=0.5, min_area=21)
    assert [(r.x, r.y, r.area) for r in regions] == [(10, 5, 200)]
    assert find_regions(_two_blobs(), threshold=0.5, min_area=201) == []


def test_find_regions_threshold_is_strict():
    m = _two_blobs()
    # at 1.0 only pixels > 1.0 remain: the big blob's peak pixel and the whole small blob
    regions = find_regions(m, threshold=1.0, min_area=1)
    assert [(r.x, r.y, r.area) for r in regions] == [(60, 30, 20), (12, 8, 1)]
    assert find_regions(m, threshold=4.0, min_area=1) == []


def test_find_regions_uses_8_connectivity():
    m = np.zeros((10, 10), np.float32)
    m[2, 2] = m[3, 3] = m[4, 4] = 1.0  # a diagonal line is one region
    regions = find_regions(m, 0.5, 1)
    assert len(regions) == 1 and regions[0].area == 3 and (regions[0].w, regions[0].h) == (3, 3)


def test_find_regions_peak_ignores_other_components_in_the_box():
    m = np.zeros((20, 20), np.float32)
    m[0:10, 0] = 1.0  # an L-shaped region whose box also holds ...
    m[9, 0:10] = 1.0
    m[2, 5] = 9.0  # ... an unconnected, higher pixel
    regions = find_regions(m, 0.5, 5)
    assert len(regions) == 1
    assert regions[0].score == pytest.approx(1.0)
    assert regions[0].peak != (5, 2)


def test_has_region():
    m = _two_blobs()
    assert has_region(m, 0.5, 200) and not has_region(m, 0.5, 201)
    assert has_region(m, 2.0, 20) and not has_region(m, 2.0, 21)
    assert not has_region(m, 10.0, 1)


@pytest.mark.parametrize("area", [1, 2, 20, 21, 150, 200, 201, 4000])
def test_region_level_is_the_highest_threshold_with_a_region(area):
    rng = np.random.default_rng(area)
    m = smooth(_two_blobs() + 0.1 * rng.random((50, 80)).astype(np.float32), 1.0)
    level = region_level(m, area)
    eps = 1e-4
    assert m.min() <= level <= m.max()
    if area <= m.size:
        assert has_region(m, level - eps, area)
    assert not has_region(m, level + eps, area)


def test_region_level_exact_values():
    m = _two_blobs()
    assert region_level(m, 1) == pytest.approx(4.0)
    # >= 20 px: the small blob survives up to its floor 3.0; >= 21 px: the big blob up to 1.0
    assert region_level(m, 20) == pytest.approx(3.0, abs=1e-6)
    assert region_level(m, 21) == pytest.approx(1.0, abs=1e-6)
    # no region of 4001 px at any threshold: the level is the map's minimum
    assert region_level(m, 4001) == pytest.approx(0.0)


def test_similarity_from_score():
    assert similarity_from_score(0.0, 2.0) == 1.0
    assert similarity_from_score(2.0, 2.0) == pytest.approx(0.5)
    assert similarity_from_score(4.0, 2.0) == pytest.approx(0.25)
    assert similarity_from_score(-1.0, 2.0) == 1.0
    assert similarity_from_score(1.0, None) is None
    assert similarity_from_score(1.0, 0.0) is None
    s = [similarity_from_score(x, 1.0) for x in (0.1, 0.5, 1.0, 3.0)]
    assert s == sorted(s, reverse=True)


def test_image_score_is_the_mean_of_the_top_k_patches():
    scores = np.array([[0.0, 5.0, 1.0], [3.0, 4.0, 2.0]], np.float32)
    assert image_score(scores) == 5.0
    assert image_score(scores, top_k=2) == pytest.approx(4.5)
    assert image_score(scores, top_k=3) == pytest.approx(4.0)
    assert image_score(scores, top_k=100) == pytest.approx(scores.mean())  # clamped to the patch count
    with pytest.raises(ValueError):
        image_score(np.zeros((0,), np.float32))


def test_discounted_lowers_only_scores_matched_where_the_bank_is_sparser_than_typical():
    scores = np.asarray([4.0, 4.0, 4.0, 9.0], np.float32)
    spreads = np.asarray([1.0, 2.0, 8.0, 4.0], np.float32)
    np.testing.assert_allclose(discounted(scores, spreads, typical=2.0, power=1.0), [4.0, 4.0, 1.0, 4.5])
    np.testing.assert_allclose(discounted(scores, spreads, typical=2.0, power=0.5), [4.0, 4.0, 2.0, 9 / 2 ** 0.5],
                               rtol=1e-6)
    np.testing.assert_array_equal(discounted(scores, spreads, typical=2.0, power=0.0), scores)
    with pytest.raises(ValueError):
        discounted(scores, spreads[:3], 2.0, 1.0)
    with pytest.raises(ValueError):
        discounted(scores, spreads, 0.0, 1.0)


class _Bank:
    """A stand-in with what discounted_image_score uses of a VectorIndex (spreads by id)."""

    spread_neighbours = 8

    def __init__(self, spreads: dict[int, float], typical: float):
        self.spreads, self.typical, self.ntotal = spreads, typical, 1000
        self.looked_up: list[int] = []

    def spread(self, ids):
        self.looked_up += [int(i) for i in ids]
        return np.asarray([self.spreads[int(i)] for i in ids], np.float32)

    def typical_spread(self):
        return self.typical


def test_discounted_image_score_on_a_rare_good_match():
    # 400 patches: 398 low, one high matched in a sparse place (id 10), one a little lower matched in a typical one.
    scores = np.full(400, 1.0, np.float32)
    scores[10], scores[20] = 10.0, 8.0
    ids = np.arange(400) % 50
    bank = _Bank({i: 2.0 for i in range(50)} | {10: 10.0}, typical=2.0)
    # top 1: patch 10 is worth 10 * 2 / 10 = 2 now, patch 20 keeps its 8
    assert discounted_image_score(scores, ids, bank, top_k=1, power=1.0) == pytest.approx(8.0)
    assert len(bank.looked_up) == 256  # only the 256 highest patches were looked up
    assert discounted_image_score(scores, ids, bank, top_k=2, power=1.0) == pytest.approx(5.0)
    assert discounted_image_score(scores, ids, bank, top_k=1, power=0.0) == pytest.approx(10.0)
    bank.ntotal = 8  # too few references to judge density: plain top-k
    assert discounted_image_score(scores, ids, bank, top_k=1, power=1.0) == pytest.approx(10.0)
