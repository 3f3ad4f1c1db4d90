"""Patch features in torch: the backbone's maps -> locally aware patch vectors (`patch_features`, the maths,
a plain torch function), and `Embedder`, the TileEmbedder whose forward pass runs the timm backbone (and a
fine-tuned head) in torch. Tiling and batching are in simsearch/embedding.py.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Backbone
from .config import IndexConfig
from .embedding import PatchGrid, TileEmbedder, tiles_per_batch  # noqa: F401 - where callers found them


def patch_features(maps: list[torch.Tensor], neighbourhood: int | tuple[int, ...] = 3,
                   dims: int | None = None) -> torch.Tensor:
    """Backbone maps -> locally aware patch vectors on the finest map's grid.

    maps: [(B, C_i, H_i, W_i)], finest first. Each map is averaged over a `neighbourhood` x
    `neighbourhood` window (PatchCore's local aggregation: a patch sees its surroundings; one odd
    window for all maps, or one per map),
    coarser maps are resized bilinearly to the finest grid, and all are concatenated.
    `dims` reduces the channels by adaptive average pooling (deterministic, nothing stored).
    Returns (B, H_0, W_0, D) float32, D = sum(C_i) or `dims`.
    """
    if not maps:
        raise ValueError("no feature maps")
    for m in maps:
        if m.ndim != 4:
            raise ValueError(f"feature maps must be (B, C, H, W), got {tuple(m.shape)}")
    windows = (neighbourhood,) * len(maps) if isinstance(neighbourhood, int) else tuple(neighbourhood)
    if len(windows) != len(maps) or any(w < 1 or w % 2 == 0 for w in windows):
        raise ValueError(f"need one odd window >= 1 per map ({len(maps)}), got {neighbourhood}")
    height, width = maps[0].shape[-2:]
    parts = []
    for m, window in zip(maps, windows):
        m = m.float()
        if window > 1:
            m = F.avg_pool2d(m, window, stride=1, padding=window // 2, count_include_pad=False)
        if m.shape[-2:] != (height, width):
            m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
        parts.append(m)
    feats = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # (B, H, W, C)
    if dims is not None and dims != feats.shape[-1]:
        b, h, w, c = feats.shape
        feats = F.adaptive_avg_pool1d(feats.reshape(b * h * w, 1, c), dims).reshape(b, h, w, dims)
    return feats.contiguous()


class Embedder(TileEmbedder):
    """The torch embedder: applies one index configuration with the timm backbone.

    `head`: the fine-tuned projection head (simsearch/finetune.py) the configuration names, applied to
    every patch vector after `patch_features`, so adding, querying, calibrating and evaluating all see
    the same space. The caller checks that it is the configuration's head (Engine.embedder does).
    """

    def __init__(self, config: IndexConfig, backbone: Backbone, head: torch.nn.Module | None = None):
        if backbone.reductions[0] != config.patch_stride:
            raise ValueError(f"layer {config.layers[0]} has stride {backbone.reductions[0]}, "
                             f"configuration says {config.patch_stride}")
        if bool(config.head_sha256) != (head is not None):
            raise ValueError("the configuration names a fine-tuned head, none was given" if head is None else
                             "a fine-tuned head was given for a configuration of the frozen embedder")
        base_dim = config.dims or sum(backbone.channels)
        if head is not None and head.in_dim != base_dim:
            raise ValueError(f"the head takes {head.in_dim}-dim vectors, the backbone gives {base_dim}")
        self.config = config
        self.runtime = "torch"
        self.backbone = backbone
        self.head = head.eval() if head is not None else None
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        # Weights in channels_last too (the inputs are): oneDNN then needs no layout reorder per call.
        backbone.model.to(memory_format=torch.channels_last)

    @property
    def dim(self) -> int:
        return self.head.out_dim if self.head is not None else self.config.dims or sum(self.backbone.channels)

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, h, w, 3) uint8 RGB tiles of one shape -> (B, h/stride, w/stride, D) float32, one backbone call."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        maps = self.backbone.model(x)
        feats = patch_features(list(maps), self.config.neighbourhood, self.config.dims)
        if self.head is not None:
            feats = self.head(feats)
        return feats.numpy()

