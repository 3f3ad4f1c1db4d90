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
  refused, and the size is always read from the header before any pixel is decoded, so a
  decompression bomb (a 30000x30000 PNG of 100 KB, a 15000x15000 JPEG 2000 of 6 KB) costs no memory.
  PNG, BMP, GIF, WebP, PNM/PFM, Sun raster and JPEG 2000 headers are read here; JPEG, TIFF (BigTIFF
  too) and AVIF headers by Pillow's parsers, which read the header only (and skip what libjpeg and
  libtiff skip: junk bytes before a marker, size tags of any integer type). A TIFF's tiles count as
  well: each is decoded whole, however small the image. Every other format
  OpenCV could decode (Radiance HDR, PAM, OpenEXR, ...) is refused: its size is not known before decoding.
- Only regular files are read: a FIFO, a device or a socket is refused without being opened for a
  blocking read (`mkfifo cam.png` would otherwise hang the reader, and a writer holding the lock).
- Empty files, non-images, decoder failures, missing or unreadable paths, directories and pixel
  types other than unsigned 8/16-bit, float and bool are refused.
- Folders are walked recursively: regular files with an image suffix are decoded, the others are
  listed as skipped; a file named directly is decoded whatever its suffix.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import stat
import struct
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import cv2
import numpy as np

from .errors import ImageError, ImageTooLarge

# Pillow's header parsers warn about damage they read past; whether such a file is refused is decided here.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.(Tiff|Jpeg|Avif)ImagePlugin")

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


def _pillow_header(data: bytes, plugin: str):
    """Pillow's parser of one format run on the header only (no pixel is decoded; Pillow's own bomb check
    is in `Image.open`, bypassed here so that the size is ours to judge); None when it cannot tell."""
    import importlib

    try:
        module = importlib.import_module(f"PIL.{plugin}ImagePlugin")
        return getattr(module, f"{plugin}ImageFile")(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - any parser failure means: size unknown, refuse
        return None


def _tiff_tile_pixels(data: bytes) -> int:
    """Pixels of one tile of a tiled TIFF (0 for strips): OpenCV decodes each tile whole into a buffer of
    its own (up to 1 GB), however small the image; libtiff cuts strips to the image's height."""
    im = _pillow_header(data, "Tiff")
    tags = im.tag_v2 if im is not None else {}
    return int(tags[322]) * int(tags[323]) if 322 in tags and 323 in tags else 0  # TileWidth, TileLength


def _jp2_size(data: bytes) -> tuple[int, int] | None:
    """The size from a JPEG 2000 codestream's SIZ marker (in a JP2 file: its jp2c box), what OpenJPEG
    allocates by; the JP2 header box may claim another size, so it is not used. More than 4 components
    (each as large as the image) are refused: no picture has them."""
    offset = 0
    if data[:4] != b"\xff\x4f\xff\x51":  # not a raw codestream: walk the JP2 boxes to the codestream
        while True:
            length, kind = struct.unpack_from(">I4s", data, offset)
            header = 8
            if length == 1:
                (length,) = struct.unpack_from(">Q", data, offset + 8)
                header = 16
            if kind == b"jp2c":
                offset += header
                break
            if length < header:  # 0: the last box, to the end of the file
                return None
            offset += length
    if data[offset:offset + 4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", data, offset + 8)
    (components,) = struct.unpack_from(">H", data, offset + 40)
    if components > 4 or xsiz <= x0 or ysiz <= y0:
        return None
    return xsiz - x0, ysiz - y0


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


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file header, without decoding pixels; None when not known."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack_from(">II", data, 16)
        if data[:3] == b"\xff\xd8\xff":
            im = _pillow_header(data, "Jpeg")
            return None if im is None else im.size
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
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic TIFF and BigTIFF
            im = _pillow_header(data, "Tiff")
            return None if im is None else im.size
        if data[:4] == b"\xff\x4f\xff\x51" or data[4:12] == b"jP  \r\n\x87\n":
            return _jp2_size(data)
        if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
            im = _pillow_header(data, "Avif")
            return None if im is None else im.size
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
    size = header_size(data)
    if size is None:  # an unknown format, or a known one whose header does not say its size
        raise ImageError(f"{source}: not a readable image (no image size in its header; accepted: PNG, JPEG, BMP, "
                         "GIF, WebP, TIFF, PNM, Sun raster, JPEG 2000, AVIF)")
    _check_size(size[0], size[1], source, max_pixels)  # bombs (and tiny images) before any pixel is decoded
    tile = _tiff_tile_pixels(data) if data[:2] in (b"II", b"MM") else 0
    if tile > max_pixels:
        raise ImageTooLarge(f"{source}: its TIFF tiles hold {tile} pixels each, over the limit of {max_pixels} pixels")
    _check_complete(data, source)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        pixels = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:  # e.g. OpenCV's own pixel limit (OPENCV_IO_MAX_IMAGE_PIXELS)
        reason = " ".join(str(exc).split("error: ", 1)[-1].split())
        raise ImageError(f"{source}: not a readable image (OpenCV: {reason})") from None
    if pixels is None or pixels.size == 0 or pixels.ndim < 2:
        raise ImageError(f"{source}: not a readable image")
    # The decoder may disagree with the header it was given (a lying header): judge what it made too.
    _check_size(pixels.shape[1], pixels.shape[0], source, max_pixels)
    return to_rgb8(pixels, source, bgr=pixels.ndim == 3)


def open_regular(path: "str | os.PathLike"):
    """A regular file opened for reading (binary). A FIFO, device or socket is refused, never waited on:
    O_NONBLOCK makes opening a FIFO with no writer return at once, and fstat says what was opened (so a
    path swapped for a FIFO after a check is caught too). Raises ImageError naming the path."""
    source = os.fspath(path)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{source}: cannot read ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError(f"{source}: " + ("is a directory" if stat.S_ISDIR(mode) else
                                          "not a regular file (a FIFO, device or socket)"))
    return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for a regular file's reads


def read_bytes(path: "str | os.PathLike") -> bytes:
    """The bytes of a regular file (see `open_regular`); ImageError otherwise."""
    with open_regular(path) as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise ImageError(f"{os.fspath(path)}: cannot read ({exc.strerror or exc})") from None


def is_regular(path: str) -> bool:
    """Whether `path` is (or links to) a regular file; never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def load_image(image: "str | os.PathLike | np.ndarray | Image", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """A path or an RGB array -> Image. Raises ImageError with a one-line reason."""
    if isinstance(image, Image):
        return image
    if isinstance(image, np.ndarray):
        rgb = to_rgb8(image)
        return Image(rgb=rgb, sha256=hashlib.sha256(rgb.tobytes()).hexdigest(), source="<array>")
    source = os.fspath(image)
    data = read_bytes(source)
    rgb = decode(data, source, max_pixels=max_pixels)
    return Image(rgb=rgb, sha256=hashlib.sha256(data).hexdigest(), source=source)


def expand_paths(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders (recursive) and globs -> (image files in a stable order, [(path, why skipped)]).

    Files given by name are kept whatever their suffix (decoding decides); inside folders and
    globs only regular files with known image suffixes are taken and the others are listed as skipped.
    """
    found: list[str] = []
    skipped: list[tuple[str, str]] = []

    def take(path: str) -> None:
        if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((path, "not an image file name"))
        elif not is_regular(path):
            skipped.append((path, "not a regular file (a FIFO, device or socket)"))
        else:
            found.append(path)

    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    take(os.path.join(root, name))
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
                else:
                    take(path)
        else:
            raise ImageError(f"{item}: no such file or folder")
    # Keep the first mention of each file.
    seen: set[str] = set()
    unique = [p for p in found if not (os.path.abspath(p) in seen or seen.add(os.path.abspath(p)))]
    return unique, skipped


T = TypeVar("T")
R = TypeVar("R")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a regular file's bytes (ImageError for anything else: see `open_regular`)."""
    h = hashlib.sha256()
    with open_regular(path) as fh:
        try:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        except OSError as exc:
            raise ImageError(f"{os.fspath(path)}: cannot read ({exc.strerror or exc})") from None
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
