"""simsearch.features: the patch-feature maths and the Embedder on the real default backbone."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simsearch.config import IndexConfig
from simsearch.features import Embedder, patch_features
from simsearch.images import Image


def _maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 6, 8, 6, generator=g)]


def test_output_shape_is_fine_grid_with_all_channels():
    out = patch_features(_maps())
    assert out.shape == (2, 16, 12, 10)
    assert out.dtype == torch.float32
    assert out.is_contiguous()


def test_neighbourhood_1_single_map_is_the_permuted_input():
    m = _maps()[0]
    out = patch_features([m], neighbourhood=1)
    assert torch.equal(out, m.permute(0, 2, 3, 1))


def test_half_precision_input_is_returned_as_float32():
    m = _maps()[0].half()
    out = patch_features([m], neighbourhood=1)
    assert out.dtype == torch.float32
    assert torch.equal(out, m.float().permute(0, 2, 3, 1))


def test_3x3_average_of_a_constant_map_is_constant_at_the_borders_too():
    m = torch.full((1, 3, 7, 5), 2.5)
    out = patch_features([m], neighbourhood=3)
    assert torch.allclose(out, torch.full((1, 7, 5, 3), 2.5))


def test_3x3_average_values():
    m = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    out = patch_features([m], neighbourhood=3)[0, :, :, 0]
    # interior: the mean of the 3x3 window; corner: the mean of the 4 pixels inside the image only
    assert out[2, 2].item() == pytest.approx(m[0, 0, 1:4, 1:4].mean().item())
    assert out[0, 0].item() == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert out[0, 2].item() == pytest.approx((1 + 2 + 3 + 6 + 7 + 8) / 6)


def test_coarse_map_is_resized_bilinearly_to_the_fine_grid():
    fine, coarse = _maps()
    out = patch_features([fine, coarse], neighbourhood=1)
    expected = F.interpolate(coarse, size=(16, 12), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(out[..., 4:], expected)
    assert torch.equal(out[..., :4], fine.permute(0, 2, 3, 1))
    # a constant coarse map stays constant after resizing
    const = patch_features([fine, torch.full((2, 2, 8, 6), -1.0)], neighbourhood=3)
    assert torch.allclose(const[..., 4:], torch.tensor(-1.0))


def test_one_window_per_map():
    fine, coarse = _maps()
    out = patch_features([fine, coarse], neighbourhood=(1, 3))
    assert torch.equal(out[..., :4], fine.permute(0, 2, 3, 1))  # the fine map untouched
    pooled = F.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=False)
    expected = F.interpolate(pooled, size=(16, 12), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(out[..., 4:], expected)
    assert torch.equal(patch_features([fine, coarse], neighbourhood=(3, 3)), patch_features([fine, coarse], 3))


@pytest.mark.parametrize("windows", [(1,), (1, 3, 3), (1, 2), (0, 3)])
def test_window_per_map_must_match_and_be_odd(windows):
    with pytest.raises(ValueError, match="one odd window"):
        patch_features(_maps(), neighbourhood=windows)


def test_dims_reduction():
    out = patch_features(_maps(), neighbourhood=1, dims=5)
    assert out.shape == (2, 16, 12, 5)
    full = patch_features(_maps(), neighbourhood=1)
    # 10 channels -> 5: adaptive average pooling averages adjacent pairs
    assert torch.allclose(out, full.reshape(2, 16, 12, 5, 2).mean(-1), atol=1e-6)
    assert torch.equal(patch_features(_maps(), neighbourhood=1, dims=10), full)


@pytest.mark.parametrize("bad", [torch.zeros(4, 8, 8), torch.zeros(1, 1, 2, 8, 8)])
def test_bad_ndim_raises(bad):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patch_features([bad])
    with pytest.raises(ValueError):
        patch_features([torch.zeros(1, 2, 8, 8), bad])


def test_no_maps_raises():
    with pytest.raises(ValueError, match="no feature maps"):
        patch_features([])


# -- Embedder on the real default backbone --------------------------------------------------------------

def _image(h, w, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image(rgb=rgb, sha256=hashlib.sha256(rgb.tobytes()).hexdigest(), source="<array>")


def test_backbone_layers(lite1_backbone):
    assert lite1_backbone.reductions == (8, 16)
    assert lite1_backbone.channels == (40, 112)


def test_embed_grid_shape_and_determinism(lite1_backbone):
    embedder = Embedder(IndexConfig(short_side=None), lite1_backbone)  # native scale
    assert embedder.dim == 152
    image = _image(100, 150)
    grid = embedder.embed(image)
    assert grid.features.shape == (math.ceil(100 / 8), math.ceil(150 / 8), 152)
    assert grid.features.dtype == np.float32
    assert np.isfinite(grid.features).all()
    assert grid.features.std() > 0
    assert grid.original_size == (100, 150)
    assert grid.tile_index.shape == grid.grid_shape
    again = embedder.embed(image)
    np.testing.assert_array_equal(again.features, grid.features)
    # a different image gives different vectors
    assert not np.array_equal(embedder.embed(_image(100, 150, seed=1)).features, grid.features)


def test_default_short_side_brings_every_image_to_192_px(lite1_backbone):
    embedder = Embedder(IndexConfig(), lite1_backbone)
    for (h, w), cells in {(100, 150): (24, 36), (1300, 650): (48, 24)}.items():
        grid = embedder.embed(_image(h, w))
        assert grid.grid_shape == cells and grid.original_size == (h, w)


def test_embed_multi_tile_image(lite1_backbone):
    embedder = Embedder(IndexConfig(short_side=None, tile_size=64, tile_stride=48, context_margin=0), lite1_backbone)
    grid = embedder.embed(_image(70, 90))
    assert grid.layout.n_tiles == 2 * 2  # padded 96x96: starts (0, 32) on each axis
    assert grid.features.shape == (9, 12, 152)
    assert set(np.unique(grid.tile_index).tolist()) == {0, 1, 2, 3}
    framed = Embedder(IndexConfig(short_side=None, tile_size=64, tile_stride=48, context_margin=16),
                      lite1_backbone).embed(_image(70, 90))
    assert framed.layout.n_tiles == 3 * 3  # padded 128x128 (70+32, 90+32 rounded up): starts (0, 48, 64)
    assert framed.features.shape == (9, 12, 152)
    boxes = grid.cell_boxes()
    assert boxes.shape == (9, 12, 4)
    assert boxes[0, 0].tolist() == [0, 0, 8, 8]
    assert boxes[-1, -1].tolist() == [88, 64, 2, 6]  # the last cells are cut at the image edge


def test_embedder_dims_and_stride_check(lite1_backbone):
    embedder = Embedder(IndexConfig(dims=64), lite1_backbone)
    assert embedder.dim == 64
    assert embedder.embed(_image(40, 40)).features.shape == (24, 24, 64)  # 40 px brought to 192
    with pytest.raises(ValueError, match="stride"):
        Embedder(IndexConfig(patch_stride=16, tile_stride=192), lite1_backbone)


# -- batching across images -------------------------------------------------------------------------------

def test_embed_many_matches_embed_per_image_and_keeps_order(lite1_backbone, monkeypatch):
    import simsearch.embedding as embedding
    monkeypatch.setattr(embedding, "MAX_WAITING", 2)
    embedder = Embedder(IndexConfig(tile_size=64, tile_stride=48, context_margin=16), lite1_backbone)
    # Mixed sizes: 20x20 (52 px framed, padded to 64) is one 64 px tile; batches of 3 tiles mix images,
    # and waiting images are flushed by the (lowered) bound.
    images = [_image(70, 90, 0), _image(20, 20, 1), _image(100, 64, 2), _image(70, 90, 3), _image(64, 150, 4)]
    grids = list(embedder.embed_many(iter(images), batch_pixels=3 * 64 * 64))
    assert len(grids) == len(images)
    for image, grid in zip(images, grids):
        alone = embedder.embed(image)
        assert grid.original_size == (image.height, image.width)
        np.testing.assert_array_equal(grid.tile_index, alone.tile_index)
        np.testing.assert_allclose(grid.features, alone.features, rtol=1e-4, atol=1e-4)


def test_embed_many_of_nothing_and_bad_batch():
    # No backbone call is needed for either case.
    embedder = Embedder.__new__(Embedder)
    assert list(Embedder.embed_many(embedder, [])) == []
    with pytest.raises(ValueError, match="batch_pixels"):
        list(Embedder.embed_many(embedder, [], batch_pixels=0))


def test_tiles_per_batch_follows_the_pixel_budget():
    from simsearch.features import tiles_per_batch
    assert tiles_per_batch(256, 256) == 2 and tiles_per_batch(192, 192) == 3 and tiles_per_batch(128, 128) == 8
    assert tiles_per_batch(1024, 1024) == 1 and tiles_per_batch(64, 64, batch_pixels=3 * 64 * 64) == 3


def test_embed_tiles_checks_its_input(lite1_backbone):
    embedder = Embedder(IndexConfig(), lite1_backbone)
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed_tiles(np.zeros((2, 32, 32, 3), np.float32))
    out = embedder.embed_tiles(np.zeros((2, 32, 32, 3), np.uint8))
    assert tuple(out.shape) == (2, 4, 4, 152)
