"""Quick configuration sweep: one embedding pass per configuration, many scoring choices from it.

For choosing defaults faster than full `simsearch eval` runs: no threshold folds (AUROC and AUPRO
need none), optional subsampling of train and test, and every image-score top-k from one set of
patch scores. Results are proxies; the chosen configuration is then measured by bench/accuracy.py.
With no calibration, the border profile the engine's image score divides by (simsearch/borders.py) is learned
from every other training image scored against a bank of the rest (up to BORDER_IMAGES of them), a stand-in for
the calibration's folds.

    .venv/bin/python bench/sweep.py --dataset magnetic_tile --set short_side=128 --set layers=1,2 \
        --top-k 1 4 16 --train-every 2 --test-every 2

Each (configuration, dataset, category, subsampling) result is cached as JSON under bench/.cache/sweep/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / "bench" / ".cache" / "sweep"
GRIDS = ROOT / "bench" / ".cache" / "sweep_grids"


FLIPS = {"h": lambda rgb: rgb[:, ::-1], "v": lambda rgb: rgb[::-1], "hv": lambda rgb: rgb[::-1, ::-1]}


def append_brightness(weight: float) -> None:
    """Make every embedder append one channel to each cell: the cell's mean luminance (0-1) at the index scale,
    minus the image's median cell, times `weight` (a low-frequency cue the texture features are blind to)."""
    from simsearch.embedding import TileEmbedder
    from simsearch.tiling import resize_to_scale

    plain = TileEmbedder.embed

    def embed(self, image):
        grid = plain(self, image)
        hc, wc = grid.grid_shape
        rgb = resize_to_scale(image.rgb, self.config.scale_for(image.height, image.width), self.config.interpolation)
        lum = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        cells = cv2.resize(lum, (wc, hc), interpolation=cv2.INTER_AREA)
        extra = (weight * (cells - np.median(cells)))[..., None].astype(np.float32)
        grid.features = np.concatenate([grid.features, extra], axis=-1)
        return grid

    TileEmbedder.embed = embed


def parse_setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if value.lower() == "none":  # short_side=none: scale by the fixed factor `scale` instead
        return key, None
    if key == "layers":
        return key, tuple(int(v) for v in value.split(","))
    if key in ("short_side", "neighbourhood", "dims", "tile_size", "tile_stride", "context_margin", "k_neighbours",
               "image_top_k"):
        return key, int(value)
    if key in ("scale", "blur_sigma"):
        return key, float(value)
    return key, value


BORDER_IMAGES = 80


def learned_borders(bank: list[np.ndarray], kind: str, search) -> list[float] | None:
    """The border profile of every other bank grid [(Hc, Wc, D)] scored against a bank of the rest."""
    from simsearch.borders import border_profile
    from simsearch.store.vectors import VectorIndex

    if search.border_discount == 0 or len(bank) < 2:
        return None
    half = VectorIndex.from_vectors(kind, np.concatenate([b.reshape(-1, b.shape[-1]) for b in bank[::2]]))
    grids = [half.search(b.reshape(-1, b.shape[-1]), 1)[0][:, 0].reshape(b.shape[:2]) for b in bank[1::2][:BORDER_IMAGES]]
    return border_profile(grids)


def sweep_category(category, settings: dict, top_ks: list[int], train_every: int, test_every: int,
                   kind: str = "flat", blurs: list[float] | None = None,
                   top_fractions: list[float] | None = None, density: bool = False,
                   save_to: Path | None = None, flips: tuple[str, ...] = ()) -> dict:
    from simsearch.engine import Engine
    from simsearch.evaluation import metrics
    from simsearch.evaluation.datasets import load_mask
    from simsearch.images import load_image
    from simsearch.scoring import anomaly_map, discounted, image_score, score_grid
    from simsearch.store.vectors import VectorIndex

    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.create(Path(tmp) / "index", **settings)
        embedder, config = engine.embedder, engine.config
        start = time.perf_counter()
        train = [load_image(p) for p in category.train[::train_every]]
        # Flipped copies of the good images (`--flip-bank`): more looks of the same surface in the bank.
        flipped = [load_image(np.ascontiguousarray(FLIPS[f](im.rgb))) for f in flips for im in train]
        bank = [embedder.embed(im).features for im in train + flipped]
        vectors = np.concatenate([b.reshape(-1, b.shape[-1]) for b in bank]).astype(np.float32)
        index = VectorIndex.from_vectors(kind, vectors)
        profile = learned_borders([b.astype(np.float32) for b in bank], kind, config.search)
        seconds["build"] = time.perf_counter() - start
        start = time.perf_counter()
        samples = category.test[::test_every]
        labels, grids, maps, masks = [], [], [], []
        raw_maps = []  # patch scores and layouts, for the other blur sigmas
        spreads = []
        engine_scores = []  # the engine's image scores (discounted top-k), for --save-grids
        for sample in samples:
            image = load_image(sample.path)
            grid = embedder.embed(image)
            hc, wc = grid.grid_shape
            scored = score_grid(index, grid, config.search, border_profile=profile)  # the engine's scoring chain
            scores, amap = scored.scores, scored.anomaly_map
            if density:
                # How sparse the bank is around each patch's nearest reference (VectorIndex.spread): a match in
                # a sparse part of the bank (a rare but good look) counts for less below.
                spreads.append((index.spread(scored.nearest_ids.ravel()).reshape(hc, wc), grid.layout, image.height,
                                image.width))
            if blurs:
                raw_maps.append((scores, grid.layout, image.height, image.width))
            labels.append(sample.label)
            engine_scores.append(scored.score)
            grids.append(scores)
            maps.append(amap)
            masks.append(load_mask(sample, amap.shape))
        seconds["test"] = time.perf_counter() - start
        if save_to is not None:  # per-image results, so that score ensembles can be measured offline
            save_to.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(save_to, labels=np.asarray(labels), scores=np.asarray(engine_scores, np.float32),
                                typical=np.float32(index.typical_spread()),
                                **{f"map{i}": m.astype(np.float16) for i, m in enumerate(maps)},
                                **{f"mask{i}": np.asarray(m, np.uint8) for i, m in enumerate(masks)})
        engine.close()
    labels = np.asarray(labels)
    row = {"n_bank": int(len(vectors)), "n_test": len(samples),
           "image_auroc_engine": metrics.image_auroc(labels, np.asarray(engine_scores)),
           "seconds": {k: round(v, 1) for k, v in seconds.items()},
           "pixel_auroc": metrics.pixel_auroc(masks, maps) if category.has_masks else None,
           "aupro": metrics.aupro(masks, maps, max_fpr=0.3) if category.has_masks else None}
    for sigma in blurs or []:  # the map's Gaussian sigma (px at the index scale) changes pixel metrics only
        blurred = [anomaly_map(g, layout, h, w, sigma) for g, layout, h, w in raw_maps]
        row[f"pixel_auroc_blur{sigma:g}"] = metrics.pixel_auroc(masks, blurred) if category.has_masks else None
        row[f"aupro_blur{sigma:g}"] = metrics.aupro(masks, blurred, max_fpr=0.3) if category.has_masks else None
    for k in top_ks:
        row[f"image_auroc_top{k}"] = metrics.image_auroc(labels, np.asarray([image_score(g, k) for g in grids]))
    if density:
        # The bank's typical spread, from a random sample of its vectors (the index's ids are positions): the
        # "clip" variants discount only spreads above a floor (rare looks count for less; common ones as before),
        # the "density" variant every spread (its tiny floor only scales all scores alike).
        sample = np.random.default_rng(0).choice(len(vectors), min(4000, len(vectors)), replace=False)
        typical = float(np.median(index.spread(sample)))
        row["typical_spread"] = typical
        variants = {"density": (1e-6, 1.0), "clip": (typical, 1.0), "clip-half": (typical, 0.5),
                    "clip2": (2 * typical, 1.0)}  # name: (floor, power)
        for name, (floor, power) in variants.items():
            relative = [discounted(g.ravel(), sp[0].ravel(), floor, power).reshape(g.shape)
                        for g, sp in zip(grids, spreads)]
            for k in top_ks:
                row[f"image_auroc_{name}_top{k}"] = metrics.image_auroc(labels, np.asarray(
                    [image_score(r, k) for r in relative]))
            if category.has_masks:
                rel_maps = [anomaly_map(r, layout, h, w, config.blur_sigma)
                            for r, (_, layout, h, w) in zip(relative, spreads)]
                row[f"pixel_auroc_{name}"] = metrics.pixel_auroc(masks, rel_maps)
                row[f"aupro_{name}"] = metrics.aupro(masks, rel_maps, max_fpr=0.3)
    for f in top_fractions or []:  # top-k as a share of the image's patches: adapts to its size
        row[f"image_auroc_frac{f:g}"] = metrics.image_auroc(labels, np.asarray(
            [image_score(g, max(1, round(f * g.size))) for g in grids]))
    # The smoothed map's maximum: neighbouring patches must agree, where top-k only counts them.
    row["image_auroc_mapmax"] = metrics.image_auroc(labels, np.asarray([m.max() for m in maps]))
    # The largest mean over a w x w window of patch scores: evidence from a neighbourhood, not one patch.
    for w in (2, 3, 5):
        row[f"image_auroc_box{w}"] = metrics.image_auroc(labels, np.asarray(
            [cv2.blur(g.astype(np.float32), (w, w), borderType=cv2.BORDER_REPLICATE).max() for g in grids]))
    return row


def write_section() -> None:
    """Means over categories of every completed sweep, as a `## Configuration sweep` section of docs/benchmarks.md."""
    from simsearch.evaluation.datasets import category_names

    out = ROOT / "docs" / "benchmarks.md"
    groups: dict[tuple, dict[str, dict]] = {}
    for path in sorted(CACHE.glob("*/*/*.json")):
        row = json.loads(path.read_text())
        if "run" in row:
            r = row["run"]
            group = groups.setdefault((r["dataset"], r["train_every"], r["test_every"], r["label"]), {})
            # One row per category: of two runs with other top-k lists, the one with more columns.
            if len(row) > len(group.get(r["category"], {})):
                group[r["category"]] = row
    n_categories = {d: len(category_names(DATASETS / d)) for d in {key[0] for key in groups}}
    columns = ["pixel_auroc", "aupro", "image_auroc_top1", "image_auroc_top4", "image_auroc_top16",
               "image_auroc_top64", "image_auroc_top256"]
    lines = ["## Configuration sweep", "",
             "`bench/sweep.py` (one embedding pass per configuration, every image-score choice from the same patch "
             "scores; no threshold folds; `+ivf-flat` rows search an IVF bank, which stayed within 0.008 image AUROC "
             "and 0.003 pixel AUROC / AUPRO of the exact bank where both ran). Means over categories; `topK` = image score as the mean of the K "
             "highest patch scores. Rows with train/4 use every 4th training image (a proxy; only comparable "
             "with each other). Command: `.venv/bin/python bench/sweep.py --dataset D --set FIELD=VALUE ... "
             "--top-k 1 4 16 64 256 [--kind ivf-flat] [--train-every N --test-every M]`; `--write` makes this table. "
             "Settings a row does not name are the defaults of its time: every row here was run with those "
             "before 2026-11-30 (native scale, neighbourhood 3); newer runs store their whole configuration.",
             "", "| dataset | train/test subsampling | configuration | categories | pixel AUROC | AUPRO@0.3 | "
             "top1 | top4 | top16 | top64 | top256 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, train_every, test_every, label), by_category in sorted(groups.items()):
        rows = list(by_category.values())
        if len(rows) < n_categories[dataset]:
            continue  # still running
        cells = []
        for c in columns:
            values = [r[c] for r in rows if r.get(c) is not None]
            cells.append(f"{np.mean(values):.4f}" if len(values) == len(rows) else "-")
        lines.append(f"| {dataset} | {train_every}/{test_every} | {label} | {len(rows)} | " + " | ".join(cells) + " |")
    # Runs with --density: image scores discounted where the nearest reference lies in a sparse part of the bank.
    variants = {"plain": ("image_auroc_top", "pixel_auroc", "aupro"),
                "clip-half": ("image_auroc_clip-half_top", "pixel_auroc_clip-half", "aupro_clip-half"),
                "clip": ("image_auroc_clip_top", "pixel_auroc_clip", "aupro_clip"),
                "clip2": ("image_auroc_clip2_top", "pixel_auroc_clip2", "aupro_clip2"),
                "density": ("image_auroc_density_top", "pixel_auroc_density", "aupro_density")}
    density_lines = []
    for (dataset, train_every, test_every, label), by_category in sorted(groups.items()):
        rows = list(by_category.values())
        if len(rows) < n_categories[dataset] or not all("image_auroc_clip-half_top16" in r for r in rows):
            continue
        for name, (image_key, pixel_key, aupro_key) in variants.items():
            cells = [f"{np.mean([r[image_key + str(k)] for r in rows]):.4f}" for k in (1, 16, 64, 256)]
            cells += [f"{np.mean([r[key] for r in rows]):.4f}" if all(r.get(key) is not None for r in rows) else "-"
                      for key in (pixel_key, aupro_key)]
            density_lines.append(f"| {dataset} | {label} | {name} | " + " | ".join(cells) + " |")
    if density_lines:
        lines += ["", "Scores discounted where the bank is sparse (`--density`): each patch score times "
                  "(floor / max(spread, floor)) ** power, where a spread is the mean distance from the "
                  "patch's nearest reference to that reference's 8 nearest references and the typical spread is "
                  "the median over 4,000 bank vectors. plain: no discount; clip-half: floor = typical, power 0.5; "
                  "clip: floor = typical, power 1; clip2: floor = 2 x typical, power 1; density: no floor, "
                  "power 1. Pixel columns: the map made from the discounted scores (the engine keeps the plain map).",
                  "", "| dataset | configuration | discount | top1 | top16 | top64 | top256 | pixel AUROC | "
                  "AUPRO@0.3 |", "|---|---|---|---|---|---|---|---|---|"] + density_lines
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    start = text.find("## Configuration sweep")
    if start >= 0:  # replace our section, keep whatever follows it
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    out.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote the sweep section of {out}")


def main() -> None:
    from simsearch.evaluation.datasets import category_names, load_category

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset")
    parser.add_argument("--write", action="store_true", help="only write the sweep section of docs/benchmarks.md")
    parser.add_argument("--categories", nargs="*")
    parser.add_argument("--set", action="append", default=[], help="IndexConfig field=value (layers=1,2)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--train-every", type=int, default=1)
    parser.add_argument("--test-every", type=int, default=1)
    parser.add_argument("--top-fraction", type=float, nargs="*", help="also image scores as the mean of this "
                        "share of the highest patch scores")
    parser.add_argument("--density", action="store_true", help="also image scores relative to the bank's local "
                        "density at each top patch's match")
    parser.add_argument("--blur", type=float, nargs="*", help="also pixel metrics at these map blur sigmas")
    parser.add_argument("--layer-neighbourhoods", help="one window per layer, e.g. 1,3 (overrides neighbourhood)")
    parser.add_argument("--concat-neighbourhoods", help="patch vectors at several windows side by side, e.g. 1,3")
    parser.add_argument("--save-grids", action="store_true", help="also keep each image's score and map under "
                        "bench/.cache/sweep_grids/ (for bench/ensemble.py)")
    parser.add_argument("--brightness", type=float, help="append each cell's luminance relative to the image's "
                        "median, times this weight, to its patch vector (an experiment)")
    parser.add_argument("--flip-bank", nargs="+", choices=sorted(FLIPS), default=[],
                        help="also put these flips of every train image in the bank")
    parser.add_argument("--kind", default="flat", help="bank index kind (ivf-flat makes big banks affordable)")
    args = parser.parse_args()
    if args.write:
        write_section()
        return
    if not args.dataset:
        parser.error("--dataset is required")
    settings = dict(parse_setting(s) for s in args.set)
    label = "+".join(args.set) or "default"
    if args.layer_neighbourhoods or args.concat_neighbourhoods:
        # these experiments patch the torch feature function, which an ONNX export would trace at other dimensions
        # than the configuration names: run them on the torch embedder
        os.environ["SIMSEARCH_RUNTIME"] = "torch"
    if args.layer_neighbourhoods:  # an experiment the configuration cannot express yet
        import simsearch.features as features
        windows, plain = tuple(int(w) for w in args.layer_neighbourhoods.split(",")), features.patch_features
        features.patch_features = lambda maps, neighbourhood, dims=None: plain(maps, windows, dims)
        settings["neighbourhood_per_layer"] = list(windows)  # for the cache key only
        label += f"+neighbourhoods={args.layer_neighbourhoods}"
    if args.concat_neighbourhoods:
        import torch
        import simsearch.features as features
        windows, plain = tuple(int(w) for w in args.concat_neighbourhoods.split(",")), features.patch_features
        features.patch_features = lambda maps, neighbourhood, dims=None: torch.cat(
            [plain(maps, w, dims) for w in windows], dim=-1)
        settings["neighbourhood_concat"] = list(windows)  # for the cache key only
        label += f"+concat={args.concat_neighbourhoods}"
    if args.brightness:
        append_brightness(args.brightness)
        settings["neighbourhood_brightness"] = args.brightness  # for the cache key only
        label += f"+brightness={args.brightness:g}"
    if args.flip_bank:
        settings["flip_bank"] = list(args.flip_bank)  # for the cache key only
        label += f"+flips={','.join(args.flip_bank)}"
    label += f"+{args.kind}" if args.kind != "flat" else ""
    root = DATASETS / args.dataset
    rows = {}
    # The settings a configuration takes (the rest only name the experiment in the cache key).
    config_settings = {k: v for k, v in settings.items() if not k.startswith(("neighbourhood_", "flip_"))}
    for name in args.categories or category_names(root):
        # The whole embedder configuration is in the key: a setting left out means whatever the default is now.
        from simsearch.config import IndexConfig
        embedder = IndexConfig(**({"short_side": None} if "scale" in config_settings else {}) | config_settings)
        key = json.dumps([settings, embedder.embedder_fields(), args.top_k, args.train_every, args.test_every]
                         + ([args.kind] if args.kind != "flat" else []) + ([args.blur] if args.blur else [])
                         + ([["fractions"] + args.top_fraction] if args.top_fraction else [])
                         + (["density-variants"] if args.density else [])
                         # the border profile came later: a key without it is a run without it
                         + ([["border", embedder.border_discount]] if embedder.border_discount else []),
                         sort_keys=True, default=list)
        path = CACHE / args.dataset / name / f"{label}.{hashlib.sha256(key.encode()).hexdigest()[:8]}.json"
        grids = GRIDS / path.relative_to(CACHE).with_suffix(".npz") if args.save_grids else None
        if path.exists() and (grids is None or grids.exists()):
            row = json.loads(path.read_text())
        else:
            row = sweep_category(load_category(root, name), config_settings, args.top_k, args.train_every,
                                 args.test_every, args.kind, args.blur, args.top_fraction,
                                 args.density, grids, tuple(args.flip_bank))
            row["run"] = {"dataset": args.dataset, "category": name, "label": label, "set": args.set,
                          "config": embedder.to_dict(),
                          "kind": args.kind, "train_every": args.train_every, "test_every": args.test_every}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=1))
        rows[name] = row
        print(name, label, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
              flush=True)
    keys = [k for k in next(iter(rows.values())) if k.startswith(("image", "pixel", "aupro"))]
    means = {k: round(float(np.mean([r[k] for r in rows.values() if r[k] is not None])), 4) for k in keys
             if any(r[k] is not None for r in rows.values())}
    print("MEAN", args.dataset, label, f"train/{args.train_every} test/{args.test_every}", json.dumps(means), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
