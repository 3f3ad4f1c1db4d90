"""Patch features: image -> tiles -> backbone maps -> one vector per patch cell.

The maths (`patch_features`) is a plain torch function; `Embedder` is the glue that applies
the index's configuration (scale, tiling, preprocessing) to one image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Backbone
from .config import IndexConfig
from .images import Image
from .tiling import TileLayout, cut_tiles, plan_tiles, resize_to_scale, stitch_cells

MAX_TILES_PER_BATCH = 16


def patch_features(maps: list[torch.Tensor], neighbourhood: int = 3, dims: int | None = None) -> torch.Tensor:
    """Backbone maps -> locally aware patch vectors on the finest map's grid.

    maps: [(B, C_i, H_i, W_i)], finest first. Each map is averaged over a `neighbourhood` x
    `neighbourhood` window (PatchCore's local aggregation: a patch sees its surroundings),
    coarser maps are resized bilinearly to the finest grid, and all are concatenated.
    `dims` reduces the channels by adaptive average pooling (deterministic, nothing stored).
    Returns (B, H_0, W_0, D) float32, D = sum(C_i) or `dims`.
    """
    if not maps:
        raise ValueError("no feature maps")
    for m in maps:
        if m.ndim != 4:
            raise ValueError(f"feature maps must be (B, C, H, W), got {tuple(m.shape)}")
    height, width = maps[0].shape[-2:]
    pad = neighbourhood // 2
    parts = []
    for m in maps:
        m = m.float()
        if neighbourhood > 1:
            m = F.avg_pool2d(m, neighbourhood, stride=1, padding=pad, count_include_pad=False)
        if m.shape[-2:] != (height, width):
            m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
        parts.append(m)
    feats = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # (B, H, W, C)
    if dims is not None and dims != feats.shape[-1]:
        b, h, w, c = feats.shape
        feats = F.adaptive_avg_pool1d(feats.reshape(b * h * w, 1, c), dims).reshape(b, h, w, dims)
    return feats.contiguous()


@dataclass
class PatchGrid:
    """One image's patch vectors and where they came from."""

    features: np.ndarray  # (Hc, Wc, D) float32
    tile_index: np.ndarray  # (Hc, Wc) int: the tile each cell was taken from
    layout: TileLayout
    original_size: tuple[int, int]  # (H, W) of the image as given

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.features.shape[0], self.features.shape[1]

    def cell_boxes(self) -> np.ndarray:
        """(Hc, Wc, 4) int boxes (x, y, w, h) of each cell in original-image pixels."""
        hc, wc = self.grid_shape
        h0, w0 = self.original_size
        sy, sx = self.layout.height / h0, self.layout.width / w0
        c = self.layout.cell
        ys = np.arange(hc) * c
        xs = np.arange(wc) * c
        y0 = np.floor(ys / sy).astype(int)
        x0 = np.floor(xs / sx).astype(int)
        y1 = np.minimum(np.ceil(np.minimum(ys + c, self.layout.height) / sy).astype(int), h0)
        x1 = np.minimum(np.ceil(np.minimum(xs + c, self.layout.width) / sx).astype(int), w0)
        boxes = np.zeros((hc, wc, 4), dtype=np.int64)
        boxes[..., 0] = x0[None, :]
        boxes[..., 1] = y0[:, None]
        boxes[..., 2] = (x1 - x0)[None, :]
        boxes[..., 3] = (y1 - y0)[:, None]
        return boxes


class Embedder:
    """Applies one index configuration: image -> PatchGrid."""

    def __init__(self, config: IndexConfig, backbone: Backbone):
        if backbone.reductions[0] != config.patch_stride:
            raise ValueError(f"layer {config.layers[0]} has stride {backbone.reductions[0]}, "
                             f"configuration says {config.patch_stride}")
        self.config = config
        self.backbone = backbone
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    @property
    def dim(self) -> int:
        return self.config.dims or sum(self.backbone.channels)

    @torch.inference_mode()
    def embed_tiles(self, tiles: np.ndarray) -> torch.Tensor:
        """(T, h, w, 3) uint8 RGB tiles -> (T, h/stride, w/stride, D) float32 patch vectors."""
        out = []
        for start in range(0, len(tiles), MAX_TILES_PER_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(tiles[start:start + MAX_TILES_PER_BATCH]))
            x = (batch.permute(0, 3, 1, 2).float() - self._mean) / self._std
            maps = self.backbone.model(x.contiguous(memory_format=torch.channels_last))
            out.append(patch_features(list(maps), self.config.neighbourhood, self.config.dims))
        return torch.cat(out)

    def embed(self, image: Image) -> PatchGrid:
        rgb = resize_to_scale(image.rgb, self.config.scale_for(image.height, image.width), self.config.interpolation)
        layout = plan_tiles(rgb.shape[0], rgb.shape[1], self.config.tile_size, self.config.tile_stride,
                            self.config.patch_stride, self.config.context_margin)
        tile_feats = self.embed_tiles(cut_tiles(rgb, layout)).numpy()
        tile_index, _, _ = layout.cell_owners()
        return PatchGrid(features=np.ascontiguousarray(stitch_cells(tile_feats, layout)),
                         tile_index=np.ascontiguousarray(tile_index), layout=layout,
                         original_size=(image.height, image.width))
