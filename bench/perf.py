"""Speed, memory and approximation benchmarks of the engine on CPU (issue 4), resumable.

    nohup nice -n 10 .venv/bin/python bench/perf.py > bench/.cache/perf/run.log 2>&1 &
    .venv/bin/python bench/perf.py --steps tier-10k tier-100k      # only these (if not cached)
    .venv/bin/python bench/perf.py --report                          # print the cached results

Every step runs in a subprocess of its own (so its peak RSS is its own) and caches its result as
JSON under bench/.cache/perf/<step>.json; a cached step is skipped, so an interrupted run resumes.
Real patch vectors (tiers, latency, coreset) come from the `export` step: magnetic_tile train/good at the
defaults, as is and mirrored both ways, float16 .npy; query patches from every 20th magnetic_tile test image.
(Results of the earlier native-scale export are kept in bench/.cache/perf/native-scale/.)

Steps:
- forward-batch: the backbone alone, ms per tile at batch sizes 1-16 for 256 and 192 px tiles, with
  OMP_WAIT_POLICY=PASSIVE against libgomp's default, alternating subprocesses.
- embed-ab: images/s embedding 48 magnetic_tile train images with the code before the speed work (decode, then
  embed, one image at a time, up to 16 tiles per call, libgomp's default wait policy) against the
  working tree's (decoding read ahead in a thread, tiles batched across images by a pixel budget,
  OMP_WAIT_POLICY=PASSIVE), in alternating subprocesses, 3 rounds.
- build-before / build-after: `Engine.create` + `add` of magnetic_tile train/good (ivf-flat), the
  code before the speed work (BEFORE_REV, exported once to bench/.cache/perf/before-src) against the working tree:
  seconds and peak RSS.
- export: real vectors at the defaults (IndexConfig()) and query patches.
- tier-10k / tier-100k / tier-1m: per index kind on that many real vectors: build seconds, bytes per
  vector (the index's own), file size, recall@1 against exact and search time at several nprobe (hnsw: efSearch).
- latency-10k / latency-100k / latency-1m: query latency per image (warm, 2 threads, one image at a
  time, decoded image to result with its map; an index at the defaults with the tier's vectors as its bank)
  against the backbone forward alone on the same tiles, interleaved image by image.
- wait-policy: query latency on the 1m bank with OMP_WAIT_POLICY=PASSIVE against libgomp's default,
  alternating subprocesses.
- coreset: simsearch's greedy k-center against anomalib's KCenterGreedy (bench/kcenter_anomalib.py in
  bench/.venv-anomalib) on the same 100k real vectors, ratios 0.01 and 0.1.
- auroc: image AUROC (the engine's image score) with exact search against each approximate kind at its default
  search breadth: magnetic_tile (bank from every 2nd train image, every 3rd test image) and all 12 PIPED categories.
- build-vs-anomalib: Engine.create + add at the defaults (and with --coreset 0.01) against anomalib PatchCore's
  fit (same weights, coreset 0.01) on every 4th magnetic_tile train/good image, in one run.
- tier-10m: the auto kind on 10M synthetic vectors, built and saved block by block (resumable); recall@1 and
  search time of 1,000 queries.
- twostage-accuracy: exact search against the two-stage search (store/twostage.py) and the approximate kinds on the
  same banks: image AUROC, pixel AUROC, AUPRO, overlap of the final top-16 patches (Magnetic Tile subset as `auroc`,
  all 12 PIPED categories). latency-1m also times "two-stage/ivf-sq8" and "two-stage/hnsw" banks.
- twostage-build: build seconds and memory per vector of the two-stage search at 100k and 1M vectors.
- spread-table: the spread table a writer saves with each two-stage generation, at 1M and 2M real vectors:
  computed in full, saved, loaded, and extended after an add of 768 vectors; its spreads against exact ones.
- twostage-10m: build seconds and memory per vector of the two-stage parts over the tier-10m bank (after tier-10m).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
MTD = DATA / "magnetic_tile" / "magnetic_tile"
CACHE = ROOT / "bench" / ".cache" / "perf"
ANOMALIB_PY = ROOT / "bench" / ".venv-anomalib" / "bin" / "python"
TIERS = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
KINDS = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
NPROBES = (8, 16, 32, 64)  # IVF lists searched per query
EF_SEARCHES = (32, 64, 128, 256)  # hnsw's search breadth (efSearch)
# Both builds get the same explicit embedder, whatever config.py's defaults are at the time.
BUILD_SETTINGS = dict(scale=1.0, short_side=None, tile_size=256, tile_stride=192, neighbourhood=3,
                      index_kind="ivf-flat")
# "Before" for the A/B steps: the last commit before the speed work landed (it was HEAD when they were first run).
BEFORE_REV = "7f05de5"
STEPS = ("forward-batch", "embed-ab", "build-before", "build-after", "export", "tier-10k", "tier-100k", "tier-1m",
         "latency-10k", "latency-100k", "latency-1m", "wait-policy", "coreset", "auroc", "build-vs-anomalib",
         "tier-10m", "twostage-accuracy", "twostage-build", "spread-table",
         "twostage-10m")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_images() -> list[Path]:
    return sorted((MTD / "train" / "good").iterdir())


def test_images() -> list[Path]:
    return sorted(p for d in sorted((MTD / "test").iterdir()) for p in sorted(d.iterdir()))


def save(name: str, result: dict) -> None:
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    (CACHE / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result)[:2000], flush=True)


def embedder():
    from simsearch.backbones import build_backbone
    from simsearch.config import IndexConfig
    from simsearch.features import Embedder
    from simsearch.runtime import configure_threads
    config = IndexConfig(**{k: v for k, v in BUILD_SETTINGS.items() if k != "index_kind"}, feature_dim=152)
    configure_threads()
    return Embedder(config, build_backbone("tf_efficientnet_lite1", "embedded", config.layers))


def default_embedder():
    """The embedder of a fresh index at today's defaults (short side 192, strides 8 and 16, no averaging)."""
    from simsearch.backbones import build_backbone
    from simsearch.config import IndexConfig
    from simsearch.features import Embedder
    from simsearch.runtime import configure_threads
    config = IndexConfig(feature_dim=152)
    configure_threads()
    return Embedder(config, build_backbone(config.backbone, "embedded", config.layers))


# -- steps ------------------------------------------------------------------------------------------
def embed_only(images: int) -> dict:
    """images/s embedding magnetic_tile train images with whichever simsearch is on the path: the
    working tree reads ahead and batches across images; the code before decodes, then embeds, per image."""
    import simsearch
    from simsearch.backbones import build_backbone
    from simsearch.config import IndexConfig
    from simsearch.features import Embedder
    from simsearch.images import load_image
    config = IndexConfig(**{k: v for k, v in BUILD_SETTINGS.items() if k != "index_kind"}, feature_dim=152)
    emb = Embedder(config, build_backbone("tf_efficientnet_lite1", "embedded", config.layers))
    paths = train_images()[::16][:images]
    emb.embed(load_image(paths[0]))  # warm-up
    start = time.perf_counter()
    if hasattr(emb, "embed_many"):
        from simsearch.images import read_ahead
        from simsearch.runtime import configure_threads
        configure_threads()
        n = sum(1 for _ in emb.embed_many(img for _, img, _ in read_ahead(paths, load_image)))
    else:
        n = sum(1 for p in paths if emb.embed(load_image(p)) is not None)
    seconds = time.perf_counter() - start
    import torch
    return {"module": simsearch.__file__, "images": n, "images_per_s": n / seconds,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads()}


def forward_only(batches: list[int], tile: int) -> dict:
    """ms per tile of the backbone forward alone on 32 real (tile x tile) tiles at each batch size,
    3 interleaved rounds; the wait policy is whatever this process's environment says."""
    import torch
    from simsearch.images import load_image
    from simsearch.tiling import cut_tiles, plan_tiles
    emb = embedder()
    tiles = []
    for p in train_images()[:40]:
        img = load_image(p)
        t = cut_tiles(img.rgb, plan_tiles(img.height, img.width, 256, 192, 8, 32))
        if t.shape[1:3] == (256, 256):
            tiles.append(t[:, :tile, :tile])
    x = (torch.from_numpy(np.concatenate(tiles)[:32]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    x = x.contiguous(memory_format=torch.channels_last)
    ms = {b: [] for b in batches}
    with torch.inference_mode():
        emb.backbone.model(x[:2])
        for _ in range(3):
            for b in batches:
                start = time.perf_counter()
                for s in range(0, len(x), b):
                    emb.backbone.model(x[s:s + b])
                ms[b].append(1000 * (time.perf_counter() - start) / len(x))
    return {"tile": tile, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads(),
            "ms_per_tile_median": {str(b): float(np.median(v)) for b, v in ms.items()}}


def step_forward_batch() -> dict:
    """Backbone ms per tile by batch size and tile size, PASSIVE against libgomp's default wait policy,
    alternating subprocesses (2 rounds)."""
    runs = []
    for _ in range(2):
        for policy in ("PASSIVE", ""):  # "" is kept by simsearch's setdefault and ignored by libgomp
            for tile in (256, 192):
                env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": policy}
                proc = subprocess.run([sys.executable, __file__, "--forward-only", str(tile)], env=env,
                                      capture_output=True, text=True, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"runs": runs}


def step_embed_ab() -> dict:
    """The code before the speed work and the working tree's in alternating subprocesses (3 rounds), same images."""
    runs = {"before": [], "after": []}
    for _ in range(3):
        for code in runs:
            env = {**os.environ, "PYTHONPATH": str(before_source() if code == "before" else ROOT)}
            proc = subprocess.run([sys.executable, __file__, "--embed-only", "48"], env=env, capture_output=True,
                                  text=True, check=True)
            runs[code].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratios = [a["images_per_s"] / b["images_per_s"] for b, a in zip(runs["before"], runs["after"])]
    return {"runs": runs, "ratio_per_round": ratios, "median_ratio": float(np.median(ratios))}


def build(step: str) -> dict:
    """Run in a subprocess whose PYTHONPATH picks the code (before the speed work, or the working tree's)."""
    import shutil
    from simsearch import Engine
    index = CACHE / ("index" if step == "build-after" else "index-before")
    shutil.rmtree(index, ignore_errors=True)
    start = time.perf_counter()
    engine = Engine.create(index, **BUILD_SETTINGS)
    report = engine.add([str(MTD / "train" / "good")])
    seconds = time.perf_counter() - start
    info = engine.info()
    engine.close()
    if step == "build-before":
        shutil.rmtree(index, ignore_errors=True)
    import simsearch
    return {"module": simsearch.__file__, "seconds": seconds, "images": len(report.added), "vectors": report.vectors_added,
            "kind": info["bank_kind"], "code": step.split("-")[1], "images_per_s": len(report.added) / seconds}


def step_export() -> dict:
    """Real patch vectors at the defaults (IndexConfig()): magnetic_tile train/good as is and mirrored left-right
    and top-bottom (each a plausible good tile), for the 1m tier; queries from every 20th test image."""
    from simsearch.images import Image, load_image
    emb = default_embedder()

    def grids(paths, flip):
        for p in paths:
            rgb = load_image(p).rgb
            yield Image(rgb=np.ascontiguousarray(rgb if flip is None else cv2.flip(rgb, flip)), sha256="",
                        source=str(p))
    blocks = []
    for flip in (None, 1, 0):
        blocks += [g.features.reshape(-1, g.features.shape[-1]).astype(np.float16)
                   for g in emb.embed_many(grids(train_images(), flip))]
    bank = np.concatenate(blocks)
    np.save(CACHE / "bank.f16.npy", bank)
    files = test_images()[::20]
    patches = np.concatenate([g.features.reshape(-1, g.features.shape[-1]) for g in
                              emb.embed_many(load_image(p) for p in files)])
    pick = np.sort(np.random.default_rng(0).choice(len(patches), min(10_000, len(patches)), replace=False))
    np.save(CACHE / "queries.f16.npy", patches[pick].astype(np.float16))
    return {"config": "defaults", "bank_vectors": int(len(bank)), "train_images": len(train_images()),
            "views": ["as is", "left-right", "top-bottom"], "query_images": len(files), "query_patches": int(len(pick))}


def tier_vectors(tier: str) -> tuple[np.ndarray, np.ndarray]:
    bank = np.load(CACHE / "bank.f16.npy", mmap_mode="r")
    n = min(TIERS[tier], len(bank))
    pick = np.sort(np.random.default_rng(0).choice(len(bank), n, replace=False))
    return np.ascontiguousarray(bank[pick], dtype=np.float32), pick.astype(np.int64)


def bank_owners() -> np.ndarray:
    """(2,009,160,) int64: the image view (0 .. 3 x 761 - 1, views in `step_export`'s order) each row of
    bank.f16.npy came from, from the images' patch grids (their layouts, no forward); cached."""
    path = CACHE / "bank_owner.npy"
    if not path.exists():
        from simsearch.images import load_image
        from simsearch.tiling import plan_tiles, resize_to_scale
        from simsearch.config import IndexConfig
        config = IndexConfig(feature_dim=152)
        counts = []
        for p in train_images():
            img = load_image(p)
            rgb = resize_to_scale(img.rgb, config.scale_for(img.height, img.width), config.interpolation)
            layout = plan_tiles(rgb.shape[0], rgb.shape[1], config.tile_size, config.tile_stride, config.patch_stride,
                                config.context_margin)
            counts.append(int(np.prod(layout.grid_shape)))
        counts = np.asarray(counts * 3)  # the mirrored views have the same grids
        owner = np.repeat(np.arange(len(counts)), counts)
        bank = np.load(CACHE / "bank.f16.npy", mmap_mode="r")
        if len(owner) != len(bank):
            raise SystemExit(f"grids give {len(owner)} rows, the export holds {len(bank)}")
        np.save(path, owner)
    return np.load(path)


def tier_two_stage_parts(tier: str, ids: np.ndarray):
    """For a tier's bank (its (n,) ids = rows of bank.f16.npy): (n, 2) [id, image view] owners and the pooled-vector
    bank (a flat VectorIndex, one unit mean of each image view's exported patches, ids = view numbers)."""
    from simsearch.store.twostage import unit_mean
    from simsearch.store.vectors import VectorIndex
    owner = bank_owners()
    bank = np.load(CACHE / "bank.f16.npy", mmap_mode="r")
    bounds = np.searchsorted(owner, np.arange(owner[-1] + 2))
    pooled = np.stack([unit_mean(np.asarray(bank[a:b], np.float32)) for a, b in zip(bounds[:-1], bounds[1:])])
    return (np.stack([ids, owner[ids]], axis=1),
            VectorIndex.from_vectors("flat", pooled, np.arange(len(pooled), dtype=np.int64)))


def step_tier(tier: str) -> dict:
    from simsearch.config import IndexConfig
    from simsearch.runtime import configure_threads
    from simsearch.store.vectors import VectorIndex, choose_kind
    configure_threads()
    vectors, ids = tier_vectors(tier)
    queries = np.load(CACHE / "queries.f16.npy").astype(np.float32)
    out = {"vectors": int(len(vectors)), "queries": int(len(queries)), "auto_kind": choose_kind("auto", len(vectors)),
           "kinds": {}}
    exact_d = exact_i = None
    for kind in KINDS:
        start = time.perf_counter()
        index = VectorIndex.from_vectors(kind, vectors, ids)
        row = {"build_s": time.perf_counter() - start, "bytes_per_vector": index.bytes_per_vector(),
               "memory_bytes": index.memory_bytes()}
        with tempfile.TemporaryDirectory() as tmp:
            index.save(Path(tmp) / "bank.faiss")
            row["file_bytes"] = (Path(tmp) / "bank.faiss").stat().st_size
        row["file_bytes_per_vector"] = row["file_bytes"] / len(vectors)
        probes = {"flat": [None], "hnsw": EF_SEARCHES}.get(kind, NPROBES)
        row["search"] = {}
        for nprobe in probes:
            if nprobe:
                index.nprobe = nprobe
            start = time.perf_counter()
            d, i = index.search(queries, IndexConfig().k_neighbours)
            seconds = time.perf_counter() - start
            if kind == "flat":
                exact_d, exact_i = d[:, 0], i[:, 0]
            rec = {"search_s": seconds, "ms_per_1k_queries": 1000 * seconds / len(queries) * 1000,
                   "recall_at_1": float((i[:, 0] == exact_i).mean()),
                   "mean_distance_excess": float((d[:, 0] - exact_d).mean() / exact_d.mean())}
            row["search"][str(nprobe or "exact")] = rec
        if index.nlist is not None:
            row["nlist"] = index.nlist
        out["kinds"][kind] = row
        del index
    return out


def auto_label(n: int) -> str:
    """The row of the latency table that the defaults give a bank of `n` vectors: the kind `auto` builds, with a
    "two-stage/" prefix where SearchConfig.two_stage "auto" searches it in two stages."""
    from simsearch.store.vectors import choose_kind, uses_two_stage
    kind = choose_kind("auto", n)
    return f"two-stage/{kind}" if uses_two_stage("auto", n) else kind


def forward_then_query(engine, rgb: np.ndarray):
    """One latency sample: (seconds of the embedder's own tile forward alone, seconds of `engine.query(rgb)`,
    the query's result). The forward (torch: backbone + patch features; onnxruntime, the default where installed:
    the exported model, the same two) runs in the batches a query uses, just before the query."""
    from simsearch.features import tiles_per_batch
    from simsearch.images import Image
    emb = engine.embedder
    tiles, _ = emb.tiles_of(Image(rgb=rgb, sha256="", source="<array>"))
    step = tiles_per_batch(tiles.shape[1], tiles.shape[2])
    start = time.perf_counter()
    for s in range(0, len(tiles), step):
        emb._forward(tiles[s:s + step])
    forward = time.perf_counter() - start
    start = time.perf_counter()
    result = engine.query(rgb)
    return forward, time.perf_counter() - start, result


def latency(tier: str, kinds: list[str], images: int = 20) -> dict:
    """Query latency per image against the backbone forward alone, interleaved per image, on an index at the
    defaults whose bank is swapped for the tier's vectors (ids outside its catalog: no nearest-image rows).
    A kind "two-stage/K" is a TwoStageBank over the K bank (the tier's image views as its reference images); the
    other rows search their bank alone (two-stage off)."""
    import torch
    from simsearch import Engine
    from simsearch.images import Image, load_image
    from simsearch.runtime import configure_threads
    from simsearch.scoring import score_vectors
    from simsearch.store.banks import BankView
    from simsearch.store.twostage import TwoStageBank
    from simsearch.store.vectors import VectorIndex
    tmp = tempfile.TemporaryDirectory()
    engine = Engine.create(Path(tmp.name) / "index")
    engine.add([str(train_images()[0])])
    emb = engine.embedder
    configure_threads(2)
    committed = engine.banks.view()  # its patch bank is swapped below for the tier's
    vectors, ids = tier_vectors(tier)
    decoded = [load_image(p).rgb for p in test_images()[::29][:images]]
    out = {"tier": tier, "vectors": int(len(vectors)), "images": len(decoded), "auto": auto_label(len(vectors)),
           "threads": torch.get_num_threads(), "embedder_runtime": emb.runtime, "kinds": {}}
    bases, parts = {}, None
    for n, kind in enumerate(kinds):
        inner = kind.split("/", 1)[-1]
        row = {}
        if inner not in bases:
            start = time.perf_counter()
            bases[inner] = VectorIndex.from_vectors(inner, vectors, ids)
            row["build_s"] = time.perf_counter() - start
        bank = bases[inner]
        if kind.startswith("two-stage/"):
            if parts is None:
                parts = tier_two_stage_parts(tier, ids)
            start = time.perf_counter()
            bank = TwoStageBank.build(bank, parts[1], parts[0])
            row["two_stage_build_s"] = time.perf_counter() - start
            row["memory_bytes"] = bank.memory_bytes()
        engine.banks.two_stage = "off"  # the pinned bank is searched as it is
        engine.banks.pin(BankView(committed.generation, bank, committed.images))
        nprobe = bank.nprobe
        engine.query(decoded[0])  # warm
        forward, query, patches, refined = [], [], [], []
        for rgb in decoded:
            forward_s, query_s, result = forward_then_query(engine, rgb)
            forward.append(forward_s)
            query.append(query_s)
            assert result.anomaly_map.shape == rgb.shape[:2]
            grid = emb.embed(Image(rgb=rgb, sha256="", source="<array>"))
            patches.append(int(np.prod(grid.grid_shape)))
            if kind.startswith("two-stage/"):
                scored = score_vectors(bank, grid.features.reshape(patches[-1], -1), engine.config.search)
                refined.append(int(scored.refined.sum()))
        ratio = np.asarray(query) / np.asarray(forward)
        out["kinds"][kind] = {
            **row, "nprobe": nprobe, "patches_per_image_p50": float(np.median(patches)),
            "query_p50_ms": 1000 * float(np.percentile(query, 50)),
            "query_p95_ms": 1000 * float(np.percentile(query, 95)),
            "forward_p50_ms": 1000 * float(np.percentile(forward, 50)),
            "forward_p95_ms": 1000 * float(np.percentile(forward, 95)),
            "ratio_p50": float(np.median(ratio)), "ratio_of_p50s": float(np.median(query) / np.median(forward))}
        if refined:
            out["kinds"][kind].update(refined_p50=float(np.median(refined)), refined_max=int(max(refined)))
        print(kind, {k: round(v, 3) if isinstance(v, float) else v for k, v in out["kinds"][kind].items()}, flush=True)
        if all(k.split("/", 1)[-1] != inner for k in kinds[n + 1:]):
            del bases[inner]  # no later row uses it
    engine.close()
    tmp.cleanup()
    return out


def step_wait_policy() -> dict:
    """Alternating subprocesses, PASSIVE against libgomp's default, on the 1m tier's auto kind."""
    from simsearch.store.vectors import choose_kind
    kind = choose_kind("auto", TIERS["1m"])
    runs = {"PASSIVE": [], "default": []}
    for _ in range(2):
        for policy in runs:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            # An empty value is kept by simsearch's setdefault and ignored by libgomp: its default policy.
            env["OMP_WAIT_POLICY"] = "PASSIVE" if policy == "PASSIVE" else ""
            proc = subprocess.run([sys.executable, __file__, "--latency-only", "1m", kind, "--images", "12"],
                                  env=env, capture_output=True, text=True, check=True)
            runs[policy].append(json.loads(proc.stdout.strip().splitlines()[-1])["kinds"][kind])
    return {"kind": kind, "runs": runs,
            "query_p50_ms": {p: [r["query_p50_ms"] for r in v] for p, v in runs.items()},
            "forward_p50_ms": {p: [r["forward_p50_ms"] for r in v] for p, v in runs.items()}}


def step_coreset() -> dict:
    from simsearch.coreset import coverage_radius, select_coreset
    vectors, _ = tier_vectors("100k")
    path = CACHE / "coreset100k.f32.npy"
    np.save(path, vectors)
    out = {"vectors": int(len(vectors)), "dim": int(vectors.shape[1]), "ratios": {}}
    for ratio in (0.01, 0.1):
        start = time.perf_counter()
        picked = select_coreset(vectors, ratio=ratio)
        ours = time.perf_counter() - start
        proc = subprocess.run([str(ANOMALIB_PY), str(ROOT / "bench" / "kcenter_anomalib.py"), str(path), str(ratio)],
                              capture_output=True, text=True, check=True)
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        out["ratios"][str(ratio)] = {
            "simsearch_s": ours, "anomalib_s": theirs["seconds"], "speedup": theirs["seconds"] / ours,
            "selected": int(len(picked.indices)), "anomalib_selected": theirs["selected"],
            "simsearch_radius": coverage_radius(vectors, picked.indices),
            "anomalib_radius": coverage_radius(vectors, np.asarray(theirs["indices"])),
            "anomalib_threads": theirs["threads"]}
    path.unlink()
    return out


def step_auroc() -> dict:
    """Image AUROC with exact search against each approximate kind at its default nprobe, image score as the
    engine computes it (scoring.score_candidates and candidates_score at the defaults)."""
    from simsearch.config import IndexConfig
    from simsearch.evaluation.datasets import category_names, load_category
    from simsearch.evaluation.metrics import image_auroc
    from simsearch.images import load_image
    from simsearch.scoring import score_vectors
    from simsearch.store.vectors import VectorIndex, choose_kind
    config = IndexConfig()
    emb = default_embedder()
    cases = [("magnetic_tile", DATA / "magnetic_tile", "magnetic_tile", 2, 3)]
    cases += [(name, DATA / "piped", name, 1, 1) for name in category_names(DATA / "piped")]
    out = {}
    for name, root, category_name, train_every, test_every in cases:
        category = load_category(root, category_name)
        train = category.train[::train_every]
        bank = np.concatenate([g.features.reshape(-1, 152) for g in emb.embed_many(load_image(p) for p in train)])
        tests = category.test[::test_every]
        labels = np.asarray([s.label for s in tests])
        grids = [g.features.reshape(-1, 152) for g in emb.embed_many(load_image(s.path) for s in tests)]
        queries = np.concatenate(grids)
        bounds = np.cumsum([0] + [len(g) for g in grids])
        row = {"train_images": len(train), "bank_vectors": int(len(bank)), "test_images": len(tests),
               "auto_kind": choose_kind("auto", len(bank)), "kinds": {}}
        exact_ids = None
        for kind in KINDS:
            index = VectorIndex.from_vectors(kind, bank)
            start = time.perf_counter()
            d, i = index.search(queries, IndexConfig().k_neighbours)
            search_s = time.perf_counter() - start
            # Each image through the engine's scoring chain (the batched search above is for recall and time).
            scores = [score_vectors(index, queries[a:b], config.search).image_score
                      for a, b in zip(bounds[:-1], bounds[1:])]
            if kind == "flat":
                exact_ids = i[:, 0]
            row["kinds"][kind] = {"image_auroc": image_auroc(labels, np.asarray(scores)), "nprobe": index.nprobe,
                                  "nlist": index.nlist,
                                  "recall_at_1": float((i[:, 0] == exact_ids).mean()), "search_s": search_s}
        exact = row["kinds"]["flat"]["image_auroc"]
        for kind in KINDS[1:]:
            row["kinds"][kind]["delta_vs_exact"] = row["kinds"][kind]["image_auroc"] - exact
        out[name] = row
        print(name, {k: round(v["image_auroc"], 4) for k, v in row["kinds"].items()}, flush=True)
    piped = [r for n, r in out.items() if n != "magnetic_tile"]
    out["piped_mean"] = {kind: {"image_auroc": float(np.mean([r["kinds"][kind]["image_auroc"] for r in piped])),
                                "recall_at_1": float(np.mean([r["kinds"][kind]["recall_at_1"] for r in piped]))}
                         for kind in KINDS}
    return out


def top_patches(scores: np.ndarray, nearest_ids: np.ndarray, bank, search, n: int = 16) -> np.ndarray:
    """The positions of the `n` patches whose discounted scores make the image score (scoring.score_candidates'
    choice: the `discount_candidates` highest plain scores, discounted, the n highest of them)."""
    from simsearch.scoring import discount_candidates, discounted
    m = discount_candidates(len(scores), search.image_top_k)
    top = np.argpartition(scores, len(scores) - m)[-m:]
    if search.sparse_discount == 0:
        return top[np.argsort(scores[top])[-n:]]
    d = discounted(scores[top], bank.spread(nearest_ids[top]), bank.typical_spread(), search.sparse_discount)
    return top[np.argsort(d)[-n:]]


TWO_STAGE_VARIANTS = ("exact", "two-stage/ivf-sq8", "two-stage/flat", "two-stage/hnsw")


def step_twostage_accuracy() -> dict:
    """What the two-stage search costs in accuracy against exact search of the same bank: image AUROC, pixel AUROC
    and AUPRO (maps from scoring.score_grid), the overlap of the final top-16 patches, and search seconds, for
    each of TWO_STAGE_VARIANTS: Magnetic Tile (bank from every 2nd train image, every 3rd test image, as `auroc`)
    and all 12 PIPED categories (two-stage forced on their small banks). Resumable per category."""
    from simsearch.config import IndexConfig
    from simsearch.evaluation import metrics
    from simsearch.evaluation.datasets import category_names, load_category, load_mask
    from simsearch.images import load_image
    from simsearch.scoring import score_grid
    from simsearch.store.twostage import TwoStageBank, unit_mean
    from simsearch.store.vectors import VectorIndex
    search = IndexConfig().search
    emb = default_embedder()
    part_dir = CACHE / "twostage-accuracy"
    part_dir.mkdir(exist_ok=True)
    cases = [("magnetic_tile", DATA / "magnetic_tile", "magnetic_tile", 2, 3)]
    cases += [(name, DATA / "piped", name, 1, 1) for name in category_names(DATA / "piped")]
    out = {}
    for name, root, category_name, train_every, test_every in cases:
        part = part_dir / f"{name}.json"
        if part.exists():
            out[name] = json.loads(part.read_text())
            continue
        category = load_category(root, category_name)
        train = category.train[::train_every]
        train_grids = [g.features.reshape(-1, 152) for g in emb.embed_many(load_image(p) for p in train)]
        bank_vectors = np.concatenate(train_grids)
        owners = np.stack([np.arange(len(bank_vectors)),
                           np.repeat(np.arange(len(train_grids)), [len(g) for g in train_grids])], axis=1)
        images = VectorIndex.from_vectors("flat", np.stack([unit_mean(g) for g in train_grids]))
        del train_grids
        tests = category.test[::test_every]
        grids = list(emb.embed_many(load_image(s.path) for s in tests))
        labels = np.asarray([s.label for s in tests])
        masks = [load_mask(s, g.original_size) for s, g in zip(tests, grids)]
        row = {"train_images": len(train), "bank_vectors": int(len(bank_vectors)), "test_images": len(tests),
               "variants": {}}
        built, exact_top = {}, None
        for variant in TWO_STAGE_VARIANTS:
            inner = {"exact": "flat"}.get(variant, variant.split("/", 1)[-1])
            if inner not in built:
                built[inner] = VectorIndex.from_vectors(inner, bank_vectors)
            bank = built[inner]
            start = time.perf_counter()
            if variant.startswith("two-stage/"):
                bank = TwoStageBank.build(bank, images, owners)
            build_s = time.perf_counter() - start
            scores, maps, tops, refined, seconds = [], [], [], [], 0.0
            for g in grids:
                start = time.perf_counter()
                scored = score_grid(bank, g, search)
                seconds += time.perf_counter() - start
                scores.append(scored.score)
                maps.append(scored.anomaly_map)
                tops.append(set(top_patches(scored.scores.ravel(), scored.nearest_ids.ravel(), bank, search).tolist()))
                if variant.startswith("two-stage/"):
                    vec = g.features.reshape(-1, g.features.shape[-1])
                    from simsearch.scoring import score_vectors
                    refined.append(int(score_vectors(bank, vec, search).refined.sum()))
            if variant == "exact":
                exact_top = tops
            entry = {"image_auroc": metrics.image_auroc(labels, np.asarray(scores)),
                     "pixel_auroc": metrics.pixel_auroc(masks, maps), "aupro": metrics.aupro(masks, maps, max_fpr=0.3),
                     "search_s_per_image": seconds / len(grids), "build_s": build_s,
                     "top16_overlap_mean": float(np.mean([len(a & b) / 16 for a, b in zip(tops, exact_top)])),
                     "top16_overlap_min": float(np.min([len(a & b) / 16 for a, b in zip(tops, exact_top)]))}
            if refined:
                entry.update(refined_mean=float(np.mean(refined)), refined_max=int(max(refined)),
                             patches_mean=float(np.mean([g.features.shape[0] * g.features.shape[1] for g in grids])))
            row["variants"][variant] = entry
            print(name, variant, {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}, flush=True)
        exact = row["variants"]["exact"]
        for variant, entry in row["variants"].items():
            for key in ("image_auroc", "pixel_auroc", "aupro"):
                if entry[key] is not None and exact[key] is not None:
                    entry[f"{key}_delta"] = entry[key] - exact[key]
        part.write_text(json.dumps(row, indent=1))
        out[name] = row
    piped = [r for n, r in out.items() if n != "magnetic_tile"]
    out["piped_mean"] = {v: {k: float(np.mean([r["variants"][v][k] for r in piped if r["variants"][v][k] is not None]))
                             for k in ("image_auroc", "pixel_auroc", "aupro", "top16_overlap_mean")}
                         for v in TWO_STAGE_VARIANTS}
    for v, entry in out["piped_mean"].items():
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            entry[f"{key}_delta"] = entry[key] - out["piped_mean"]["exact"][key]
    return out


def step_twostage_build() -> dict:
    """Build seconds and bytes per vector of the two-stage search over the auto kind's bank at the 100k and 1M tiers:
    the bank itself, then TwoStageBank.build (image groups and the spread table, `bank_spreads`)."""
    from simsearch.runtime import configure_threads
    from simsearch.store.twostage import TwoStageBank
    from simsearch.store.vectors import VectorIndex, choose_kind
    configure_threads()
    out = {}
    for tier in ("100k", "1m"):
        vectors, ids = tier_vectors(tier)
        kind = choose_kind("auto", len(vectors))
        owners, images = tier_two_stage_parts(tier, ids)
        start = time.perf_counter()
        bank = VectorIndex.from_vectors(kind, vectors, ids)
        bank_s = time.perf_counter() - start
        start = time.perf_counter()
        two = TwoStageBank.build(bank, images, owners)
        two_s = time.perf_counter() - start
        two.coarse_search(vectors[:8], 1)  # an IVF bank builds its id map on the first reconstruct
        out[tier] = {"kind": kind, "vectors": int(len(vectors)), "bank_build_s": bank_s, "two_stage_build_s": two_s,
                     "bank_bytes_per_vector": bank.memory_bytes() / len(vectors),
                     "two_stage_bytes_per_vector": two.memory_bytes() / len(vectors),
                     "reconstruct_map_bytes_per_vector": 16 if bank.nlist else 0}
        print(tier, out[tier], flush=True)
    return out


def step_spread_table() -> dict:
    """What the writer now pays for the spread table it saves with each two-stage generation (store/spreads.py),
    over the auto kind's bank of the 1M tier and of every cached vector (2M): computed in full, saved, loaded,
    and extended after an add of one image's worth of new vectors (what a small add costs instead)."""
    import faiss
    from simsearch.runtime import configure_threads
    from simsearch.store.spreads import SpreadTable, next_table
    from simsearch.store.vectors import SPREAD_NEIGHBOURS
    from simsearch.store.vectors import VectorIndex, choose_kind
    configure_threads()
    out = {}
    everything = np.load(CACHE / "bank.f16.npy", mmap_mode="r")
    for tier in ("1m", "2m"):
        if tier == "2m":
            ids = np.arange(len(everything) - 768, dtype=np.int64)  # the last 768 rows are the add below
            vectors = np.ascontiguousarray(everything[:len(ids)], dtype=np.float32)
            extra = np.arange(len(ids), len(everything), dtype=np.int64)
        else:
            vectors, ids = tier_vectors(tier)
            extra = np.setdiff1d(np.arange(len(everything)), ids)[:768]
        kind = choose_kind("auto", len(vectors))
        bank = VectorIndex.from_vectors(kind, vectors, ids)
        del vectors
        start = time.perf_counter()
        table = SpreadTable.computed(bank)
        full_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "spreads.g000001.safetensors"
            start = time.perf_counter()
            table.save(path)
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            SpreadTable.load(path)
            load_s = time.perf_counter() - start
            file_bytes = path.stat().st_size
        # against exact spreads among the same (reconstructed) vectors, on 2,000 of them
        held, stored = bank.all_vectors()
        pick = np.sort(np.random.default_rng(0).choice(len(held), 2000, replace=False))
        d, _ = faiss.knn(stored[pick], stored, SPREAD_NEIGHBOURS + 1)
        exact = np.sqrt(np.maximum(d[:, 1:], 0)).mean(axis=1)
        ratio = table.lookup(held[pick])[0] / np.maximum(exact, 1e-6)
        del stored
        bank.add(np.asarray(everything[extra], np.float32), extra)
        start = time.perf_counter()
        grown = next_table(table, bank)
        add_s = time.perf_counter() - start
        out[tier] = {"kind": kind, "vectors": len(table), "full_s": full_s, "save_s": save_s, "load_s": load_s,
                     "file_bytes": file_bytes, "bytes_per_vector": file_bytes / len(table), "added": len(extra),
                     "extend_s": add_s, "extended_in_place": grown.full_count == table.full_count,
                     "typical": table.typical, "over_exact_p50_p90_p99": np.percentile(ratio, [50, 90, 99]).tolist()}
        print(tier, out[tier], flush=True)
        del bank, table, grown
    return out


def step_build_vs_anomalib() -> dict:
    """`Engine.create` + `add` at the defaults (and with --coreset 0.01) against anomalib PatchCore's fit
    (same weights, coreset ratio 0.01) on every 4th magnetic_tile train/good image, in one run."""
    from simsearch import Engine
    subset = train_images()[::4]
    out = {"train_images": len(subset), "simsearch": {}}
    for label, coreset in (("default", None), ("coreset-0.01", 0.01)):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            engine = Engine.create(Path(tmp) / "index")
            engine.add([str(p) for p in subset], coreset=coreset)
            seconds = time.perf_counter() - start
            out["simsearch"][label] = {"seconds": seconds, "bank_vectors": engine.bank.ntotal,
                                       "bank_kind": engine.bank.kind}
            engine.close()
    with tempfile.TemporaryDirectory() as tmp:
        # An MVTec-layout category of the subset (links): anomalib reads its train/good folder.
        root = Path(tmp) / "data" / "magnetic_tile"
        (root / "train" / "good").mkdir(parents=True)
        for p in subset:
            (root / "train" / "good" / p.name).symlink_to(p)
        (root / "test").symlink_to(MTD / "test")
        (root / "ground_truth").symlink_to(MTD / "ground_truth")
        result = Path(tmp) / "fit.json"
        subprocess.run([str(ANOMALIB_PY), str(ROOT / "bench" / "anomalib_patchcore.py"), "--data", str(root.parent),
                        "--category", "magnetic_tile", "--norm", "weights", "--coreset-ratio", "0.01", "--fit-only",
                        "--out", str(result)], check=True)
        out["anomalib"] = json.loads(result.read_text())
    for label, row in out["simsearch"].items():
        row["anomalib_fit_over_this"] = out["anomalib"]["fit_seconds"] / row["seconds"]
    return out


def step_tier_10m(n: int = 10_000_000, block: int = 500_000) -> dict:
    """The 10M tier on synthetic vectors (a Gaussian mixture at the real bank's scale): the auto kind built block
    by block (the index saved after each block, so a cut run resumes), then search time and recall@1 of 1,000
    queries against exact search, and the index's own bytes per vector."""
    import faiss
    from simsearch.runtime import configure_threads
    from simsearch.store.vectors import VectorIndex, choose_kind, ivf_lists_for
    configure_threads()
    kind = choose_kind("auto", n)
    real = np.load(CACHE / "bank.f16.npy", mmap_mode="r")
    sample = np.asarray(real[np.sort(np.random.default_rng(0).choice(len(real), 4096, replace=False))], np.float32)
    centres = sample[:1024]  # cluster centres taken from real vectors, spread by the real per-dimension deviation
    sigma = 0.5 * sample.std(axis=0)

    def synthetic(start: int, count: int) -> np.ndarray:
        rng = np.random.default_rng(1000 + start // block)
        return (centres[rng.integers(0, len(centres), count)] + rng.standard_normal((count, sample.shape[1]),
                                                                                      dtype=np.float32) * sigma)
    path, state = CACHE / "tier10m.faiss", CACHE / "tier10m.progress.json"
    done = json.loads(state.read_text())["added"] if state.exists() and path.exists() else 0
    if done:
        index = VectorIndex.load(path)
    else:
        start = time.perf_counter()
        index = VectorIndex.create(kind, sample.shape[1], synthetic(0, 64 * ivf_lists_for(n)), ivf_lists_for(n))
        state.write_text(json.dumps({"added": 0, "train_s": time.perf_counter() - start, "add_s": 0.0}))
    progress = json.loads(state.read_text())
    while done < n:
        start = time.perf_counter()
        index.add(synthetic(done, block), np.arange(done, done + block))
        done += block
        progress["add_s"] += time.perf_counter() - start
        progress["added"] = done
        index.save(path)
        state.write_text(json.dumps(progress))
        print(f"tier-10m: {done} vectors", flush=True)
    index.use_nprobe(None)
    queries = synthetic(n, 1000)
    exact = np.full(len(queries), np.inf, np.float32)
    exact_ids = np.zeros(len(queries), np.int64)
    for s in range(0, n, block):  # exact search block by block (the vectors are regenerated, not stored)
        flat = faiss.IndexFlatL2(sample.shape[1])
        flat.add(synthetic(s, block))
        d, i = flat.search(queries, 1)
        better = d[:, 0] < exact
        exact[better], exact_ids[better] = d[better, 0], i[better, 0] + s
    out = {"vectors": n, "kind": kind, "nlist": index.nlist, "bytes_per_vector": index.bytes_per_vector(),
           "flat_bytes_per_vector": 4 * sample.shape[1] + 8, "memory_bytes": index.memory_bytes(),
           "file_bytes": path.stat().st_size, "train_s": progress["train_s"], "add_s": progress["add_s"],
           "default_nprobe": index.nprobe, "search": {}}
    for nprobe in sorted({index.nprobe, 32, 128, 256}):
        index.nprobe = nprobe
        start = time.perf_counter()
        d, i = index.search(queries, 1)
        seconds = time.perf_counter() - start
        out["search"][str(nprobe)] = {"ms_per_1k_queries": 1000 * seconds,
                                      "recall_at_1": float((i[:, 0] == exact_ids).mean())}
    return out


def step_twostage_10m() -> dict:
    """Build seconds and bytes per vector of the two-stage parts over the tier-10m bank (run tier-10m first): its
    10M synthetic vectors grouped as reference images of 768 patches each, their pooled vectors, the spread table."""
    from simsearch.runtime import configure_threads
    from simsearch.store.twostage import TwoStageBank, unit_mean
    from simsearch.store.vectors import VectorIndex
    configure_threads()
    path = CACHE / "tier10m.faiss"
    if not path.exists():
        raise SystemExit("run --steps tier-10m first (it saves bench/.cache/perf/tier10m.faiss)")
    bank = VectorIndex.load(path)
    held, stored = bank.all_vectors()
    order = np.argsort(held)
    held, stored = held[order], stored[order]
    owners = np.stack([held, np.arange(len(held)) // 768], axis=1)
    pooled = np.stack([unit_mean(stored[a:a + 768]) for a in range(0, len(held), 768)])
    del stored
    images = VectorIndex.from_vectors("flat", pooled, np.arange(len(pooled), dtype=np.int64))
    start = time.perf_counter()
    two = TwoStageBank.build(bank, images, owners)
    build_s = time.perf_counter() - start
    return {"vectors": int(bank.ntotal), "kind": bank.kind, "images": int(len(pooled)), "two_stage_build_s": build_s,
            "bank_bytes_per_vector": bank.memory_bytes() / bank.ntotal,
            "two_stage_bytes_per_vector": two.memory_bytes() / bank.ntotal,
            "reconstruct_map_bytes_per_vector": 16, "typical_spread": two.spreads.typical}


def run_step(step: str) -> dict:
    if step == "embed-ab":
        return step_embed_ab()
    if step == "forward-batch":
        return step_forward_batch()
    if step == "build-vs-anomalib":
        return step_build_vs_anomalib()
    if step.startswith("build-"):
        return build(step)
    if step == "export":
        return step_export()
    if step == "tier-10m":
        return step_tier_10m()
    if step == "spread-table":
        return step_spread_table()
    if step == "twostage-10m":
        return step_twostage_10m()
    if step.startswith("tier-"):
        return step_tier(step.split("-", 1)[1])
    if step.startswith("latency-"):
        tier = step.split("-", 1)[1]
        if tier == "1m":
            # ivf-flat and ivf-pq (slower than ivf-sq8, docs/benchmarks.md) are left out since issue 19: run time
            kinds = ["ivf-sq8", "two-stage/ivf-sq8", "hnsw", "two-stage/hnsw"]
        else:
            kinds = [auto_label(TIERS[tier])]
        return latency(tier, kinds)
    if step == "wait-policy":
        return step_wait_policy()
    if step == "coreset":
        return step_coreset()
    if step == "auroc":
        return step_auroc()
    if step == "twostage-accuracy":
        return step_twostage_accuracy()
    if step == "twostage-build":
        return step_twostage_build()

    raise SystemExit(f"unknown step {step}")


def before_source() -> Path:
    """The simsearch package as it was before the speed work (BEFORE_REV), exported once (read-only on the repository)."""
    target = CACHE / "before-src"
    if not (target / "simsearch").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_REV, "simsearch"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--step", choices=STEPS, help="run one step in this process (used by the driver)")
    ap.add_argument("--latency-only", nargs=2, metavar=("TIER", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--embed-only", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--forward-only", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="print the cached results")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.forward_only:
        print(json.dumps(forward_only([1, 2, 4, 8, 16], args.forward_only)))
        return
    if args.embed_only:
        print(json.dumps(embed_only(args.embed_only)))
        return
    if args.latency_only:
        print(json.dumps(latency(args.latency_only[0], [args.latency_only[1]], args.images)))
        return
    if args.step:
        save(args.step, run_step(args.step))
        return
    if args.report:
        for step in STEPS:
            path = CACHE / f"{step}.json"
            print(f"== {step}: {path.read_text() if path.exists() else 'not run'}")
        return
    for step in args.steps:
        if (CACHE / f"{step}.json").exists():
            print(f"{step}: cached", flush=True)
            continue
        env = dict(os.environ)
        src = before_source() if step == "build-before" else ROOT
        env["PYTHONPATH"] = str(src)
        print(f"{step}: running", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--step", step], env=env, cwd=str(src if step == "build-before" else ROOT))
        print(f"{step}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
