"""Simpler approaches, measured on the same data as the engine through one small interface.

    detector.fit(good_image_paths)
    score, anomaly_map_or_None = detector.score(image_path)

- `histogram-iforest`: IsolationForest on colour (RGB) and HSV histograms; image level only.
- `pooled-ocsvm`: one-class SVM on globally average-pooled backbone features (the engine's own default
  backbone and weights, last stage); image level only.
- `autoencoder`: a small convolutional autoencoder trained on the good images; the per-pixel
  reconstruction error is the map, its maximum (after the same Gaussian smoothing as the engine) the score.

Each is kept small and fair: the images are the same decoded RGB images the engine sees; methods
that need a fixed input size resize the whole image (stated per class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.ensemble import IsolationForest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from ..images import load_image
from ..scoring import smooth


class Detector(Protocol):
    name: str

    def fit(self, images: list[Path]) -> None: ...

    def score(self, image: Path) -> tuple[float, np.ndarray | None]: ...


def colour_histogram(rgb: np.ndarray, bins: int = 16) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (6 * bins,) float32: normalised RGB and HSV channel histograms."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    parts = []
    for image, ranges in ((rgb, (256, 256, 256)), (hsv, (180, 256, 256))):
        for channel, top in enumerate(ranges):
            hist = cv2.calcHist([image], [channel], None, [bins], [0, top]).ravel()
            parts.append(hist / max(hist.sum(), 1.0))
    return np.concatenate(parts).astype(np.float32)


class HistogramIForest:
    name = "histogram-iforest"

    def __init__(self, seed: int = 0):
        self.model = IsolationForest(n_estimators=200, random_state=seed)

    def fit(self, images: list[Path]) -> None:
        self.model.fit(np.stack([colour_histogram(load_image(p).rgb) for p in images]))

    def score(self, image: Path) -> tuple[float, None]:
        return float(-self.model.score_samples(colour_histogram(load_image(image).rgb)[None])[0]), None


class PooledOCSVM:
    """Input: the whole image resized to the backbone's native size (240 x 240 for Lite1)."""

    name = "pooled-ocsvm"
    size = 240

    def __init__(self, backbone: str = "tf_efficientnet_lite1"):
        from ..backbones import build_backbone, layers_for_strides
        last = layers_for_strides(backbone, (32,))
        self.net = build_backbone(backbone, "embedded", last)
        self.model = make_pipeline(StandardScaler(), OneClassSVM(nu=0.1, gamma="scale"))

    @torch.inference_mode()
    def features(self, path: Path) -> np.ndarray:
        rgb = cv2.resize(load_image(path).rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        x = (x - torch.tensor(self.net.mean).view(1, 3, 1, 1)) / torch.tensor(self.net.std).view(1, 3, 1, 1)
        return self.net.model(x)[-1].mean(dim=(2, 3))[0].numpy()

    def fit(self, images: list[Path]) -> None:
        self.model.fit(np.stack([self.features(p) for p in images]))

    def score(self, image: Path) -> tuple[float, None]:
        return float(-self.model.decision_function(self.features(image)[None])[0]), None


class _ConvAE(nn.Module):
    def __init__(self, width: int = 32, bottleneck: int = 16):
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width * 2, width * 4, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width * 4, bottleneck, 3, 1, 1))
        self.decode = nn.Sequential(
            nn.Conv2d(bottleneck, width * 4, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class ConvAutoencoder:
    """Input: the whole image resized to 128 x 128; the error map is resized back to the image."""

    name = "autoencoder"
    size = 128

    def __init__(self, steps: int = 200, batch: int = 16, seed: int = 0, blur_sigma: float = 4.0):
        self.steps, self.batch, self.seed, self.blur_sigma = steps, batch, seed, blur_sigma
        self.model: _ConvAE | None = None

    def _tensor(self, rgb: np.ndarray) -> torch.Tensor:
        small = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(small).permute(2, 0, 1).float() / 255.0

    def fit(self, images: list[Path]) -> None:
        torch.manual_seed(self.seed)
        data = torch.stack([self._tensor(load_image(p).rgb) for p in images])
        self.model = _ConvAE()
        optimiser = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(self.seed)
        self.model.train()
        for _ in range(self.steps):
            batch = data[torch.randint(len(data), (min(self.batch, len(data)),), generator=generator)]
            flip = torch.rand(1, generator=generator).item() < 0.5  # cheap augmentation
            batch = batch.flip(3) if flip else batch
            loss = F.mse_loss(self.model(batch), batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        self.model.eval()

    @torch.inference_mode()
    def score(self, image: Path) -> tuple[float, np.ndarray]:
        if self.model is None:
            raise RuntimeError("fit the autoencoder first")
        rgb = load_image(image).rgb
        x = self._tensor(rgb)[None]
        error = ((self.model(x) - x) ** 2).mean(dim=1)[0].numpy()
        amap = cv2.resize(error, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
        amap = smooth(amap, self.blur_sigma)
        return float(amap.max()), amap


BASELINES = {cls.name: cls for cls in (HistogramIForest, PooledOCSVM, ConvAutoencoder)}
