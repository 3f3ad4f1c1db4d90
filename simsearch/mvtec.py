"""The MVTec AD folder layout's conventions, shared by the evaluation and fine-tuning."""
from __future__ import annotations

from pathlib import Path


def mvtec_mask_path(image: str | Path) -> Path:
    """Where the MVTec layout keeps the mask of `<category>/test/<defect>/<name>`:
    `<category>/ground_truth/<defect>/<stem>_mask.png` (the file may not exist)."""
    image = Path(image)
    return image.parent.parent.parent / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
