"""Image loading: decode, validate, bring every input to 8-bit RGB.

Handling, decided once for every entry point:
- Colour order: arrays are RGB (not OpenCV's BGR), shape (H, W, 3) or (H, W), dtype uint8
  (uint16 is scaled to 8 bits; float in [0, 1] is scaled by 255).
- Grayscale is replicated to 3 channels (the backbone is an RGB model).
- 16-bit images are scaled to 8 bits (value / 257).
- An alpha channel is composited over black (transparent pixels carry no part).
- Files must decode completely: a truncated PNG or JPEG is an error, not a grey smear.
- Images smaller than MIN_SIDE pixels on a side, or larger than `max_pixels`, are refused.
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
MIN_SIDE = 8
DEFAULT_MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An input that is not a usable image; the message names the file and the reason."""


@dataclass(frozen=True)
class Image:
    rgb: np.ndarray  # (H, W, 3) uint8, RGB
    sha256: str
    source: str  # the path exactly as given, or "<array>"

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def _check_complete(data: bytes, source: str) -> None:
    """Refuse truncated PNG/JPEG, which OpenCV would otherwise decode partially.

    Trailing bytes after a complete image (camera trailers, motion photos) are allowed. For JPEG the
    end-of-image marker must follow the last start-of-scan marker (an EXIF thumbnail's own end marker
    comes before the main image's scans, so it does not count).
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data:
        raise ImageError(f"{source}: truncated PNG (no IEND chunk)")
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise ImageError(f"{source}: truncated JPEG (no end-of-image marker after the last scan)")


def to_rgb8(pixels: np.ndarray, source: str = "<array>", *, bgr: bool = False) -> np.ndarray:
    """Any decoded array -> (H, W, 3) uint8 RGB, following the module's rules."""
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"{source}: expected (H, W), (H, W, 3) or (H, W, 4) pixels, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ImageError(f"{source}: float pixels contain NaN or inf")
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ImageError(f"{source}: unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = (a[:, :, :3].astype(np.float32) * alpha).round().astype(np.uint8)
    if bgr:
        a = a[:, :, ::-1]
    h, w = a.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{source}: image is {w}x{h}, smaller than the minimum {MIN_SIDE} px per side")
    return np.ascontiguousarray(a)


def decode(data: bytes, source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if not data:
        raise ImageError(f"{source}: empty file")
    _check_complete(data, source)
    buf = np.frombuffer(data, dtype=np.uint8)
    pixels = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        raise ImageError(f"{source}: not a readable image")
    # OpenCV's own guard (OPENCV_IO_MAX_IMAGE_PIXELS) stops true bombs; this is the user's limit.
    if pixels.shape[0] * pixels.shape[1] > max_pixels:
        raise ImageError(f"{source}: image is {pixels.shape[1]}x{pixels.shape[0]}, over the limit of {max_pixels} pixels")
    return to_rgb8(pixels, source, bgr=pixels.ndim == 3)


def load_image(image: "str | os.PathLike | np.ndarray | Image", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """A path or an RGB array -> Image. Raises ImageError with a one-line reason."""
    if isinstance(image, Image):
        return image
    if isinstance(image, np.ndarray):
        rgb = to_rgb8(image)
        return Image(rgb=rgb, sha256=hashlib.sha256(rgb.tobytes()).hexdigest(), source="<array>")
    source = os.fspath(image)
    try:
        with open(source, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{source}: is a directory") from None
    except OSError as exc:
        raise ImageError(f"{source}: cannot read ({exc.strerror or exc})") from None
    rgb = decode(data, source, max_pixels=max_pixels)
    return Image(rgb=rgb, sha256=hashlib.sha256(data).hexdigest(), source=source)


def expand_paths(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders (recursive) and globs -> (image files in a stable order, [(path, why skipped)]).

    Files given by name are kept whatever their suffix (decoding decides); inside folders and
    globs only known image suffixes are taken and the other files are listed as skipped.
    """
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        found.append(path)
                    else:
                        skipped.append((path, "not an image file name"))
        elif os.path.exists(item):
            found.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                skipped.append((item, "pattern matches nothing"))
            for path in matches:
                if os.path.isdir(path):
                    sub_found, sub_skipped = expand_paths([path])
                    found += sub_found
                    skipped += sub_skipped
                elif Path(path).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(path)
                else:
                    skipped.append((path, "not an image file name"))
        else:
            raise ImageError(f"{item}: no such file or folder")
    # Keep the first mention of each file.
    seen: set[str] = set()
    unique = [p for p in found if not (os.path.abspath(p) in seen or seen.add(os.path.abspath(p)))]
    return unique, skipped
