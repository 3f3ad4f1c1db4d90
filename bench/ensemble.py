"""Score ensembles of sweep configurations, measured offline from the per-image results `bench/sweep.py
--save-grids` keeps (bench/.cache/sweep_grids/): no image is embedded or searched again.

Each member's image scores and maps are divided by its bank's typical spread (`VectorIndex.typical_spread`: the
median over bank vectors of the mean distance to their nearest good neighbours, a scale from the train images
alone, so no test image sets a weight), then combined by their mean (weighted with `--weight`) or max. Members
must come from runs with the same test subsampling.

    .venv/bin/python bench/ensemble.py --dataset piped --member default --member short_side=160+neighbourhood=3

A member is a sweep label (the file name before its hash); `--list` shows those kept for a dataset.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sweep import GRIDS, ROOT  # where sweep.py --save-grids writes

RESULTS = ROOT / "bench" / ".cache" / "ensemble.jsonl"


def label_of(path: Path) -> str:
    """`LABEL.HASH.npz` -> LABEL (a label may hold dots, as in blur=0.5)."""
    return path.name.rsplit(".", 2)[0]


def member_files(dataset: str, label: str) -> dict[str, Path]:
    """category -> the npz of sweep label `label` (the newest if several subsamplings were kept)."""
    out = {}
    for path in sorted(GRIDS.glob(f"{dataset}/*/{label}.*.npz"), key=lambda p: p.stat().st_mtime):
        if label_of(path) == label:
            out[path.parent.name] = path
    return out


def load(path: Path) -> dict:
    z = np.load(path)
    n = len(z["labels"])
    return {"labels": z["labels"], "scores": z["scores"].astype(np.float64), "typical": float(z["typical"]),
            "maps": [z[f"map{i}"].astype(np.float32) for i in range(n)],
            "masks": [z[f"mask{i}"].astype(bool) for i in range(n)]}


def combine(members: list[dict], how: str, weights: list[float] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Members of one category -> (image scores, maps), each member scaled by 1 / its typical spread; `weights`
    (one a member, mean only) make the mean a weighted one."""
    w = np.asarray(weights if weights else [1.0] * len(members), np.float64)
    w = w / w.sum()

    def reduce(stack: np.ndarray) -> np.ndarray:  # (members, ...) -> (...)
        return stack.max(axis=0) if how == "max" else np.tensordot(w, stack, axes=1)

    scores = reduce(np.stack([m["scores"] / m["typical"] for m in members]))
    maps = [reduce(np.stack([m["maps"][i] / m["typical"] for m in members])).astype(np.float32)
            for i in range(len(members[0]["maps"]))]
    return scores, maps


def evaluate(dataset: str, labels: list[str], how: str, weights: list[float] | None = None,
             center: bool = False) -> dict:
    """`center`: each combined map minus its own median (does a per-image offset hide the defects?)."""
    from simsearch.evaluation import metrics

    files = [member_files(dataset, label) for label in labels]
    categories = sorted(set.intersection(*(set(f) for f in files)))
    if not categories:
        raise SystemExit(f"no category has every member: {labels}")
    per = {}
    for category in categories:
        members = [load(f[category]) for f in files]
        for m in members[1:]:
            if not np.array_equal(m["labels"], members[0]["labels"]):
                raise SystemExit(f"{category}: members scored different test images")
        scores, maps = combine(members, how, weights)
        if center:
            maps = [m - np.median(m) for m in maps]
        y = members[0]["labels"]
        masks = members[0]["masks"]
        has_masks = any(mask.any() for mask in masks)
        per[category] = {"image_auroc": metrics.image_auroc(y, scores),
                         "pixel_auroc": metrics.pixel_auroc(masks, maps) if has_masks else None,
                         "aupro": metrics.aupro(masks, maps, max_fpr=0.3) if has_masks else None}
    mean = {k: float(np.mean([r[k] for r in per.values() if r[k] is not None]))
            for k in ("image_auroc", "pixel_auroc", "aupro") if any(r[k] is not None for r in per.values())}
    return {"dataset": dataset, "members": labels, "how": how, "weights": weights, "center": center,
            "categories": len(per), "mean": mean, "per_category": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--member", action="append", default=[])
    parser.add_argument("--how", choices=("mean", "max"), default="mean")
    parser.add_argument("--weight", type=float, action="append", help="one per --member, in order (mean only)")
    parser.add_argument("--center", action="store_true", help="each map minus its median before the pixel metrics")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for label in sorted({label_of(p) for p in GRIDS.glob(f"{args.dataset}/*/*.npz")}):
            print(label)
        return
    if args.weight and (len(args.weight) != len(args.member) or args.how != "mean"):
        raise SystemExit("give one --weight per --member, with --how mean")
    result = evaluate(args.dataset, args.member, args.how, args.weight, args.center)
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: result[k] for k in ("dataset", "members", "how", "weights", "center", "categories")}),
          {k: round(v, 4) for k, v in result["mean"].items()})


if __name__ == "__main__":
    main()
