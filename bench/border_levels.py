"""The border profile's power (`border_discount`, simsearch/borders.py) through the whole eval: each category as
`simsearch eval` runs it (fresh index from train/good, 5 capture-order folds for the threshold and the profile,
every test image queried), once per power. Resumable: each (dataset, category, power) is cached as JSON in
bench/.cache/border_levels/.

    .venv/bin/python bench/border_levels.py --dataset piped --power 0 1 1.5 2

Power 0 is the image score without the border division (the defaults before 2026-12-03, with the discount's
256 candidates of now).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / "bench" / ".cache" / "border_levels"
FIELDS = ("image_auroc", "pixel_auroc", "aupro", "fpr_good", "expected_fpr", "f1_at_threshold", "best_f1")


def run(dataset: str, category: str, power: float) -> dict:
    from simsearch.evaluation.datasets import load_category
    from simsearch.evaluation.runner import evaluate_category

    path = CACHE / dataset / f"{category}.power{power:g}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate_category(load_category(DATASETS / dataset, category), settings={"border_discount": power})
    row = {k: getattr(result, k) for k in FIELDS} | {"n_test_good": result.n_test_good,
                                                     "false_alarms": result.confusion["fp"],
                                                     "border_profile": result.border_profile,
                                                     "seconds": result.seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def main() -> None:
    from simsearch.evaluation.datasets import category_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--power", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    args = parser.parse_args()
    for power in args.power:
        rows = {name: run(args.dataset, name, power) for name in category_names(DATASETS / args.dataset)}
        for name, row in rows.items():
            if row["image_auroc"] < 1:
                print(f"  {name} power {power:g}: image AUROC {row['image_auroc']:.4f}", flush=True)
        mean = {k: round(float(np.mean([r[k] for r in rows.values() if r[k] is not None])), 5)
                for k in ("image_auroc", "pixel_auroc", "aupro")}
        alarms = sum(r["false_alarms"] for r in rows.values())
        promised = sum(r["expected_fpr"] * r["n_test_good"] for r in rows.values())
        print(f"{args.dataset} power {power:g}: {json.dumps(mean)}, false alarms {alarms} / "
              f"{sum(r['n_test_good'] for r in rows.values())} (promised {promised:.2f})", flush=True)


if __name__ == "__main__":
    main()
