"""Fine-tuning benchmark: the frozen embedder against triplet- and softmax-trained heads, per category.

    .venv/bin/python bench/finetune.py                                   # every category of both dev sets
    .venv/bin/python bench/finetune.py --datasets piped --categories PA_BDP01_TL
    .venv/bin/python bench/finetune.py --report                          # only print the table from the cache

Each variant is `simsearch eval` of one category (bench/accuracy.py's protocol: a fresh index from all of
train/good, the threshold from 5-fold cross-scoring of train/good, every test image scored); the fine-tuned
variants first train a head on that category's train/good only (`evaluate_category(finetune=...)`), never
on a test image. Each (variant, dataset, category) result is cached as JSON under bench/.cache/finetune/,
so an interrupted run resumes where it stopped (`--fresh` measures again). Prints a markdown table of the
means (image AUROC, pixel AUROC, AUPRO@0.3, head training seconds) and one of image / pixel AUROC per
category, then the rule of issue 6: a head may become the default only if it improves both the mean image
AUROC and the mean pixel AUROC on both dev datasets.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's simsearch, whichever checkout the venv installed
DATASETS = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / "bench" / ".cache" / "finetune"
DEV_SETS = ("magnetic_tile", "piped")
LOSSES = ("triplet", "softmax")


def variant_names(losses: list[str], steps: int, seed: int) -> dict[str, dict | None]:
    """Variant label -> FinetuneSettings fields (None: the frozen embedder). The label names the steps and
    seed, so results of different training budgets never share a cache entry."""
    variants: dict[str, dict | None] = {"frozen": None}
    for loss in losses:
        variants[f"{loss}-s{steps}" + (f"-seed{seed}" if seed else "")] = {"loss": loss, "steps": steps, "seed": seed}
    return variants


def cache_file(variant: str, dataset: str, category: str) -> Path:
    return CACHE / variant / dataset / f"{category}.json"


def run_missing(datasets: list[str], categories: list[str] | None, variants: dict[str, dict | None],
                fresh: bool) -> None:
    from simsearch.evaluation.datasets import category_names, load_category
    from simsearch.evaluation.runner import evaluate_category
    from simsearch.finetune import FinetuneSettings

    for dataset in datasets:
        root = DATASETS / dataset
        names = category_names(root)
        unknown = sorted(set(categories or []) - set(names)) if len(datasets) == 1 else []
        if unknown:
            sys.exit(f"no such categories in {root}: {unknown}")
        for name in [n for n in names if not categories or n in categories]:
            for label, fields in variants.items():
                path = cache_file(label, dataset, name)
                if path.exists() and not fresh:
                    continue
                start = time.perf_counter()
                result = evaluate_category(load_category(root, name), method="patchcore",
                                           finetune=FinetuneSettings(**fields) if fields else None)
                record = result.to_dict() | {"dataset": dataset, "variant": label,
                                             "wall_seconds": round(time.perf_counter() - start, 1)}
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1))
                os.replace(tmp, path)
                print(f"{dataset}/{name} {label}: image AUROC {record['image_auroc']}, pixel AUROC "
                      f"{record['pixel_auroc']}, AUPRO {record['aupro']}, training "
                      f"{record['seconds'].get('finetune', 0):.1f} s ({record['wall_seconds']} s in all)", flush=True)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(datasets: list[str], categories: list[str] | None) -> list[str]:
    """Markdown from the cache: means per (dataset, variant), per-category AUROCs, the default rule."""
    from simsearch.evaluation.datasets import category_names

    records = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*/*/*.json"))]
    records = [r for r in records if r["dataset"] in datasets and (not categories or r["category"] in categories)]
    lines: list[str] = []
    means: dict[tuple[str, str], dict] = {}
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]
        variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "frozen", v))
        lines += [f"### {dataset}", "", "| variant | categories | image AUROC | pixel AUROC | AUPRO@0.3 | "
                  "training s / category | run time |", "|---|---|---|---|---|---|---|"]
        for variant in variants:
            mine = [r for r in rows if r["variant"] == variant]
            m = {k: _mean([r[k] for r in mine]) for k in ("image_auroc", "pixel_auroc", "aupro")}
            m["n"] = len(mine)
            means[(dataset, variant)] = m
            train = _mean([r["seconds"].get("finetune") for r in mine])
            lines.append(f"| {variant} | {len(mine)} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} | "
                         f"{_fmt(m['aupro'])} | {_fmt(train, 1)} | {sum(r['wall_seconds'] for r in mine) / 60:.1f} min |")
        cats = sorted({r["category"] for r in rows})
        if len(cats) > 1:
            by = {(r["variant"], r["category"]): r for r in rows}
            lines += ["", "Image AUROC / pixel AUROC per category:", "",
                      "| category | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
            for c in cats:
                lines.append(f"| {c} | " + " | ".join(
                    f"{_fmt(by[(v, c)]['image_auroc'])} / {_fmt(by[(v, c)]['pixel_auroc'])}" if (v, c) in by else "-"
                    for v in variants) + " |")
        lines.append("")
    for variant in sorted({v for _, v in means} - {"frozen"}):
        verdicts = []
        for dataset in DEV_SETS:
            ours, frozen = means.get((dataset, variant)), means.get((dataset, "frozen"))
            if ours is None or frozen is None or ours["n"] != frozen["n"]:
                verdicts.append(f"{dataset}: not measured on the same categories")
                continue
            better = all((ours[k] or 0) > (frozen[k] or 0) for k in ("image_auroc", "pixel_auroc"))
            total = len(category_names(DATASETS / dataset)) if (DATASETS / dataset).is_dir() else ours["n"]
            verdicts.append(f"{dataset}: {'better' if better else 'not better'} on both image and pixel AUROC "
                            f"({ours['n']} of {total} categories{'' if ours['n'] == total else ': partial'})")
        lines.append(f"- {variant}: " + "; ".join(verdicts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DEV_SETS), choices=DEV_SETS)
    parser.add_argument("--categories", nargs="+", help="only these categories (names as in the dataset folder)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--steps", type=int, default=200, help="training steps per head (default: the CLI's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="measure again even where a cached result exists")
    parser.add_argument("--report", action="store_true", help="only print the table from the cache")
    args = parser.parse_args()
    if not args.report:
        run_missing(args.datasets, args.categories, variant_names(args.losses, args.steps, args.seed), args.fresh)
    print("\n".join(report(args.datasets, args.categories)))


if __name__ == "__main__":
    main()
