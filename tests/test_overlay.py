"""The one heatmap overlay (query --heatmap-dir, the eval report, the dashboard): a good part looks like itself."""
import cv2
import numpy as np
import pytest

from simsearch.overlay import BOX_BGR, TRUTH_BGR, heatmap_overlay, ramp_range
from simsearch.scoring import find_regions


def part(h=96, w=128, seed=0):
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def map_with_spots(h=96, w=128, spots=((20, 30, 3.0), (70, 100, 1.6))):
    """A flat low map (0.2) with square spots of the given peak values at (row, col)."""
    amap = np.full((h, w), 0.2, np.float32)
    for r, c, v in spots:
        amap[r - 5:r + 5, c - 5:c + 5] = v
    return amap


def test_below_the_ramp_floor_the_image_is_unchanged_and_above_it_coloured():
    rgb, amap = part(), map_with_spots()
    out = heatmap_overlay(rgb, amap, pixel_threshold=1.0, legend=False)
    assert out.shape == rgb.shape  # the image's own resolution
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    below = amap <= ramp_range(amap, 1.0)[0]
    assert below.sum() > 0.9 * below.size
    np.testing.assert_array_equal(out[below], bgr[below])
    hot = out[15:25, 25:35].astype(int) - bgr[15:25, 25:35].astype(int)
    assert (np.abs(hot).sum(axis=-1) > 0).all()
    # the hotter spot is redder: more red than green in BGR order
    spot = out[15:25, 25:35].astype(int)
    assert (spot[..., 2] > spot[..., 1]).mean() > 0.9


def test_the_scale_is_absolute_so_two_images_compare():
    rgb = part()
    weak = heatmap_overlay(rgb, map_with_spots(spots=((20, 30, 1.2),)), 1.0, legend=False)
    strong = heatmap_overlay(rgb, map_with_spots(spots=((20, 30, 1.2), (70, 100, 3.0))), 1.0, legend=False)
    # the first spot looks the same whatever else the map holds (a stretched scale would change it)
    np.testing.assert_array_equal(weak[15:25, 25:35], strong[15:25, 25:35])


def test_every_flagged_region_is_boxed_and_numbered():
    rgb, amap = part(), map_with_spots()
    regions = find_regions(amap, 1.0, 4)
    assert len(regions) == 2  # both spots: the second one must be boxed too
    out = heatmap_overlay(rgb, amap, 1.0, regions, legend=False)
    for r in regions:
        top_edge = out[r.y, r.x:r.x + r.w]
        assert (top_edge == BOX_BGR).all(axis=-1).mean() > 0.8
    without = heatmap_overlay(rgb, amap, 1.0, legend=False)
    # numbers sit just outside the boxes: pixels there differ from the box-less overlay
    for r in regions:
        assert (out[max(0, r.y - 12):r.y, r.x:r.x + 12] != without[max(0, r.y - 12):r.y, r.x:r.x + 12]).any()


def test_ground_truth_contour_and_legend_strip():
    rgb, amap = part(), map_with_spots()
    truth = np.zeros(amap.shape, bool)
    truth[60:80, 90:110] = True
    out = heatmap_overlay(rgb, amap, 1.0, truth=truth, score=2.5, image_threshold=2.0)
    h, w = amap.shape
    assert out.shape[1] == w and out.shape[0] > h  # the legend goes under the image, not over it
    assert (out[60, 92:108] == TRUTH_BGR).all(axis=-1).mean() > 0.8
    strip = out[h:]
    assert len(np.unique(strip.reshape(-1, 3), axis=0)) > 20  # text and the colour bar, not a blank strip


def test_without_a_threshold_the_maps_own_upper_half_is_coloured():
    rgb, amap = part(), map_with_spots()
    out = heatmap_overlay(rgb, amap, None, legend=False)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    np.testing.assert_array_equal(out[amap == amap.min()], bgr[amap == amap.min()])
    assert (out[amap == amap.max()] != bgr[amap == amap.max()]).any()


def test_a_map_of_another_size_is_refused():
    with pytest.raises(ValueError, match="map is"):
        heatmap_overlay(part(), np.zeros((10, 10), np.float32), 1.0)
