"""MVTec-layout datasets, read as they are on disk.

    <root>/<category>/train/good/*                      defect-free images (the bank)
    <root>/<category>/test/good/*                       defect-free test images
    <root>/<category>/test/<defect>/*                   defective test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   optional masks (non-zero = defect)

`root` may also be a single category folder (one holding train/good itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import BadInput
from ..images import IMAGE_SUFFIXES
from ..mvtec import mvtec_mask_path


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" or the defect folder's name
    mask_path: Path | None  # None: good, or a defect without a mask file


@dataclass(frozen=True)
class Category:
    name: str
    root: Path
    train: list[Path]
    test: list[Sample]

    @property
    def has_masks(self) -> bool:
        """Pixel metrics need a mask for every defective image."""
        return all(s.mask_path is not None for s in self.test if s.label == 1) and any(s.label for s in self.test)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def category_names(root: str | Path) -> list[str]:
    root = Path(root)
    if (root / "train" / "good").is_dir():
        return [root.name]
    names = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not names:
        raise BadInput(f"{root}: no MVTec-layout category (a folder with train/good) found")
    return names


def load_category(root: str | Path, name: str) -> Category:
    root = Path(root)
    folder = root if (root / "train" / "good").is_dir() and root.name == name else root / name
    if not (folder / "train" / "good").is_dir():
        raise BadInput(f"{folder}: no train/good folder")
    if not (folder / "test").is_dir():
        raise BadInput(f"{folder}: no test folder")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in (folder / "test").iterdir() if p.is_dir()):
        kind = defect_dir.name
        for image in _images(defect_dir):
            if kind == "good":
                test.append(Sample(image, 0, kind, None))
                continue
            mask = mvtec_mask_path(image)
            test.append(Sample(image, 1, kind, mask if mask.is_file() else None))
    return Category(name=name, root=folder, train=_images(folder / "train" / "good"), test=test)


def load_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool defect mask at the image's resolution; all False for good images."""
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool)
    mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise BadInput(f"{sample.mask_path}: unreadable mask")
    if mask.shape != shape:
        raise BadInput(f"{sample.mask_path}: mask is {mask.shape[::-1]}, image is {shape[::-1]}")
    return mask > 0
