"""A tiny deterministic embedder behind the Embedder interface, for tests of the engine's pieces that need
neither the real backbone nor the datasets.

Each 8 x 8 cell of the (scaled, tiled) image becomes 6 numbers: its mean and its standard deviation per
RGB channel. Tiling, stitching and batching are the real ones (features.Embedder); only the backbone's
forward pass is replaced.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from simsearch.backbones import Backbone
from simsearch.config import IndexConfig
from simsearch.features import Embedder

TINY_DIM = 6


def tiny_config(**search) -> IndexConfig:
    return IndexConfig(backbone="tiny-cell-stats", weights="none", weights_sha256="tiny-v1", layers=(0,),
                       patch_stride=8, feature_dim=TINY_DIM, short_side=64, tile_size=64, tile_stride=48,
                       context_margin=8, **search)


class TinyEmbedder(Embedder):
    """Cell mean and spread per channel; `on_embed` (if set) runs before each image is embedded, so a test
    can make a writer act at exactly that moment."""

    def __init__(self, config: IndexConfig | None = None):
        config = config or tiny_config()
        net = Backbone(model=torch.nn.Identity(), layers=(0,), reductions=(8,), channels=(TINY_DIM,),
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
                       weights_sha256=config.weights_sha256)
        super().__init__(config, net)
        self.on_embed: Callable[[], None] | None = None

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, h, w, 3) uint8 -> (B, h/8, w/8, 6) float32."""
        b, h, w, _ = batch.shape
        cells = batch.astype(np.float32).reshape(b, h // 8, 8, w // 8, 8, 3) / 255.0
        mean = cells.mean(axis=(2, 4))
        std = cells.std(axis=(2, 4))
        return np.concatenate([mean, std], axis=-1).astype(np.float32)

    def embed(self, image):
        if self.on_embed is not None:
            self.on_embed()
        return super().embed(image)


def texture(seed: int, size: int = 96, defect: bool = False) -> np.ndarray:
    """A (size, size, 3) uint8 RGB 'good part': a smooth gradient with mild noise; `defect` adds a dark square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([120 + 40 * np.sin(x / 9.0), 110 + 30 * np.cos(y / 11.0), 100 + 20 * np.sin((x + y) / 13.0)], -1)
    img = base + rng.normal(0, 6, base.shape)
    if defect:
        img[40:56, 40:56] = 10
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder, seeds, defect: bool = False) -> list[str]:
    """PNG files of `texture(seed)` in `folder`; returns their paths."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"{'bad' if defect else 'good'}_{seed:03d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(texture(seed, defect=defect), cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths
