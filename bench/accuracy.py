"""Accuracy benchmark: every method on every category of the shared datasets -> docs/benchmarks.md.

    .venv/bin/python bench/accuracy.py                       # all methods, both datasets
    .venv/bin/python bench/accuracy.py --methods patchcore --datasets piped

Each (method, dataset, category) result is cached as JSON under bench/.cache/accuracy/, so a run that is
cut off resumes where it stopped; delete the cache (or pass --fresh) to measure again. The markdown is
rewritten from whatever the cache holds after every category.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / "bench" / ".cache" / "accuracy"
OUT = ROOT / "docs" / "benchmarks.md"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold", "best_f1", "fpr_good")
HEADERS = ("image AUROC", "pixel AUROC", "AUPRO@0.3", "F1@thr", "best F1", "FPR good (target 0.01)")


def cache_file(method: str, dataset: str, category: str) -> Path:
    return CACHE / method / dataset / f"{category}.json"


def run_missing(methods: list[str], datasets: list[str], fresh: bool) -> None:
    from simsearch.evaluation.datasets import category_names, load_category
    from simsearch.evaluation.runner import evaluate_category

    for dataset in datasets:
        root = DATASETS / dataset
        for method in methods:
            for name in category_names(root):
                path = cache_file(method, dataset, name)
                if path.exists() and not fresh:
                    continue
                start = time.perf_counter()
                result = evaluate_category(load_category(root, name), method=method)
                record = result.to_dict() | {"dataset": dataset, "wall_seconds": round(time.perf_counter() - start, 1)}
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1))
                os.replace(tmp, path)
                print(f"{dataset}/{name} {method}: image AUROC {record['image_auroc']} "
                      f"({record['wall_seconds']} s)", flush=True)
                write_markdown()


def _mean(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.4f}" if values else "-"


def write_markdown() -> None:
    records = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*/*/*.json"))]
    lines = ["# Benchmarks", "",
             f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, no GPU; Python {platform.python_version()}.",
             "Command: `.venv/bin/python bench/accuracy.py` (resumable; per-category results cached in "
             "`bench/.cache/accuracy/`). Every method sees the same images; thresholds come from k-fold "
             "cross-scoring of train/good (5 folds), never from test. Means are over categories.", ""]
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]
        lines += [f"## {dataset}", "", "| method | categories | " + " | ".join(HEADERS) + " | run time |",
                  "|---|---|" + "---|" * len(HEADERS) + "---|"]
        for method in sorted({r["method"] for r in rows}, key=lambda m: (m != "patchcore", m)):
            mine = [r for r in rows if r["method"] == method]
            cells = [_mean([r[m] for r in mine]) for m in METRICS]
            seconds = sum(r["wall_seconds"] for r in mine)
            lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + f" | {seconds / 60:.1f} min |")
        categories = sorted({r["category"] for r in rows})
        if len(categories) > 1:
            methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "patchcore", m))
            lines += ["", "Image AUROC per category:", "", "| category | " + " | ".join(methods) + " |",
                      "|---|" + "---|" * len(methods)]
            by = {(r["method"], r["category"]): r for r in rows}
            for c in categories:
                lines.append(f"| {c} | " + " | ".join(
                    f"{by[(m, c)]['image_auroc']:.4f}" if (m, c) in by and by[(m, c)]["image_auroc"] is not None
                    else "-" for m in methods) + " |")
        lines.append("")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")


def main() -> None:
    from simsearch.evaluation.runner import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--datasets", nargs="+", default=["piped", "magnetic_tile"])
    parser.add_argument("--fresh", action="store_true", help="measure again even where a cached result exists")
    args = parser.parse_args()
    run_missing(args.methods, args.datasets, args.fresh)
    write_markdown()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
