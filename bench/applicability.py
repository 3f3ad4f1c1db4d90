"""The applicability check (simsearch/applicability.py) measured on the dev sets: how many of each category's
own test images (good and defective) it calls foreign (target: none), and how many foreign images it catches
(target: all): every image of the other dev sets and grey copies
of the category's test images where its parts are in colour; and, for information, a sample of the same
dev set's other categories (related products: no target).

    .venv/bin/python bench/applicability.py            # embed what is not cached, then the table
    .venv/bin/python bench/applicability.py --report   # the table from the cache only

The limits are fitted as `calibrate --folds 5` fits them (each train/good image's pooled distance to the
train images outside its fold; colour and aspect of every train image), by the same functions; each image
is embedded once by the default embedder (pooled vector, chroma, aspect cached in
bench/.cache/applicability/<dataset>.npz).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / "bench" / ".cache" / "applicability"
DATASETS = {"piped": DATA / "piped", "magnetic_tile": DATA / "magnetic_tile", "mvtec3d_tire": DATA / "mvtec3d_tire"}
FOREIGN_SAMPLE = 160  # images drawn from the same dev set's other categories
FOLDS = 5


def grey(rgb: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def embed_dataset(name: str, engine) -> dict:
    """Every image of a dev set -> pooled vectors and stats (and those of the grey copies of test images)."""
    from simsearch.applicability import image_stats
    from simsearch.evaluation.datasets import category_names, load_category
    from simsearch.images import load_image
    from simsearch.ingest import pooled_vector

    path = CACHE / f"{name}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return {k: z[k] for k in z.files}
    rows = {"category": [], "split": [], "label": [], "grey_copy": [], "pooled": [], "chroma": [], "aspect": []}

    def put(cat, split, label, is_grey, rgb):
        img = load_image(rgb)
        rows["category"].append(cat)
        rows["split"].append(split)
        rows["label"].append(label)
        rows["grey_copy"].append(is_grey)
        rows["pooled"].append(pooled_vector(engine.embedder.embed(img)))
        stats = image_stats(img.rgb)
        rows["chroma"].append(stats["chroma"])
        rows["aspect"].append(stats["aspect"])

    for cat_name in category_names(DATASETS[name]):
        cat = load_category(DATASETS[name], cat_name)
        for p in cat.train:
            put(cat_name, "train", 0, False, load_image(str(p)).rgb)
        for s in cat.test:
            rgb = load_image(str(s.path)).rgb
            put(cat_name, "test", s.label, False, rgb)
            if s.label == 0:
                put(cat_name, "test", 0, True, grey(rgb))
        print(f"  {name}/{cat_name}: {len(rows['category'])} images embedded", file=sys.stderr, flush=True)
    out = {k: np.asarray(v) for k, v in rows.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def limits_for(train: dict):
    """applicability limits fitted on one category's train images, as `calibrate --folds 5 --fold-order
    interleaved` fits them (the order these figures were measured with)."""
    from simsearch.applicability import fit_limits, nearest_distances
    from simsearch.calibrator import fold_of

    pooled = train["pooled"]
    fold = fold_of(range(len(pooled)), FOLDS, "interleaved")
    distances = np.zeros(len(pooled))
    for f in range(FOLDS):
        distances[fold == f] = nearest_distances(pooled[fold == f], pooled[fold != f])
    stats = [{"chroma": c, "aspect": a} for c, a in zip(train["chroma"], train["aspect"])]
    return fit_limits(stats, list(distances))


def verdicts(limits: dict, rows: dict, references: np.ndarray) -> np.ndarray:
    """(n,) bool: foreign by the check."""
    from simsearch.applicability import judge, nearest_distances
    d = nearest_distances(rows["pooled"], references)
    return np.asarray([judge(limits, {"chroma": c, "aspect": a}, float(x)) is not None
                       for c, a, x in zip(rows["chroma"], rows["aspect"], d)])


def select(data: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in data.items()}


def measure(all_data: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for name, data in all_data.items():
        for cat in sorted(set(data["category"].tolist())):
            own = data["category"] == cat
            train = select(data, own & (data["split"] == "train"))
            limits = limits_for(train)
            test = own & (data["split"] == "test") & ~data["grey_copy"]
            flags = verdicts(limits, select(data, test), train["pooled"])
            labels = data["label"][test]
            row = {"dataset": name, "category": cat, "colour_bank": limits["colour_bank"],
                   "good_foreign": int(flags[labels == 0].sum()), "good_n": int((labels == 0).sum()),
                   "defect_foreign": int(flags[labels == 1].sum()), "defect_n": int((labels == 1).sum())}
            greys = own & data["grey_copy"]
            if limits["colour_bank"]:
                g = verdicts(limits, select(data, greys), train["pooled"])
                row.update(grey_caught=int(g.sum()), grey_n=int(len(g)))
            for other_name, other in all_data.items():
                pool = np.flatnonzero(~other["grey_copy"] & (other["category"] != cat))
                if other_name == name:
                    key = "same_set"
                else:
                    key = other_name
                # every image of the other dev sets; a sample of the same set's other categories
                pick = rng.choice(pool, min(FOREIGN_SAMPLE, len(pool)), replace=False) if key == "same_set" else pool
                f = verdicts(limits, select(other, np.isin(np.arange(len(other["category"])), pick)), train["pooled"])
                row[f"{key}_caught"], row[f"{key}_n"] = int(f.sum()), int(len(f))
            out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| dataset | category | own good called foreign | own defective called foreign | grey copies caught "
             "| other categories caught | other dev sets caught |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        others = [(k[:-7], r[k], r[k[:-7] + "_n"]) for k in r if k.endswith("_caught") and k not in
                  ("grey_caught", "same_set_caught")]
        lines.append(f"| {r['dataset']} | {r['category']} | {r['good_foreign']} / {r['good_n']} | "
                     f"{r['defect_foreign']} / {r['defect_n']} | "
                     + (f"{r['grey_caught']} / {r['grey_n']}" if "grey_n" in r else "- (grey parts)")
                     + f" | {r['same_set_caught']} / {r['same_set_n']} | "
                     + ", ".join(f"{k} {c} / {n}" for k, c, n in others) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only the table, from the cache")
    args = parser.parse_args()
    all_data = {}
    if args.report:
        for name in DATASETS:
            z = np.load(CACHE / f"{name}.npz", allow_pickle=False)
            all_data[name] = {k: z[k] for k in z.files}
    else:
        from simsearch import Engine
        with tempfile.TemporaryDirectory() as tmp, Engine.create(Path(tmp) / "index") as engine:
            for name in DATASETS:
                all_data[name] = embed_dataset(name, engine)
    rows = measure(all_data)
    (CACHE / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
