"""Score anomalib PatchCore runs (.npz from bench/anomalib_patchcore.py) with the project's own metrics.

Runs in the project's venv. Writes <stem>.json next to each .npz and prints one line per file.

    python bench/anomalib_metrics.py bench/.cache/anomalib/*/*/*.npz
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from simsearch.evaluation.metrics import aupro, image_auroc, pixel_auroc


def ground_truth_mask(image_path: Path, shape: tuple[int, int]) -> np.ndarray:
    """MVTec layout: test/<defect>/<stem>.* -> ground_truth/<defect>/<stem>_mask.png; good -> all False."""
    defect = image_path.parent.name
    if defect == "good":
        return np.zeros(shape, bool)
    mask_path = image_path.parents[2] / "ground_truth" / defect / f"{image_path.stem}_mask.png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise SystemExit(f"missing mask {mask_path}")
    return mask > 0


def score(npz_path: Path) -> dict:
    z = np.load(npz_path)  # no allow_pickle: every entry is a plain array
    paths = [Path(p) for p in z["paths"]]
    maps = [z[f"map_{i}"] for i in range(len(paths))]
    if not np.array_equal(z["labels"] == 1, [p.parent.name != "good" for p in paths]):
        raise SystemExit(f"{npz_path}: anomalib's labels disagree with the test folders")
    masks = [ground_truth_mask(p, m.shape) for p, m in zip(paths, maps)]
    return {
        "anomalib_version": str(z["anomalib_version"]),
        "norm": str(z["norm"]),
        "n_test": len(paths),
        "bank_size": int(z["bank_size"]),
        "image_auroc": image_auroc(z["labels"], z["scores"]),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro_0.3": aupro(masks, maps, max_fpr=0.3),
        "fit_seconds": float(z["fit_seconds"]),
        "predict_seconds": float(z["predict_seconds"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("npz", nargs="+", type=Path)
    for path in ap.parse_args().npz:
        result = score(path)
        path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731 - None when a class is absent
        print(f"{path}: image AUROC {fmt(result['image_auroc'])}, pixel AUROC {fmt(result['pixel_auroc'])}, "
              f"AUPRO@0.3 {fmt(result['aupro_0.3'])}, fit {result['fit_seconds']:.1f}s, "
              f"predict {result['predict_seconds']:.1f}s")


if __name__ == "__main__":
    main()
