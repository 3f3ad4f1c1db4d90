"""simsearch.tiling: tile placement, cell ownership, cutting and stitching."""
from __future__ import annotations

import math

import numpy as np
import pytest

from simsearch.tiling import (ALIGN, cut_tiles, grid_to_image, owner_tiles, plan_tiles, resize_to_scale, round_up,
                              scaled_size, stitch_cells, tile_starts)


def test_round_up():
    assert [round_up(n, 32) for n in (1, 31, 32, 33, 64, 65)] == [32, 32, 32, 64, 64, 96]


@pytest.mark.parametrize("length,tile,stride,expected", [
    (256, 256, 192, [0]),
    (512, 256, 192, [0, 192, 256]),
    (448, 256, 192, [0, 192]),  # 192 + 256 == 448: already flush
    (480, 256, 192, [0, 192, 224]),
    (1024, 256, 256, [0, 256, 512, 768]),
])
def test_tile_starts_values(length, tile, stride, expected):
    assert tile_starts(length, tile, stride).tolist() == expected


@pytest.mark.parametrize("length", [96, 128, 256, 288, 480, 512, 736, 1000, 1024])
@pytest.mark.parametrize("tile,stride", [(96, 64), (128, 96), (256, 192), (256, 256)])
def test_tile_starts_cover_everything_and_end_flush(length, tile, stride):
    if length < tile:
        with pytest.raises(ValueError):
            tile_starts(length, tile, stride)
        return
    starts = tile_starts(length, tile, stride)
    assert starts.dtype == np.int64
    assert starts[0] == 0
    assert starts[-1] == length - tile
    assert (np.diff(starts) > 0).all() and (np.diff(starts) <= stride).all()
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()


def test_single_tile_when_length_equals_tile():
    assert tile_starts(128, 128, 96).tolist() == [0]


@pytest.mark.parametrize("length,tile,stride,cell", [(512, 256, 192, 8), (480, 256, 192, 8), (256, 256, 192, 8),
                                                     (736, 128, 96, 16), (96, 96, 32, 8)])
def test_every_cell_is_owned_by_a_tile_that_contains_it(length, tile, stride, cell):
    starts = tile_starts(length, tile, stride)
    n_cells = length // cell
    owner, local = owner_tiles(n_cells, cell, starts, tile)
    assert owner.shape == local.shape == (n_cells,)
    cell_start = np.arange(n_cells) * cell
    assert (starts[owner] <= cell_start).all()
    assert (cell_start + cell <= starts[owner] + tile).all()
    np.testing.assert_array_equal(starts[owner] + local * cell, cell_start)
    # The owner is the tile whose centre is nearest to the cell's centre.
    dist = np.abs((cell_start + cell / 2)[:, None] - (starts + tile / 2)[None, :])
    np.testing.assert_array_equal(dist[np.arange(n_cells), owner], dist.min(axis=1))


def test_owner_tiles_prefers_the_interior():
    # Tiles [0, 256) and [192, 448): cell 23 (184..192) is central in tile 0, cell 32 (256..264) in tile 1.
    starts = tile_starts(448, 256, 192)
    owner, _ = owner_tiles(56, 8, starts, 256)
    assert owner[0] == 0 and owner[23] == 0 and owner[32] == 1 and owner[-1] == 1
    # The switch happens halfway between the centres (128 and 320): at 224 px = cell 28.
    assert owner[27] == 0 and owner[28] == 1


def test_small_image_gets_one_smaller_tile():
    layout = plan_tiles(100, 70, tile=256, stride=192, cell=8)
    assert (layout.tile_h, layout.tile_w) == (128, 96)
    assert layout.ys.tolist() == [0] and layout.xs.tolist() == [0]
    assert layout.n_tiles == 1
    assert layout.padded_shape == (128, 96)
    assert layout.grid_shape == (13, 9)
    assert layout.tile_boxes() == [(0, 0, 70, 100)]  # clipped to the image itself


def test_plan_tiles_large_image():
    layout = plan_tiles(500, 300, tile=256, stride=192, cell=8)
    # padded to 512 x 320; rows: 0, 192, 256; columns: 0, 64
    assert (layout.tile_h, layout.tile_w) == (256, 256)
    assert layout.padded_shape == (512, 320)
    assert layout.ys.tolist() == [0, 192, 256]
    assert layout.xs.tolist() == [0, 64]
    assert layout.n_tiles == 6
    assert layout.grid_shape == (math.ceil(500 / 8), math.ceil(300 / 8))
    boxes = layout.tile_boxes()  # clipped to the 300 x 500 image
    assert boxes[0] == (0, 0, 256, 256) and boxes[1] == (64, 0, 236, 256) and boxes[2] == (0, 192, 256, 256)
    assert boxes[-1] == (64, 256, 236, 244)


def test_cell_owners_shapes_and_ranges():
    layout = plan_tiles(500, 300, tile=256, stride=192, cell=8)
    tile_index, rows, cols = layout.cell_owners()
    hc, wc = layout.grid_shape
    assert tile_index.shape == rows.shape == cols.shape == (hc, wc)
    assert tile_index.min() >= 0 and tile_index.max() < layout.n_tiles
    assert rows.min() >= 0 and rows.max() < layout.tile_h // 8
    assert cols.min() >= 0 and cols.max() < layout.tile_w // 8
    assert set(np.unique(tile_index).tolist()) == set(range(6))


@pytest.mark.parametrize("margin", [0, 32])
@pytest.mark.parametrize("h,w", [(100, 70), (500, 300), (257, 640), (64, 1000), (33, 33)])
def test_cut_and_stitch_round_trip(h, w, margin):
    cell = 8
    layout = plan_tiles(h, w, tile=256, stride=192, cell=cell, margin=margin)
    # Each tile's cell grid holds the image-grid index of its cells (negative inside the margin).
    th, tw = layout.tile_h // cell, layout.tile_w // cell
    grids = []
    for y in layout.ys:
        for x in layout.xs:
            r = np.arange(th)[:, None] + (y - margin) // cell
            c = np.arange(tw)[None, :] + (x - margin) // cell
            grids.append(np.stack(np.broadcast_arrays(r, c), axis=-1))
    stitched = stitch_cells(np.stack(grids), layout)
    hc, wc = layout.grid_shape
    assert stitched.shape == (hc, wc, 2)
    np.testing.assert_array_equal(stitched[..., 0], np.broadcast_to(np.arange(hc)[:, None], (hc, wc)))
    np.testing.assert_array_equal(stitched[..., 1], np.broadcast_to(np.arange(wc)[None, :], (hc, wc)))


@pytest.mark.parametrize("margin", [0, 32])
@pytest.mark.parametrize("h,w", [(100, 70), (500, 300), (256, 256)])
def test_cut_tiles_takes_pixels_from_the_padded_image(h, w, margin):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    layout = plan_tiles(h, w, tile=256, stride=192, cell=8, margin=margin)
    tiles = cut_tiles(rgb, layout)
    assert tiles.shape == (layout.n_tiles, layout.tile_h, layout.tile_w, 3)
    assert tiles.dtype == np.uint8
    ph, pw = layout.padded_shape
    assert ph % 32 == 0 and pw % 32 == 0 and ph >= h + 2 * margin and pw >= w + 2 * margin
    padded = np.pad(rgb, ((margin, ph - h - margin), (margin, pw - w - margin), (0, 0)), mode="symmetric")
    boxes = [(x, y) for y in layout.ys for x in layout.xs]
    for t, (x, y) in zip(tiles, boxes):
        np.testing.assert_array_equal(t, padded[y:y + layout.tile_h, x:x + layout.tile_w])
    # The image itself sits at (margin, margin) in the padded frame, unchanged.
    np.testing.assert_array_equal(padded[margin:margin + h, margin:margin + w], rgb)
    # Padding is a reflection: the first padded row repeats the last image row.
    if ph > h + margin:
        np.testing.assert_array_equal(padded[margin + h, margin:margin + w], rgb[h - 1])
    if margin:
        np.testing.assert_array_equal(padded[margin - 1, margin:margin + w], rgb[0])


def test_tile_boxes_are_clipped_to_the_image():
    layout = plan_tiles(500, 300, tile=256, stride=192, cell=8, margin=32)
    for x, y, w, h in layout.tile_boxes():
        assert 0 <= x and 0 <= y and x + w <= 300 and y + h <= 500 and w > 0 and h > 0


def test_margin_must_be_a_multiple_of_the_cell():
    with pytest.raises(ValueError, match="multiple"):
        plan_tiles(100, 100, 256, 192, 8, margin=12)


def test_cut_tiles_checks_size():
    layout = plan_tiles(100, 70, 256, 192, 8)
    with pytest.raises(ValueError, match="layout expects 70x100"):
        cut_tiles(np.zeros((70, 100, 3), np.uint8), layout)


@pytest.mark.parametrize("h,w,out", [(100, 70, (100, 70)), (100, 70, (200, 140)), (500, 300, (250, 150)),
                                     (37, 45, (37, 45))])
def test_grid_to_image_returns_the_requested_size(h, w, out):
    layout = plan_tiles(h, w, 256, 192, 8)
    grid = np.random.default_rng(0).random(layout.grid_shape)
    fine = grid_to_image(grid, layout, *out)
    assert fine.shape == out
    assert fine.dtype == np.float32
    # Bilinear interpolation does not go beyond the values it interpolates.
    assert fine.min() >= grid.min() - 1e-5 and fine.max() <= grid.max() + 1e-5


def test_grid_to_image_places_cell_values_at_their_cells():
    layout = plan_tiles(64, 64, 256, 192, 8)
    grid = np.zeros(layout.grid_shape, np.float32)
    grid[2, 5] = 1.0
    fine = grid_to_image(grid, layout, 64, 64)
    # The peak is at the cell's centre (row 2 -> y 16..24, col 5 -> x 40..48): the pixels nearest
    # to it lie half a pixel off on each axis, so they get (1 - 0.5 / 8) ** 2 of the value.
    y, x = np.unravel_index(np.argmax(fine), fine.shape)
    assert 16 <= y < 24 and 40 <= x < 48
    assert fine[y, x] == pytest.approx((1 - 0.5 / 8) ** 2, abs=1e-4)
    assert (fine[19:21, 43:45] == fine[y, x]).all()
    assert fine[0, 0] == 0.0
    # Constant grid -> constant map
    assert np.allclose(grid_to_image(np.full(layout.grid_shape, 3.0), layout, 50, 50), 3.0)


@pytest.mark.parametrize("scale,expected", [(1.0, (100, 150)), (0.5, (50, 75)), (2.0, (200, 300)),
                                            (0.333, (33, 50)), (0.001, (1, 1))])
def test_resize_to_scale_sizes(scale, expected):
    rgb = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    out = resize_to_scale(rgb, scale)
    assert out.shape == (*expected, 3)
    assert out.dtype == np.uint8
    assert scaled_size(100, 150, scale) == expected


def test_resize_to_scale_identity_returns_input():
    rgb = np.zeros((10, 12, 3), np.uint8)
    assert resize_to_scale(rgb, 1.0) is rgb


def test_resize_shrink_averages():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:, ::2] = 200  # stripes: an area average gives 100 everywhere
    out = resize_to_scale(rgb, 0.5)
    assert out.shape == (2, 2, 3)
    assert (out == 100).all()
