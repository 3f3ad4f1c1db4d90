"""False alarms under batch shift: the threshold from folds in capture order against interleaved folds.

    nohup .venv/bin/python bench/batch_shift.py > bench/.cache/batch_shift/run.log 2>&1 &
    .venv/bin/python bench/batch_shift.py --report          # print the table from the cache

Per category of each dev set: one index at the defaults from all of train/good (as `simsearch eval` builds it),
then `calibrate --folds 5` once per fold order, then every test image queried once; per order, the threshold,
what it promises (k / (n + 1)), the false alarms on test/good, F1 on the test set at that threshold and the
spread of the folds (calibrator.fold_spread). Pooled over a dataset's categories, the false alarms are set
against the issue's bound: 1.5 x the promised count + 2 images. Cached per category under
bench/.cache/batch_shift/, so a cut-off run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / "bench" / ".cache" / "batch_shift"
ORDERS = ("capture", "interleaved")
FOLDS = 5


def measure(dataset: str, name: str, orders: tuple[str, ...] = ORDERS, every: int = 1) -> dict:
    """`every` > 1: every n-th train/good and defective test image (all of test/good), for a set whose full run
    does not fit the session; the train images keep their capture order."""
    import dataclasses

    from simsearch import Engine
    from simsearch.evaluation import metrics
    from simsearch.evaluation.datasets import load_category

    category = load_category(DATASETS / dataset, name)
    if every > 1:
        defects = [s for s in category.test if s.label == 1][::every]
        category = dataclasses.replace(category, train=category.train[::every],
                                       test=[s for s in category.test if s.label == 0] + defects)
    out: dict = {"dataset": dataset, "category": name, "n_train": len(category.train), "every": every,
                 "orders": {}}
    with tempfile.TemporaryDirectory(prefix="batch-shift-") as tmp:
        start = time.perf_counter()
        engine = Engine.create(Path(tmp) / "index")
        engine.record_queries = False
        engine.add([str(p) for p in category.train])
        out["build_seconds"] = round(time.perf_counter() - start, 1)
        calibrations = {}
        for order in orders:
            start = time.perf_counter()
            cal = engine.calibrate(folds=FOLDS, fold_order=order)
            calibrations[order] = cal
            out["orders"][order] = {"threshold": cal.image_threshold, "expected_fpr": cal.expected_fpr,
                                    "fold_spread": cal.fold_spread,
                                    "seconds": round(time.perf_counter() - start, 1)}
        start = time.perf_counter()
        labels = np.asarray([s.label for s in category.test])
        scores = np.asarray([engine.query(str(s.path)).score for s in category.test])
        out["test_seconds"] = round(time.perf_counter() - start, 1)
        engine.close()
    out["n_test_good"], out["n_test_defect"] = int((labels == 0).sum()), int(labels.sum())
    out["image_auroc"] = metrics.image_auroc(labels, scores)
    for order, cal in calibrations.items():
        at = metrics.f1_at(labels, scores, cal.image_threshold)
        out["orders"][order].update(false_alarms=int(at["fp"]), missed=int(at["fn"]), f1=at["f1"])
    return out


def cached(dataset: str, name: str) -> Path:
    return CACHE / dataset / f"{name}.json"


def run(datasets: list[str], orders: dict[str, tuple[str, ...]], every: dict[str, int]) -> None:
    from simsearch.evaluation.datasets import category_names
    for dataset in datasets:
        for name in category_names(DATASETS / dataset):
            path = cached(dataset, name)
            if path.exists():
                continue
            record = measure(dataset, name, orders.get(dataset, ORDERS), every.get(dataset, 1))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
            os.replace(path.with_suffix(".tmp"), path)
            summary = ", ".join(f"{o} {r['false_alarms']}/{record['n_test_good']}" for o, r in record["orders"].items())
            print(f"{dataset}/{name}: false alarms {summary}", flush=True)


def report() -> list[str]:
    lines = ["| dev set | categories | fold order | false alarms on test/good | promised (sum of k/(n+1) x good) "
             "| bound (1.5 x promised + 2) | within | mean F1@thr | largest / smallest fold threshold (range over categories) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for folder in sorted(p for p in CACHE.iterdir() if p.is_dir()) if CACHE.exists() else []:
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        for order in ORDERS:
            if not all(order in r["orders"] for r in records):
                continue
            rows = [r["orders"][order] for r in records]
            alarms = sum(r["false_alarms"] for r in rows)
            goods = sum(r["n_test_good"] for r in records)
            promised = sum(o["expected_fpr"] * r["n_test_good"] for o, r in zip(rows, records))
            bound = 1.5 * promised + 2
            widths = [max(o["fold_spread"]["thresholds"]) / max(min(o["fold_spread"]["thresholds"]), 1e-9)
                      for o in rows]
            every = max(r.get("every", 1) for r in records)
            label = folder.name + (f" (every {every}th train/good and defect)" if every > 1 else "")
            lines.append(f"| {label} | {len(records)} | {order} | {alarms} / {goods} | {promised:.2f} | "
                         f"{bound:.2f} | {'yes' if alarms <= bound else 'no'} | "
                         f"{np.mean([o['f1'] for o in rows]):.4f} | {min(widths):.2f} to {max(widths):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["piped", "mvtec3d_tire", "magnetic_tile"])
    parser.add_argument("--only-capture", nargs="*", default=[], metavar="DATASET",
                        help="datasets measured in capture order alone (where the interleaved figures are known from "
                             "`simsearch eval --fold-order interleaved`, and the calibration dominates the run time)")
    parser.add_argument("--every", nargs="*", default=[], metavar="DATASET=N",
                        help="every N-th train/good and defective image of DATASET (all its test/good)")
    parser.add_argument("--report", action="store_true", help="only print the table from the cache")
    args = parser.parse_args()
    if not args.report:
        every = {d: int(n) for d, n in (item.split("=") for item in args.every)}
        run(args.datasets, {d: ("capture",) for d in args.only_capture}, every)
    print("\n".join(report()))


if __name__ == "__main__":
    sys.exit(main())
