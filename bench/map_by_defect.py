"""Pixel AUROC of one saved sweep member per defect type (issue 22: where a dataset's pooled pixel AUROC goes),
from the maps `bench/sweep.py --save-grids` keeps; nothing is embedded again.

    .venv/bin/python bench/map_by_defect.py --dataset magnetic_tile --test-every 2 --member default+ivf-flat

For each defect type: its share of the defect pixels, the pixel AUROC over its images and every good one, and
over its images alone. `--test-every` must be the member's own test subsampling (the saved files hold labels,
not defect types).
"""
from __future__ import annotations

import argparse

import numpy as np

from ensemble import load, member_files
from sweep import DATASETS


def main() -> None:
    from simsearch.evaluation import metrics
    from simsearch.evaluation.datasets import load_category

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--member", action="append", required=True)
    parser.add_argument("--test-every", type=int, default=1)
    args = parser.parse_args()
    for label in args.member:
        for category, path in sorted(member_files(args.dataset, label).items()):
            saved = load(path)
            samples = load_category(DATASETS / args.dataset, category).test[::args.test_every]
            if len(samples) != len(saved["maps"]):
                raise SystemExit(f"{category}: {len(saved['maps'])} saved maps, {len(samples)} test images at "
                                 f"--test-every {args.test_every}")
            types = np.array([s.defect_type for s in samples])
            total = sum(int(m.sum()) for m in saved["masks"])
            print(f"{label} {category}: pixel AUROC {metrics.pixel_auroc(saved['masks'], saved['maps']):.4f}")
            for kind in sorted(set(types) - {"good"}):
                own = np.flatnonzero(types == kind)
                with_good = np.flatnonzero((types == kind) | (types == "good"))
                pixels = sum(int(saved["masks"][i].sum()) for i in own)

                def auroc(rows):
                    return metrics.pixel_auroc([saved["masks"][i] for i in rows], [saved["maps"][i] for i in rows])
                print(f"  {kind:12s} images {len(own):3d}  defect pixels {pixels / max(total, 1):6.1%}  "
                      f"with good {auroc(with_good):.4f}  alone {auroc(own):.4f}")


if __name__ == "__main__":
    main()
