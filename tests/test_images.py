"""simsearch.images: pixel normalisation, file decoding and path expansion."""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from simsearch.images import MIN_SIDE, Image, ImageError, header_size, decode, expand_paths, load_image, to_rgb8


# -- to_rgb8 ----------------------------------------------------------------------------------------

def test_grayscale_is_replicated_to_three_channels():
    gray = np.arange(16 * 12, dtype=np.uint8).reshape(16, 12)
    rgb = to_rgb8(gray)
    assert rgb.shape == (16, 12, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], gray)


def test_single_channel_3d_is_treated_as_grayscale():
    gray = np.full((10, 9, 1), 77, dtype=np.uint8)
    rgb = to_rgb8(gray)
    assert rgb.shape == (10, 9, 3)
    assert (rgb == 77).all()


def test_uint16_is_scaled_by_257():
    a = np.zeros((8, 8, 3), dtype=np.uint16)
    a[0, 0] = (65535, 257, 0)
    a[0, 1] = (257 * 100, 257 * 200, 128)  # 128 / 257 = 0.498 -> 0
    a[0, 2] = (129, 386, 385)  # 0.502 -> 1, 1.502 -> 2, 1.498 -> 1
    rgb = to_rgb8(a)
    assert rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 1, 0]
    assert rgb[0, 1].tolist() == [100, 200, 0]
    assert rgb[0, 2].tolist() == [1, 2, 1]


def test_rgba_is_composited_over_black():
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[..., :3] = (200, 100, 50)
    a[0, 0, 3] = 255  # opaque: unchanged
    a[0, 1, 3] = 0  # transparent: black
    a[0, 2, 3] = 128  # half: scaled by 128/255
    rgb = to_rgb8(a)
    assert rgb.shape == (8, 8, 3)
    assert rgb[0, 0].tolist() == [200, 100, 50]
    assert rgb[0, 1].tolist() == [0, 0, 0]
    assert rgb[0, 2].tolist() == [round(200 * 128 / 255), round(100 * 128 / 255), round(50 * 128 / 255)]


def test_float_in_unit_range_is_scaled_by_255_and_clipped():
    a = np.zeros((8, 8), dtype=np.float32)
    a[0, 0], a[0, 1], a[0, 2], a[0, 3], a[0, 4] = 1.0, 0.5, -0.3, 2.0, 0.1
    rgb = to_rgb8(a)
    assert rgb.dtype == np.uint8
    assert rgb[0, :5, 0].tolist() == [255, 128, 0, 255, 26]


def test_float64_is_accepted():
    rgb = to_rgb8(np.full((9, 9, 3), 0.2, dtype=np.float64))
    assert (rgb == 51).all()


def test_float_with_nan_is_refused():
    a = np.zeros((8, 8), dtype=np.float32)
    a[3, 3] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        to_rgb8(a, "pic.png")


def test_bool_mask_becomes_0_or_255():
    a = np.zeros((8, 8), dtype=bool)
    a[1, 1] = True
    rgb = to_rgb8(a)
    assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [0, 0, 0]


def test_bgr_flag_reverses_channels():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    a[..., 0] = 255  # blue in BGR
    assert to_rgb8(a, bgr=True)[0, 0].tolist() == [0, 0, 255]
    assert to_rgb8(a)[0, 0].tolist() == [255, 0, 0]
    assert to_rgb8(a, bgr=True).flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("shape", [(8,), (8, 8, 2), (8, 8, 5), (2, 8, 8, 3)])
def test_bad_shapes_raise(shape):
    with pytest.raises(ImageError, match=r"src\.png: expected"):
        to_rgb8(np.zeros(shape, dtype=np.uint8), "src.png")


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint32, np.int64, np.complex64])
def test_bad_dtypes_raise(dtype):
    with pytest.raises(ImageError, match="unsupported pixel type"):
        to_rgb8(np.zeros((8, 8, 3), dtype=dtype))


def test_min_side():
    assert to_rgb8(np.zeros((MIN_SIDE, MIN_SIDE), np.uint8)).shape == (MIN_SIDE, MIN_SIDE, 3)
    with pytest.raises(ImageError, match="smaller than the minimum"):
        to_rgb8(np.zeros((MIN_SIDE - 1, 100), np.uint8))
    with pytest.raises(ImageError, match="smaller than the minimum"):
        to_rgb8(np.zeros((100, MIN_SIDE - 1, 3), np.uint8))


# -- decode / load_image ------------------------------------------------------------------------------

def _red_bgr(h=20, w=30):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 2] = 255  # red, in OpenCV's BGR order
    return img


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".jpg"])
def test_pure_red_file_comes_back_red_in_rgb(tmp_path, suffix):
    path = tmp_path / f"red{suffix}"
    assert cv2.imwrite(str(path), _red_bgr())
    image = load_image(path)
    assert isinstance(image, Image)
    assert (image.height, image.width) == (20, 30)
    assert image.rgb.shape == (20, 30, 3) and image.rgb.dtype == np.uint8
    if suffix == ".jpg":  # lossy: close to pure red
        assert np.abs(image.rgb.astype(int) - [255, 0, 0]).max() <= 3
    else:
        assert (image.rgb == [255, 0, 0]).all()
    assert image.source == str(path)
    assert image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_rgba_png_is_composited(tmp_path):
    bgra = np.zeros((12, 12, 4), dtype=np.uint8)
    bgra[..., 2] = 255  # red
    bgra[:6, :, 3] = 255  # top half opaque, bottom transparent
    path = tmp_path / "alpha.png"
    cv2.imwrite(str(path), bgra)
    rgb = load_image(path).rgb
    assert (rgb[:6] == [255, 0, 0]).all()
    assert (rgb[6:] == 0).all()


def test_gray16_png_is_scaled(tmp_path):
    a = np.full((10, 10), 257 * 40, dtype=np.uint16)
    path = tmp_path / "g16.png"
    cv2.imwrite(str(path), a)
    assert (load_image(path).rgb == 40).all()


def test_array_input():
    a = np.zeros((10, 10, 3), np.uint8)
    a[..., 0] = 9
    image = load_image(a)
    assert image.source == "<array>"
    assert image.sha256 == hashlib.sha256(a.tobytes()).hexdigest()
    assert load_image(image) is image


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        load_image(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "not a readable image" in str(info.value)


@pytest.mark.parametrize("suffix,what", [(".png", "truncated PNG"), (".jpg", "truncated JPEG")])
def test_truncated_file(tmp_path, suffix, what):
    rng = np.random.default_rng(0)
    full = tmp_path / f"full{suffix}"
    cv2.imwrite(str(full), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        load_image(cut)
    assert str(cut) in str(info.value)
    assert what in str(info.value)
    load_image(full)  # the whole file is fine



@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".webp"])
@pytest.mark.parametrize("keep", [0.3, 0.9, 0.99])
def test_truncated_bmp_tiff_webp_are_refused_by_the_decoder(tmp_path, suffix, keep):
    data = cv2.imencode(suffix, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match=rf"cut\{suffix}: not a readable image"):
        load_image(cut)

def test_jpeg_with_trailing_padding_is_not_refused(tmp_path):
    path = tmp_path / "pad.jpg"
    cv2.imwrite(str(path), _red_bgr())
    path.write_bytes(path.read_bytes() + b"\x00\x00\r\n")
    assert load_image(path).rgb.shape == (20, 30, 3)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_complete_file_with_trailing_data_is_not_called_truncated(tmp_path, suffix):
    path = tmp_path / f"trailer{suffix}"
    cv2.imwrite(str(path), _red_bgr())
    path.write_bytes(path.read_bytes() + b"TRAILER-METADATA" * 8)
    assert load_image(path).rgb.shape == (20, 30, 3)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="no such file") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory") as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((20, 30, 3), np.uint8))
    assert load_image(path, max_pixels=600).width == 30
    with pytest.raises(ImageError, match="over the limit of 599 pixels"):
        load_image(path, max_pixels=599)


def test_decode_too_small_image_names_source(tmp_path):
    ok, buf = cv2.imencode(".png", np.zeros((4, 30, 3), np.uint8))
    with pytest.raises(ImageError, match=r"^tiny\.png: image is 30x4"):
        decode(buf.tobytes(), "tiny.png")


# -- expand_paths -------------------------------------------------------------------------------------

def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_folder_is_recursive_and_non_images_are_skipped(tmp_path):
    a = _touch(tmp_path / "d" / "a.png")
    b = _touch(tmp_path / "d" / "sub" / "b.JPG")
    c = _touch(tmp_path / "d" / "sub" / "deeper" / "c.bmp")
    txt = _touch(tmp_path / "d" / "readme.txt")
    found, skipped = expand_paths([str(tmp_path / "d")])
    assert found == [a, b, c]
    assert skipped == [(txt, "not an image file name")]


def test_glob(tmp_path):
    a = _touch(tmp_path / "a.png")
    b = _touch(tmp_path / "b.png")
    _touch(tmp_path / "c.jpg")
    txt = _touch(tmp_path / "x.png.txt")
    found, skipped = expand_paths([str(tmp_path / "*.png")])
    assert found == [a, b]
    assert skipped == []
    found, skipped = expand_paths([str(tmp_path / "*.txt")])
    assert found == [] and skipped == [(txt, "not an image file name")]


def test_recursive_glob_and_glob_matching_a_folder(tmp_path):
    a = _touch(tmp_path / "x1" / "a.png")
    b = _touch(tmp_path / "x2" / "deep" / "b.png")
    found, _ = expand_paths([str(tmp_path / "**" / "*.png")])
    assert found == [a, b]
    found, _ = expand_paths([str(tmp_path / "x*")])  # folders matched by a glob are walked
    assert found == [a, b]


def test_glob_matching_nothing_is_skipped(tmp_path):
    pattern = str(tmp_path / "*.tif")
    assert expand_paths([pattern]) == ([], [(pattern, "pattern matches nothing")])


def test_file_named_directly_is_kept_whatever_its_suffix(tmp_path):
    f = _touch(tmp_path / "picture.dat")
    assert expand_paths([f]) == ([f], [])


def test_missing_path_raises(tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="no such file or folder"):
        expand_paths([missing])


def test_duplicates_kept_once_in_first_mention_order(tmp_path):
    a = _touch(tmp_path / "a.png")
    b = _touch(tmp_path / "b.png")
    rel_a = os.path.relpath(a)
    found, skipped = expand_paths([b, a, str(tmp_path), rel_a, str(tmp_path / "*.png")])
    assert found == [b, a]
    assert skipped == []


# -- hostile and odd files ----------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width, height, bit_depth, colour_type, rows, extra_chunks=()):
    """A PNG built by hand: `rows` yields each row's bytes (filter byte 0 is added here)."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" + row) for row in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(_png_chunk(k, b) for k, b in extra_chunks)
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _blank_1bit_png(width, height):
    """A valid 1-bit grayscale PNG: a few hundred KB on disk however large it claims to be."""
    row = bytes((width + 7) // 8)
    return _png(width, height, 1, 0, (row for _ in range(height)))


PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 200, 10)]


def _palette_indices(h=12, w=16):
    return (np.arange(h)[:, None] + np.arange(w)[None, :]) % len(PALETTE)


def test_palette_png_decodes_to_the_palette_colours(tmp_path):
    idx = _palette_indices()
    plte = b"".join(bytes(c) for c in PALETTE)
    path = tmp_path / "indexed.png"
    path.write_bytes(_png(16, 12, 8, 3, (bytes(r.astype(np.uint8)) for r in idx), [(b"PLTE", plte)]))
    rgb = load_image(path).rgb
    assert rgb.shape == (12, 16, 3)
    np.testing.assert_array_equal(rgb, np.array(PALETTE, np.uint8)[idx])


def test_palette_png_with_transparency_is_composited(tmp_path):
    idx = _palette_indices()
    plte = b"".join(bytes(c) for c in PALETTE)
    trns = bytes([0, 255, 255, 255])  # palette entry 0 fully transparent
    path = tmp_path / "indexed_trns.png"
    path.write_bytes(_png(16, 12, 8, 3, (bytes(r.astype(np.uint8)) for r in idx), [(b"PLTE", plte), (b"tRNS", trns)]))
    expected = np.array(PALETTE, np.uint8)[idx]
    expected[idx == 0] = 0
    np.testing.assert_array_equal(load_image(path).rgb, expected)


def test_gray8_png_and_jpeg_files_are_replicated(tmp_path):
    gray = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (10, 1))  # 10 x 16
    png, jpg = tmp_path / "g.png", tmp_path / "g.jpg"
    cv2.imwrite(str(png), gray)
    cv2.imwrite(str(jpg), gray, [cv2.IMWRITE_JPEG_QUALITY, 100])
    rgb = load_image(png).rgb
    assert rgb.shape == (10, 16, 3)
    np.testing.assert_array_equal(rgb, np.repeat(gray[:, :, None], 3, axis=2))
    rgb = load_image(jpg).rgb
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(int) - gray).max() <= 3


def test_rgb16_png_is_scaled_and_in_rgb_order(tmp_path):
    bgr16 = np.zeros((9, 9, 3), np.uint16)
    bgr16[...] = (257 * 10, 257 * 20, 65535)  # B, G, R
    path = tmp_path / "c16.png"
    cv2.imwrite(str(path), bgr16)
    assert (load_image(path).rgb == [255, 20, 10]).all()


def test_gray_alpha_png_is_composited(tmp_path):
    from PIL import Image as PILImage

    la = np.zeros((10, 10, 2), np.uint8)
    la[..., 0] = 200
    la[:5, :, 1] = 255  # top half opaque
    path = tmp_path / "la.png"
    PILImage.fromarray(la, "LA").save(path)
    rgb = load_image(path).rgb
    assert (rgb[:5] == 200).all() and (rgb[5:] == 0).all()


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    from PIL import Image as PILImage

    # C, M, Y, K patches -> red, green, blue, white, black, mid grey
    cmyk = [(0, 255, 255, 0), (255, 0, 255, 0), (255, 255, 0, 0), (0, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128)]
    rgb_expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (127, 127, 127)]
    a = np.zeros((16, 16 * len(cmyk), 4), np.uint8)
    for i, c in enumerate(cmyk):
        a[:, 16 * i:16 * (i + 1)] = c
    path = tmp_path / "cmyk.jpg"
    PILImage.fromarray(a, "CMYK").save(path, "JPEG", quality=95)
    assert PILImage.open(path).mode == "CMYK"  # really a 4-component JPEG
    rgb = load_image(path).rgb
    assert rgb.shape == (16, 16 * len(cmyk), 3)
    for i, want in enumerate(rgb_expected):
        got = rgb[8, 16 * i + 8].astype(int)
        assert np.abs(got - want).max() <= 4, (i, got.tolist(), want)


def test_one_pixel_image_is_refused(tmp_path):
    path = tmp_path / "dot.png"
    cv2.imwrite(str(path), np.full((1, 1, 3), 255, np.uint8))
    with pytest.raises(ImageError, match=r"dot\.png: image is 1x1, smaller than the minimum 8 px per side"):
        load_image(path)


def _forbid_decoding(monkeypatch):
    def imdecode(*args, **kwargs):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(cv2, "imdecode", imdecode)


@pytest.fixture(scope="module")
def png_bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_blank_1bit_png(30000, 30000))
    return path


def test_decompression_bomb_png_is_refused_from_its_header(png_bomb, monkeypatch):
    assert png_bomb.stat().st_size < 200_000  # 9e8 pixels in ~110 KB
    _forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match=r"bomb\.png: image is 30000x30000, over the limit of 100000000 pixels"):
        load_image(png_bomb)


def test_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "k.png"
    path.write_bytes(_blank_1bit_png(1000, 1000))
    assert load_image(path, max_pixels=1_000_000).rgb.shape == (1000, 1000, 3)
    _forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match=r"k\.png: image is 1000x1000, over the limit of 999999 pixels"):
        load_image(path, max_pixels=999_999)


def test_jpeg_claiming_huge_size_is_refused_from_its_header(tmp_path, monkeypatch):
    data = bytearray(cv2.imencode(".jpg", _red_bgr())[1].tobytes())
    sof = data.index(b"\xff\xc0")
    assert struct.unpack_from(">HH", data, sof + 5) == (20, 30)
    struct.pack_into(">HH", data, sof + 5, 60000, 50000)
    path = tmp_path / "huge.jpg"
    path.write_bytes(bytes(data))
    _forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match=r"huge\.jpg: image is 50000x60000, over the limit"):
        load_image(path)


def test_over_opencvs_own_limit_is_an_image_error_not_cv2_error(tmp_path):
    path = tmp_path / "vast.png"  # 1.6e9 pixels: past OpenCV's default cap of 2**30
    path.write_bytes(_blank_1bit_png(40000, 40000))
    with pytest.raises(ImageError, match=r"^\S*vast\.png: not a readable image \(OpenCV: .*\)$"):
        load_image(path, max_pixels=2_000_000_000)


def _encodings():
    """(name, bytes) of one 20 x 30 picture in every format whose header is read before decoding."""
    from PIL import Image as PILImage

    bgr = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = [(ext, cv2.imencode(ext, bgr)[1].tobytes()) for ext in (".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm", ".gif", ".sr")]
    out.append((".pgm", cv2.imencode(".pgm", bgr[..., 0])[1].tobytes()))
    out.append((".pbm", cv2.imencode(".pbm", bgr[..., 0])[1].tobytes()))
    out.append((".pfm", cv2.imencode(".pfm", bgr.astype(np.float32) / 255)[1].tobytes()))
    out.append(("lossy.webp", cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 80])[1].tobytes()))
    out.append(("progressive.jpg", cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()))
    exif = PILImage.Exif()
    exif[0x010F] = "camera maker"
    rgb = PILImage.fromarray(bgr[..., ::-1])
    for name, image, fmt, kwargs in [
            ("pil-exif.jpg", rgb, "JPEG", {"exif": exif}),  # APP1 segment before the frame header
            ("pil-lzw.tif", rgb, "TIFF", {"compression": "tiff_lzw"}),
            ("pil-rgba.webp", rgb.convert("RGBA"), "WEBP", {"exif": exif}),  # extended (VP8X) WebP
            ("pil-bigtiff.tif", rgb, "TIFF", {"big_tiff": True}),
            ("pil.avif", rgb, "AVIF", {"quality": 100}),
            ("pil.jp2", rgb, "JPEG2000", {}),  # OpenJPEG through OpenCV refuses to encode one this small
            ("pil-big-endian-16bit.tif", PILImage.frombytes("I;16B", (30, 20), (bgr[..., 0].astype(">u2") * 257).tobytes()), "TIFF", {})]:
        buf = io.BytesIO()
        image.save(buf, fmt, **kwargs)
        out.append((name, buf.getvalue()))
    return out


ENCODINGS = [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm", ".gif", ".sr", "pil.jp2", ".pgm", ".pbm", ".pfm",
             "lossy.webp", "progressive.jpg", "pil-exif.jpg", "pil-lzw.tif", "pil-rgba.webp", "pil-bigtiff.tif",
             "pil.avif", "pil-big-endian-16bit.tif"]


@pytest.fixture(scope="module")
def encodings():
    return dict(_encodings())


def test_encodings_cover_the_header_readers(encodings):
    assert sorted(encodings) == sorted(ENCODINGS)
    assert encodings["pil-rgba.webp"][12:16] == b"VP8X" and encodings["lossy.webp"][12:16] == b"VP8 "
    assert encodings[".webp"][12:16] == b"VP8L" and encodings["pil-big-endian-16bit.tif"][:2] == b"MM"
    assert b"Exif" in encodings["pil-exif.jpg"]


@pytest.mark.parametrize("name", ENCODINGS)
def test_header_size_agrees_with_the_decoder(name, encodings):
    data = encodings[name]
    assert header_size(data) == (30, 20)
    assert decode(data, name).shape == (20, 30, 3)


@pytest.mark.parametrize("data", [
    b"\x00" * 64, bytes(range(256)), b"PK\x03\x04" + b"\0" * 60, b"%PDF-1.7\n" + b"x" * 60,
    b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", b"\xff\xd8", b"\xff\xd8\xff\xc0\x00\x11", b"\xff\xd8\xff",
    b"BM", b"BM" + b"\xff" * 30, b"GIF89a", b"RIFF\0\0\0\0WEBPVP8X", b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f",
    b"II*\0", b"II*\0\xff\xff\xff\xff", b"MM\0*\0\0\0\x08\x00\x01", b"P6\n", b"P6\n# comment only", b"P5 12 ",
    b"\x59\xa6\x6a\x95",
], ids=lambda d: repr(d[:12]))
def test_odd_bytes_give_one_line_image_errors(data):
    with pytest.raises(ImageError) as info:
        decode(data, "odd.bin")
    message = str(info.value)
    assert message.startswith("odd.bin: ") and "\n" not in message


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (see the monkeypatched test below)")
    path = tmp_path / "locked.png"
    cv2.imwrite(str(path), _red_bgr())
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match=r"locked\.png: cannot read \(Permission denied\)"):
            load_image(path)
    finally:
        path.chmod(0o600)


def test_permission_error_becomes_image_error(tmp_path, monkeypatch):
    import simsearch.images as images

    path = tmp_path / "locked.png"
    cv2.imwrite(str(path), _red_bgr())

    real_open = os.open

    def denied(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(images.os, "open", denied)
    with pytest.raises(ImageError, match=r"locked\.png: cannot read \(Permission denied\)"):
        load_image(path)


def test_control_characters_in_a_file_name_keep_the_message_on_one_line(tmp_path):
    path = tmp_path / "two\nlines.png"
    path.write_text("not an image")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "\n" not in str(info.value)
    assert "two\\nlines.png: not a readable image" in str(info.value)


def test_mixed_folder_images_are_decoded_and_other_files_skipped(tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    cv2.imwrite(str(folder / "good.png"), _red_bgr())
    cv2.imwrite(str(folder / "sub" / "gray.jpg"), np.full((10, 10), 90, np.uint8))
    (folder / "broken.png").write_text("not really a png")
    (folder / "notes.txt").write_text("hello")
    (folder / "Thumbs.db").write_bytes(b"\0" * 10)
    found, skipped = expand_paths([str(folder)])
    assert found == [str(folder / n) for n in ("broken.png", "good.png", "sub/gray.jpg")]
    assert skipped == [(str(folder / "Thumbs.db"), "not an image file name"),
                       (str(folder / "notes.txt"), "not an image file name")]
    assert load_image(found[1]).rgb.shape == (20, 30, 3)
    assert load_image(found[2]).rgb.shape == (10, 10, 3)
    with pytest.raises(ImageError, match=r"broken\.png: not a readable image"):
        load_image(found[0])


def test_pixel_limit_is_settable_from_the_environment(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "square.png"
    cv2.imwrite(str(path), np.zeros((100, 100), np.uint8))
    code = ("import sys\nfrom simsearch.images import ImageError, load_image\n"
            f"try:\n    load_image({str(path)!r})\nexcept ImageError as exc:\n    print(exc)\n    sys.exit(3)\n")
    limited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "SIMSEARCH_MAX_PIXELS": "9999"})
    assert limited.returncode == 3 and "over the limit of 9999 pixels" in limited.stdout
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert default.returncode == 0, default.stdout + default.stderr


def test_read_ahead_keeps_order_hands_back_errors_and_can_stop_early():
    from simsearch.images import read_ahead

    def load(n):
        if n == 3:
            raise ImageError(f"{n}: bad")
        return n * 10

    out = list(read_ahead(range(7), load, depth=2))
    assert [item for item, _, _ in out] == list(range(7))
    assert [value for _, value, _ in out] == [0, 10, 20, None, 40, 50, 60]
    assert isinstance(out[3][2], ImageError) and all(e is None for i, _, e in out if i != 3)
    stream = read_ahead(range(100), load, depth=3)
    assert next(stream) == (0, 0, None)
    stream.close()  # stopping early cancels what was read ahead
