"""Hostile image files, small to keep and quick to make: each claims 15000 x 15000 pixels (225 MP, under
OpenCV's own cap of 2**30, over simsearch's default limit of 100 MP) in a way the header readers once
missed. Used by tests/test_hostile_inputs.py and bench/hostile.py.

Each is a small real encoding whose size fields are rewritten, so a decoder that trusts the header
allocates the full image before noticing the data is short (or fills it with grey).
"""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np

SIDE = 15000
_SMALL = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def _encode(ext: str, pixels: np.ndarray = _SMALL) -> bytearray:
    ok, buf = cv2.imencode(ext, pixels)
    assert ok, ext
    return bytearray(buf.tobytes())


def jpeg_junk_before_sof() -> bytes:
    """A JPEG with one junk byte before its frame header (libjpeg skips it, with a warning)."""
    data = _encode(".jpg")
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, SIDE, SIDE)
    data[sof:sof] = b"\x00"
    return bytes(data)


def _pil_tiff(**options) -> bytearray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_SMALL).save(buf, "TIFF", **options)
    return bytearray(buf.getvalue())


def tiff_slong_size() -> bytes:
    """A TIFF whose ImageWidth and ImageLength are SLONG (type 9), which libtiff accepts."""
    data = _pil_tiff()
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        (tag,) = struct.unpack_from("<H", data, entry)
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 9, 1, SIDE)
    return bytes(data)


def bigtiff() -> bytes:
    """A BigTIFF (64-bit offsets: 20-byte directory entries)."""
    data = _pil_tiff(big_tiff=True)
    assert data[:4] == b"II+\x00"
    (ifd,) = struct.unpack_from("<Q", data, 8)
    (count,) = struct.unpack_from("<Q", data, ifd)
    for k in range(count):
        entry = ifd + 8 + 20 * k
        (tag,) = struct.unpack_from("<H", data, entry)
        if tag in (256, 257):
            struct.pack_into("<HHQQ", data, entry, tag, 4, 1, SIDE)
    return bytes(data)


def jpeg2000(honest_box: bool = False) -> bytes:
    """A JPEG 2000 file whose codestream says 15000 x 15000 while its JP2 header box says 60 x 40 (or, with
    `honest_box`, 15000 x 15000 too): OpenJPEG allocates by the codestream."""
    data = _encode(".jp2")
    siz = data.index(b"\xff\x4f\xff\x51") + 2
    struct.pack_into(">II", data, siz + 6, SIDE, SIDE)  # Xsiz, Ysiz (the offsets stay 0)
    struct.pack_into(">II", data, siz + 22, SIDE, SIDE)  # one tile covering it all
    if honest_box:
        ihdr = data.index(b"ihdr") + 4
        struct.pack_into(">II", data, ihdr, SIDE, SIDE)
    return bytes(data)


def radiance_hdr() -> bytes:
    """A Radiance HDR file: OpenCV decodes it, no header reader here knows it."""
    data = bytes(_encode(".hdr", _SMALL.astype(np.float32) / 255))
    return data.replace(b"-Y 40 +X 60", f"-Y {SIDE} +X {SIDE}".encode(), 1)


def pam() -> bytes:
    """A PAM (P7) file: OpenCV decodes it, no header reader here knows it."""
    data = bytes(_encode(".pam"))
    return data.replace(b"WIDTH 60\nHEIGHT 40", f"WIDTH {SIDE}\nHEIGHT {SIDE}".encode(), 1)


def avif() -> bytes:
    """An AVIF whose image spatial extents (ispe) claim 15000 x 15000."""
    from PIL import Image, features

    if not features.check("avif"):
        return b""
    buf = io.BytesIO()
    Image.fromarray(_SMALL).save(buf, "AVIF")
    data = bytearray(buf.getvalue())
    ispe = data.index(b"ispe") + 8  # after the box type and its version/flags
    struct.pack_into(">II", data, ispe, SIDE, SIDE)
    return bytes(data)


# name -> (maker, whether its size is read from the header: refused as too large, not as unknown)
HOSTILE = {
    "jpeg, junk byte before SOF": (jpeg_junk_before_sof, True),
    "tiff, SLONG size tags": (tiff_slong_size, True),
    "bigtiff": (bigtiff, True),
    "jpeg 2000, codestream larger than its header box": (jpeg2000, True),
    "jpeg 2000": (lambda: jpeg2000(honest_box=True), True),
    "radiance hdr": (radiance_hdr, False),
    "pam": (pam, False),
    "avif": (avif, None),  # refused either way: by its size, or because libavif refuses the lying header
}
