"""Synthetic defects: each returns the altered image and a mask that is exactly the changed pixels."""
from __future__ import annotations

import numpy as np
import pytest

from simsearch.synthetic import KINDS, cutpaste, foreign_texture, perlin_blend, perlin_noise, random_defect, scratch


def textured(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A product-like image: a smooth gradient with fine noise, so that moved or blended pixels differ."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = 60 + 0.6 * xs + 0.4 * ys
    rgb = base[..., None] + np.array([0, 10, 20]) + rng.normal(0, 6, (height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


MAKERS = {
    "cutpaste": lambda img, rng: cutpaste(img, rng),
    "perlin": lambda img, rng: perlin_blend(img, textured(99), rng),
    "scratch": lambda img, rng: scratch(img, rng),
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("seed", range(6))
def test_mask_is_exactly_the_altered_pixels(kind, seed):
    image = textured(seed)
    before = image.copy()
    altered, mask = MAKERS[kind](image, np.random.default_rng(seed))
    np.testing.assert_array_equal(image, before)  # the input is not modified in place
    assert altered.shape == image.shape and altered.dtype == np.uint8
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    np.testing.assert_array_equal(mask, np.any(altered != image, axis=-1))
    assert 0 < mask.sum() < 0.9 * mask.size  # a local defect, not nothing and not the whole image


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_same_seed_same_defect_other_seed_other_defect(kind):
    image = textured(0)
    a, mask_a = MAKERS[kind](image, np.random.default_rng(7))
    b, mask_b = MAKERS[kind](image, np.random.default_rng(7))
    c, _ = MAKERS[kind](image, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(a, c)


def test_cutpaste_moves_a_rectangle_of_the_image():
    image = textured(1)
    _, mask = cutpaste(image, np.random.default_rng(3))
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert box.mean() > 0.9  # a (nearly) filled rectangle: only pixels that happen to match are left out


def test_perlin_noise_is_zero_on_the_lattice_and_bounded():
    noise = perlin_noise(64, 96, 4, 6, np.random.default_rng(0))
    assert noise.shape == (64, 96) and noise.dtype == np.float32
    # At a lattice corner the offset is zero, so the gradient noise is zero there.
    np.testing.assert_allclose(noise[::16, ::16], 0.0, atol=1e-6)
    assert np.abs(noise).max() <= 1.5 and noise.std() > 0.1
    np.testing.assert_array_equal(noise, perlin_noise(64, 96, 4, 6, np.random.default_rng(0)))


def test_foreign_texture_has_the_requested_size():
    texture = foreign_texture(textured(2), 40, 70, np.random.default_rng(0))
    assert texture.shape == (40, 70, 3) and texture.dtype == np.uint8


def test_random_defect_draws_only_the_kinds_asked_for():
    rng = np.random.default_rng(0)
    seen = {random_defect(textured(3), [textured(4)], rng, kinds=("scratch", "perlin"))[2] for _ in range(20)}
    assert seen == {"scratch", "perlin"}
    assert set(KINDS) == {"cutpaste", "perlin", "scratch"}
    with pytest.raises(ValueError, match="defect kinds"):
        random_defect(textured(3), [], rng, kinds=("blob",))


@pytest.mark.parametrize("bad", [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32),
                                 np.zeros((8, 8, 3), np.uint8)])
def test_bad_images_are_refused(bad):
    with pytest.raises(ValueError):
        cutpaste(bad, np.random.default_rng(0))
