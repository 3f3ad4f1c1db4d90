"""Simpler approaches, measured on the same data as the engine through one small interface.

    detector.fit(good_image_paths)
    score, anomaly_map_or_None = detector.score(image_path)

- `histogram-iforest`: IsolationForest on colour (RGB) and HSV histograms; image level only.
- `pooled-ocsvm`: one-class SVM on globally average-pooled backbone features (the engine's own default
  backbone and weights, last stage); image level only.
- `image-knn`: the seeds' first strategy, image-level feature similarity: the same pooled vector, L2-normalised,
  the score its L2 distance to the nearest good image (in [0, 2]) and `0.5 ** (d / threshold)` the similarity;
  no patches, no map.
- `autoencoder`, `vae`, `ganomaly`: trained on the good images (baselines_neural.py); the per-pixel
  reconstruction error is the map.

Each is kept small and fair: the images are the same decoded RGB images the engine sees; methods
that need a fixed input size resize the whole image (stated per class). Every detector takes the run's
`FeatureCache`, so the threshold's k refits (and their scoring of the held-out fold) do not decode and
embed train/good again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
from sklearn.ensemble import IsolationForest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from ..errors import SimsearchError
from ..images import load_image
from ..scoring import similarity_from_score
from .baselines_neural import ConvAutoencoder, ConvVAE, Ganomaly
from .feature_cache import FeatureCache, cached


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

    def __init__(self, seed: int = 0, cache: FeatureCache | None = None):
        self.model = IsolationForest(n_estimators=200, random_state=seed)
        self.cache = cache

    def _histogram(self, path: Path) -> np.ndarray:
        return cached(self.cache, "histogram", path, lambda p: colour_histogram(load_image(p).rgb))

    def fit(self, images: list[Path]) -> None:
        self.model.fit(np.stack([self._histogram(p) for p in images]))

    def score(self, image: Path) -> tuple[float, None]:
        return float(-self.model.score_samples(self._histogram(image)[None])[0]), None


class PooledEmbedder:
    """One vector per image: the whole image resized to the backbone's native size (240 x 240 for Lite1), its
    last stage (stride 32) averaged over all positions -> (C,) float32 (1280 for Lite1)."""

    size = 240

    def __init__(self, backbone: str = "tf_efficientnet_lite1"):
        from ..backbones import build_backbone, layers_for_strides
        self.backbone = backbone
        self.net = build_backbone(backbone, "embedded", layers_for_strides(backbone, (32,)))
        self.mean = torch.tensor(self.net.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.net.std).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, path: Path) -> np.ndarray:
        rgb = cv2.resize(load_image(path).rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        return self.net.model((x - self.mean) / self.std)[-1].mean(dim=(2, 3))[0].numpy()


class _PooledFeatures:
    """The pooled-vector path `pooled-ocsvm` and `image-knn` share: one embedder per run, train vectors cached."""

    def __init__(self, backbone: str, cache: FeatureCache | None):
        self.cache = cache
        self.embed = PooledEmbedder(backbone) if cache is None else \
            cache.shared(f"pooled-embedder:{backbone}", lambda: PooledEmbedder(backbone))

    def vector(self, path: Path) -> np.ndarray:
        """-> (C,) float32, each image embedded once per run."""
        return cached(self.cache, f"pooled:{self.embed.backbone}", path, self.embed)

    def train_vectors(self, images: list[Path]) -> np.ndarray:
        return np.stack([self.vector(p) for p in images])


class PooledOCSVM(_PooledFeatures):
    """Input: `PooledEmbedder`'s vector; a standardised RBF one-class SVM, nu 0.1."""

    name = "pooled-ocsvm"

    def __init__(self, backbone: str = "tf_efficientnet_lite1", cache: FeatureCache | None = None):
        super().__init__(backbone, cache)
        self.model = make_pipeline(StandardScaler(), OneClassSVM(nu=0.1, gamma="scale"))

    def fit(self, images: list[Path]) -> None:
        self.model.fit(self.train_vectors(images))

    def score(self, image: Path) -> tuple[float, None]:
        return float(-self.model.decision_function(self.vector(image)[None])[0]), None


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) float32, each row scaled to unit L2 norm (a zero row stays zero)."""
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def nearest_distance(query: np.ndarray, references: np.ndarray) -> float:
    """(C,) unit query, (N, C) unit references -> the smallest L2 distance, sqrt(2 - 2 cos), in [0, 2]."""
    cos = references @ query
    return float(np.sqrt(max(2.0 - 2.0 * float(cos.max()), 0.0)))


class ImageKNN(_PooledFeatures):
    """Image-level similarity search: the score of an image is the L2 distance between its unit-normalised
    pooled vector and the nearest good reference's (exact, brute force)."""

    name = "image-knn"

    def __init__(self, backbone: str = "tf_efficientnet_lite1", cache: FeatureCache | None = None):
        super().__init__(backbone, cache)
        self.references: np.ndarray | None = None

    def fit(self, images: list[Path]) -> None:
        self.references = unit_rows(self.train_vectors(images))

    def score(self, image: Path) -> tuple[float, None]:
        if self.references is None:
            raise SimsearchError("fit the image-knn baseline before scoring")
        return nearest_distance(unit_rows(self.vector(image)[None])[0], self.references), None

    @staticmethod
    def similarity(score: float, threshold: float) -> float | None:
        """The seeds' similarity in [0, 1]: 0.5 ** (score / threshold); 1 = a reference's twin, 0.5 = at the
        threshold (as the engine's `similarity_from_score`, which this is)."""
        return similarity_from_score(score, threshold)


BASELINES = {cls.name: cls for cls in (HistogramIForest, PooledOCSVM, ImageKNN, ConvAutoencoder, ConvVAE, Ganomaly)}
