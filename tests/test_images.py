"""simsearch.images: pixel normalisation, file decoding and path expansion."""
from __future__ import annotations

import hashlib
import os

import cv2
import numpy as np
import pytest

from simsearch.images import MIN_SIDE, Image, ImageError, decode, expand_paths, load_image, to_rgb8


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
