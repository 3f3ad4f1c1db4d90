"""Paths into the shared real datasets (read in place, never copied)."""
from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
PIPED = DATASETS / "piped" / "PA_BDP01_TL"

needs_piped = pytest.mark.skipif(not PIPED.is_dir(), reason=f"real data not found at {PIPED}")


def piped_train() -> list[Path]:
    return sorted((PIPED / "train" / "good").iterdir())


def piped_test(kind: str) -> list[Path]:
    return sorted((PIPED / "test" / kind).iterdir())


def piped_mask(image: Path) -> Path:
    return PIPED / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"


def tiny_category(root: Path, extra_defects: dict[str, slice] | None = None) -> Path:
    """An MVTec-layout slice of PA_BDP01_TL made of symlinks (the data is read in place, never copied): 8 train,
    2 good and 3 impurity test images with their masks. `extra_defects`: more defect folders, each named after
    a defect type and holding the impurity images (and masks) of that slice, for per-type figures."""
    category = root / "PA_BDP01_TL"
    picks = {"train/good": sorted((PIPED / "train" / "good").iterdir())[:8],
             "test/good": piped_test("good")[:2], "test/impurity": piped_test("impurity")[:3]}
    for kind, part in (extra_defects or {}).items():
        picks[f"test/{kind}"] = piped_test("impurity")[part]
    for folder, files in picks.items():
        (category / folder).mkdir(parents=True)
        for f in files:
            (category / folder / f.name).symlink_to(f)
        if folder.startswith("test/") and folder != "test/good":
            masks = category / "ground_truth" / folder.split("/", 1)[1]
            masks.mkdir(parents=True)
            for f in files:
                (masks / f"{f.stem}_mask.png").symlink_to(piped_mask(f))
    return root
