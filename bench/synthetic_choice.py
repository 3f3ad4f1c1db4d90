"""Can good images alone choose between two configurations (issue 22)? Each configuration's index is built from
every 2nd train/good image; the other train/good images are its held-out goods, and synthetic defects pasted into
them (simsearch/synthetic.py: CutPaste, Perlin blends of another good image's texture, scratches) its defects.
Image AUROC and pixel AUROC on those are compared with the configurations' real test figures: if the synthetic
ranking of two configurations agrees with the real one on every dev set, an index could make the choice itself.

    .venv/bin/python bench/synthetic_choice.py --dataset piped --config default --config short_side=128,neighbourhood=3

Results are cached per (dataset, category, configuration) in bench/.cache/synthetic_choice/.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from sweep import DATASETS, ROOT, parse_setting

CACHE = ROOT / "bench" / ".cache" / "synthetic_choice"


def settings_of(label: str) -> dict:
    return {} if label == "default" else dict(parse_setting(s) for s in label.split(","))


def synthetic_set(held: list[Path], sources: list[Path], seed: int = 0):
    """Held-out good images -> [(rgb, mask)] goods (empty masks) and as many synthetic defects, one per image."""
    from simsearch.images import load_image
    from simsearch.synthetic import random_defect
    rng = np.random.default_rng(seed)
    textures = [load_image(p).rgb for p in sources[:8]]
    goods, defects = [], []
    for path in held:
        rgb = load_image(path).rgb
        goods.append((rgb, np.zeros(rgb.shape[:2], bool)))
        altered, mask, _ = random_defect(rgb, textures, rng)
        defects.append((altered, mask))
    return goods, defects


def measure(category, label: str, held_count: int) -> dict:
    from simsearch import Engine
    from simsearch.evaluation import metrics
    train = sorted(category.train)
    bank, held = train[0::2], train[1::2][:held_count]
    goods, defects = synthetic_set(held, bank)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.create(Path(tmp) / "index", **settings_of(label))
        engine.add([str(p) for p in bank])
        results = [engine.query(rgb) for rgb, _ in goods + defects]
        engine.close()
    labels = np.array([0] * len(goods) + [1] * len(defects))
    masks = [m for _, m in goods + defects]
    maps = [r.anomaly_map for r in results]
    return {"image_auroc": metrics.image_auroc(labels, np.array([r.score for r in results])),
            "pixel_auroc": metrics.pixel_auroc(masks, maps), "aupro": metrics.aupro(masks, maps, max_fpr=0.3),
            "bank_images": len(bank), "held_out": len(held)}


def main() -> None:
    from simsearch.evaluation.datasets import category_names, load_category
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--config", action="append", required=True,
                        help="'default' or comma-separated IndexConfig field=value settings")
    parser.add_argument("--held-out", type=int, default=40, help="held-out good images per category (at most)")
    args = parser.parse_args()
    root = DATASETS / args.dataset
    means: dict[str, list[dict]] = {}
    for name in category_names(root):
        category = load_category(root, name)
        for label in args.config:
            path = CACHE / args.dataset / name / f"{label}.{args.held_out}.json"
            if path.exists():
                row = json.loads(path.read_text())
            else:
                row = measure(category, label, args.held_out)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row))
            means.setdefault(label, []).append(row)
            print(name, label, json.dumps(row), flush=True)
    for label, rows in means.items():
        print("MEAN", args.dataset, label, json.dumps({k: round(float(np.mean([r[k] for r in rows])), 4)
                                                       for k in ("image_auroc", "pixel_auroc", "aupro")}), flush=True)


if __name__ == "__main__":
    main()
