"""Synthetic defects pasted into good images: the negatives of fine-tuning (simsearch/finetune.py).

No texture or defect dataset can be downloaded here, so every defect is made from the product's own
good images: CutPaste (a patch of the image moved elsewhere, colour-jittered), a Perlin-noise blend in
the style of DRAEM (blobs of a texture cut from another good image, strongly transformed, blended in),
and a drawn scratch. Each function takes an (H, W, 3) uint8 RGB image and a seeded numpy Generator
and returns the altered image and its (H, W) bool mask. The mask is exactly the set of pixels whose
value changed: a pasted pixel that happens to equal the one it covers is not a defect.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image too small for a synthetic defect: {image.shape[:2]}")


def changed_mask(original: np.ndarray, altered: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels where any channel differs."""
    return np.any(original != altered, axis=-1)


def perlin_noise(height: int, width: int, res_y: int, res_x: int, rng: np.random.Generator) -> np.ndarray:
    """(height, width) float32 gradient noise in about [-1, 1] over a res_y x res_x lattice.

    Random unit gradients at the lattice corners; each pixel interpolates the four corner dot
    products with the quintic fade 6t^5 - 15t^4 + 10t^3 (Perlin's improved noise, as DRAEM uses it).
    """
    if res_y < 1 or res_x < 1:
        raise ValueError(f"lattice resolution must be >= 1, got {res_y} x {res_x}")
    angles = 2 * np.pi * rng.random((res_y + 1, res_x + 1))
    grad_y, grad_x = np.sin(angles), np.cos(angles)
    ys = np.arange(height) * (res_y / height)
    xs = np.arange(width) * (res_x / width)
    y0 = np.floor(ys).astype(int)[:, None]
    x0 = np.floor(xs).astype(int)[None, :]
    fy = (ys - np.floor(ys))[:, None]
    fx = (xs - np.floor(xs))[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return grad_y[y0 + dy, x0 + dx] * (fy - dy) + grad_x[y0 + dy, x0 + dx] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (np.sqrt(2) * (top * (1 - v) + bottom * v)).astype(np.float32)


def cutpaste(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.02, 0.12),
             aspect: tuple[float, float] = (0.3, 3.3)) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle of the image (`area` of it, aspect ratio in `aspect`), brightness-jittered, pasted elsewhere."""
    _check_image(image)
    h, w = image.shape[:2]
    target = rng.uniform(*area) * h * w
    ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    ph = int(np.clip(round(np.sqrt(target * ratio)), 2, h - 1))
    pw = int(np.clip(round(np.sqrt(target / ratio)), 2, w - 1))
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    dy, dx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = image[sy:sy + ph, sx:sx + pw].astype(np.float32)
    # Brightness and per-channel jitter, as CutPaste does, so a patch from a uniform area still shows.
    patch = patch * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20, size=3)
    altered = image.copy()
    altered[dy:dy + ph, dx:dx + pw] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    return altered, changed_mask(image, altered)


def foreign_texture(source: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(height, width, 3) uint8: a crop of `source` zoomed, rotated or flipped and re-toned, so that it
    looks like the product's material but not like any place of a good image."""
    _check_image(source)
    zoom = rng.uniform(1.5, 4.0)  # a finer or coarser grain than the product's own
    ch = max(4, min(source.shape[0], int(height / zoom)))
    cw = max(4, min(source.shape[1], int(width / zoom)))
    y, x = rng.integers(0, source.shape[0] - ch + 1), rng.integers(0, source.shape[1] - cw + 1)
    crop = np.rot90(source[y:y + ch, x:x + cw], k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    tone = rng.integers(0, 3)
    if tone == 0:  # invert
        crop = 255.0 - crop
    elif tone == 1:  # gamma
        crop = 255.0 * (crop / 255.0) ** rng.uniform(0.3, 3.0)
    else:  # channels shuffled and contrast stretched
        crop = crop[..., rng.permutation(3)]
        crop = (crop - crop.mean()) * rng.uniform(1.5, 3.0) + crop.mean()
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)


def perlin_blend(image: np.ndarray, texture_source: np.ndarray, rng: np.random.Generator,
                 threshold: float = 0.5, tries: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style: blobs where Perlin noise exceeds `threshold` take a foreign texture, blended as
    (1 - beta) * texture + beta * image with beta in [0, 0.8)."""
    _check_image(image)
    h, w = image.shape[:2]
    blobs = np.zeros((h, w), dtype=bool)
    for _ in range(tries):  # a coarse lattice can leave no value above the threshold: draw again
        res_y, res_x = 2 ** rng.integers(0, 4), 2 ** rng.integers(0, 4)
        blobs = perlin_noise(h, w, int(res_y), int(res_x), rng) > threshold
        if blobs.any():
            break
    texture = foreign_texture(texture_source, h, w, rng).astype(np.float32)
    beta = rng.uniform(0.0, 0.8)
    blended = (1 - beta) * texture + beta * image.astype(np.float32)
    altered = image.copy()
    altered[blobs] = np.clip(np.rint(blended[blobs]), 0, 255).astype(np.uint8)
    return altered, changed_mask(image, altered)


def scratch(image: np.ndarray, rng: np.random.Generator, max_thickness: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A drawn polyline of 2 to 4 segments, darker or brighter than the image, 1 to `max_thickness` px wide."""
    _check_image(image)
    h, w = image.shape[:2]
    n_points = int(rng.integers(3, 6))
    start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    step = rng.uniform(0.1, 0.3) * min(h, w)
    heading = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(n_points - 1):  # a gently bending line, like a scratch, not a zigzag
        heading += rng.normal(0, 0.4)
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    line = np.rint(np.stack(points)).astype(np.int32).reshape(-1, 1, 2)
    level = float(image.mean())
    base = rng.uniform(0, 60) if level > 127 else rng.uniform(195, 255)
    colour = tuple(float(np.clip(base + rng.uniform(-15, 15), 0, 255)) for _ in range(3))
    altered = np.ascontiguousarray(image.copy())
    cv2.polylines(altered, [line], isClosed=False, color=colour, thickness=int(rng.integers(1, max_thickness + 1)),
                  lineType=cv2.LINE_AA)
    return altered, changed_mask(image, altered)


KINDS = ("cutpaste", "perlin", "scratch")


def random_defect(image: np.ndarray, texture_sources: Sequence[np.ndarray], rng: np.random.Generator,
                  kinds: Sequence[str] = KINDS, tries: int = 5) -> tuple[np.ndarray, np.ndarray, str]:
    """One defect of a kind drawn from `kinds`: (altered, mask, kind). The mask is never empty unless
    `tries` draws all changed nothing (an image of one flat colour can hide a scratch of that colour)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"defect kinds must be some of {KINDS}, got {list(kinds)}")
    makers: dict[str, Callable] = {
        "cutpaste": lambda: cutpaste(image, rng),
        "perlin": lambda: perlin_blend(image, texture_sources[int(rng.integers(0, len(texture_sources)))]
                                       if texture_sources else image, rng),
        "scratch": lambda: scratch(image, rng),
    }
    altered, mask, kind = image, np.zeros(image.shape[:2], bool), kinds[0]
    for _ in range(tries):
        kind = kinds[int(rng.integers(0, len(kinds)))]
        altered, mask = makers[kind]()
        if mask.any():
            break
    return altered, mask, kind
