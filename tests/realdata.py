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
