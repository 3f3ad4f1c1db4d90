"""Image loading: decode, validate, bring every input to 8-bit RGB.

Handling, decided once for every entry point; every refusal is an ImageError with one line,
"<file>: <reason>" (control characters in file names are escaped):
- Colour order: arrays are RGB (not OpenCV's BGR), shape (H, W, 3) or (H, W), dtype uint8
  (uint16 is scaled to 8 bits; float in [0, 1] is scaled by 255).
- Grayscale is replicated to 3 channels (the backbone is an RGB model).
- 16-bit images are scaled to 8 bits (value / 257).
- An alpha channel is composited over black (transparent pixels carry no part), including
  gray+alpha PNGs and palette PNGs with transparency.
- Palette (indexed) PNGs become their palette's colours.
- CMYK JPEGs are converted to RGB by OpenCV's arithmetic (Adobe's inverted storage, as Photoshop
  and Pillow write it); ICC profiles are ignored, for CMYK as for RGB.
- Files must decode completely: a truncated PNG or JPEG is an error, not a grey smear (truncated
  BMP, TIFF and WebP files are refused by the decoder itself).
- Images smaller than MIN_SIDE pixels on a side (a 1x1 image), or larger than `max_pixels`, are
  refused. For PNG, JPEG, BMP, GIF, WebP, TIFF, PNM and Sun raster files the size is read from the
  header before decoding, so a decompression bomb (a 30000x30000 PNG of 100 KB) costs no memory;
  other formats rely on OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS) and a check after decoding.
- Empty files, non-images, decoder failures, missing or unreadable paths, directories and pixel
  types other than unsigned 8/16-bit, float and bool are refused.
- Folders are walked recursively: files with an image suffix are decoded, the others are listed as
  skipped; a file named directly is decoded whatever its suffix.
"""
from __future__ import annotations

import glob
import hashlib
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import cv2
import numpy as np

from .errors import ImageError, ImageTooLarge

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
MIN_SIDE = 8
# The decompression-bomb guard: images past this many pixels are refused (settable per process).
DEFAULT_MAX_PIXELS = int(os.environ.get("SIMSEARCH_MAX_PIXELS", "100000000"))


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


def _check_size(width: int, height: int, source: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(f"{source}: image is {width}x{height}, over the limit of {max_pixels} pixels")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{source}: image is {width}x{height}, smaller than the minimum {MIN_SIDE} px per side")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _JPEG_SOF and i + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, i + 5)
            return (width, height) if height else None  # height 0: defined later by a DNL marker
        i += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack_from(order + "I", data, 4)
    (count,) = struct.unpack_from(order + "H", data, offset)
    size: dict[int, int] = {}
    for k in range(count):
        tag, kind, n = struct.unpack_from(order + "HHI", data, offset + 2 + 12 * k)
        if tag in (256, 257) and n == 1 and kind in (3, 4):
            size[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, offset + 10 + 12 * k)[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    tokens: list[int] = []
    i = 2
    while len(tokens) < 2 and i < min(len(data), 4096):
        c = data[i:i + 1]
        if c == b"#":
            while i < len(data) and data[i:i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isdigit():
            j = i
            while j < len(data) and data[j:j + 1].isdigit():
                j += 1
            tokens.append(int(data[i:j]))
            i = j
            continue
        elif not c.isspace():
            return None
        i += 1
    return (tokens[0], tokens[1]) if len(tokens) == 2 else None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file header, without decoding pixels; None when not known."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack_from(">II", data, 16)
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            (header,) = struct.unpack_from("<I", data, 14)
            if header == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack_from("<HH", data, 18)
            width, height = struct.unpack_from("<ii", data, 18)
            return abs(width), abs(height)  # negative height: top-down rows
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack_from("<HH", data, 6)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
            if chunk == b"VP8L" and data[20] == 0x2F:
                (bits,) = struct.unpack_from("<I", data, 21)
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                width, height = struct.unpack_from("<HH", data, 26)
                return width & 0x3FFF, height & 0x3FFF
            return None
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if data[:1] == b"P" and data[1:2] in b"123456fF" and len(data) > 2 and data[2:3].isspace():
            return _pnm_size(data)
        if data[:4] == b"\x59\xa6\x6a\x95":  # Sun raster
            return struct.unpack_from(">II", data, 4)
    except (struct.error, IndexError):
        return None
    return None


def decode(data: bytes, source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded file bytes -> (H, W, 3) uint8 RGB; anything else raises ImageError."""
    if not data:
        raise ImageError(f"{source}: empty file")
    size = _header_size(data)
    if size is not None:  # refuse bombs (and tiny images) before any pixel is decoded
        _check_size(size[0], size[1], source, max_pixels)
    _check_complete(data, source)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        pixels = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:  # e.g. OpenCV's own pixel limit (OPENCV_IO_MAX_IMAGE_PIXELS)
        reason = " ".join(str(exc).split("error: ", 1)[-1].split())
        raise ImageError(f"{source}: not a readable image (OpenCV: {reason})") from None
    if pixels is None or pixels.size == 0 or pixels.ndim < 2:
        raise ImageError(f"{source}: not a readable image")
    # The header check above covers the common formats; this one covers the rest.
    _check_size(pixels.shape[1], pixels.shape[0], source, max_pixels)
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


T = TypeVar("T")
R = TypeVar("R")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_ahead(items: Iterable[T], load: Callable[[T], R], depth: int = 4) -> Iterator[tuple[T, R | None, Exception | None]]:
    """(item, load(item), None), or (item, None, the exception) when load raised, in the order of
    `items`, with up to `depth` loads running ahead in a background thread.

    OpenCV decodes without holding the GIL, so the next images decode while the caller runs the
    backbone on the current ones; at most `depth` decoded images wait in memory.
    """
    def guarded(item: T) -> tuple[R | None, Exception | None]:
        try:
            return load(item), None
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who decides
            return None, exc

    queue: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="simsearch-decode") as pool:
        try:
            for item in items:
                queue.append((item, pool.submit(guarded, item)))
                if len(queue) > depth:
                    head, future = queue.popleft()
                    yield (head, *future.result())
            while queue:
                head, future = queue.popleft()
                yield (head, *future.result())
        finally:
            for _, future in queue:  # the caller stopped early: drop what was read ahead
                future.cancel()
