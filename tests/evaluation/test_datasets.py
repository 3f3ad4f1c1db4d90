"""Reading the MVTec layout: categories, labels, optional masks."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from simsearch.evaluation.datasets import category_names, load_category, load_mask


def _img(path: Path, h: int = 16, w: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    for cat in ("alpha", "beta"):
        for i in range(3):
            _img(root / cat / "train" / "good" / f"{i:03d}.png")
        _img(root / cat / "test" / "good" / "000.png")
        _img(root / cat / "test" / "scratch" / "000.png")
        _img(root / cat / "test" / "scratch" / "001.png")
    mask = np.zeros((16, 20), np.uint8)
    mask[4:8, 5:9] = 255
    for stem in ("000", "001"):
        (root / "alpha" / "ground_truth" / "scratch").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "alpha" / "ground_truth" / "scratch" / f"{stem}_mask.png"), mask)
    (root / "alpha" / "train" / "good" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("a dataset")
    return root


def test_categories_are_folders_with_train_good(dataset):
    assert category_names(dataset) == ["alpha", "beta"]
    assert category_names(dataset / "beta") == ["beta"]
    with pytest.raises(ValueError, match="no MVTec-layout category"):
        category_names(dataset / "alpha" / "test")


def test_labels_defect_types_and_masks(dataset):
    alpha = load_category(dataset, "alpha")
    assert [p.name for p in alpha.train] == ["000.png", "001.png", "002.png"]  # notes.txt is not an image
    assert [(s.label, s.defect_type) for s in alpha.test] == [(0, "good"), (1, "scratch"), (1, "scratch")]
    assert alpha.has_masks
    mask = load_mask(alpha.test[1], (16, 20))
    assert mask.dtype == bool and mask.sum() == 16 and mask[4:8, 5:9].all()
    assert not load_mask(alpha.test[0], (16, 20)).any()
    with pytest.raises(ValueError, match="mask is"):
        load_mask(alpha.test[1], (20, 16))


def test_without_masks_pixel_metrics_are_not_possible(dataset):
    beta = load_category(dataset, "beta")
    assert not beta.has_masks
    assert all(s.mask_path is None for s in beta.test)
    with pytest.raises(ValueError, match="no train/good"):
        load_category(dataset, "gamma")
