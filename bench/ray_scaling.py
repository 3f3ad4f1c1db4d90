"""`index add --ray local` and `eval --ray local` against the same commands without Ray (issue 20), resumable.

    nohup nice -n 10 .venv/bin/python bench/ray_scaling.py > bench/.cache/ray/run.log 2>&1 &
    .venv/bin/python bench/ray_scaling.py --round 2        # the add steps again (timings), as <step>-r2
    .venv/bin/python bench/ray_scaling.py --report        # print the cached results

Every step is one CLI command in a subprocess, timed from start to exit (Python start-up, model load
and, with --ray, the Ray cluster's start-up included: what a user waits for), its peak RSS sampled every
0.2 s over its whole process tree (with Ray: the driver, Ray's own processes and the actors) and for the
driver alone. Results are cached as JSON under bench/.cache/ray/<step>.json; a cached step is skipped.

Steps:
- piped-local / piped-ray1 / piped-ray2: `index add` of PIPED PA_BDP01_TL train/good into a new, empty
  index (created beforehand, untimed, so its ONNX export is not in the figure) without Ray, and with
  `--ray local --ray-actors 1` / `2`.
- piped-compare: vector counts of the three indexes, and the 64 test images' scores (max relative deviation
  of each Ray index from the local one).
- mt-local / mt-ray1 / mt-ray2: the same three adds of magnetic_tile train/good (761 images).
- mt-phases: a local add of magnetic_tile train/good in Python, its phases timed from the progress
  callback (hashing, reading + embedding, the write), for the throughput model.
- embed-threads: in one process, the embedding step alone (`ingest.embed_items`, what a local add and each
  actor run) on 150 magnetic_tile images with the model on 2 threads and on 1, alternated, twice.
- eval-local / eval-ray: `eval piped --category PA_BDP01_TL --category PA_BRG03_TL --json`, without and
  with `--ray local`; eval-compare: the metrics of the two side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "ray"
WORK = CACHE / "work"
DATA = Path(os.environ.get("SIMSEARCH_DATA", ROOT.parent / "shared" / "datasets"))
PIPED = DATA / "piped"
CATEGORY = PIPED / "PA_BDP01_TL"
MT = DATA / "magnetic_tile" / "magnetic_tile"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "threshold", "f1_at_threshold", "best_f1", "fpr_good",
           "n_train", "n_test_good", "n_test_defect")


def tree_rss_kib(root_pid: int) -> tuple[int, int]:
    """(RSS of root_pid and all its descendants, RSS of root_pid alone), KiB, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total, rss.get(root_pid, 0)


def timed(args: list[str]) -> dict:
    """Run `python -m simsearch ARGS`: wall seconds, peak RSS (tree and driver), stdout, return code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "simsearch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak_tree = peak_driver = 0
    while proc.poll() is None:
        tree, driver = tree_rss_kib(proc.pid)
        peak_tree, peak_driver = max(peak_tree, tree), max(peak_driver, driver)
        time.sleep(0.2)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {err[-2000:]}")
    return {"command": "simsearch " + " ".join(args), "seconds": round(seconds, 2),
            "peak_rss_tree_mib": round(peak_tree / 1024, 1), "peak_rss_driver_mib": round(peak_driver / 1024, 1),
            "stdout": out, "stderr": err}


def add_step(name: str, source: Path, ray_actors: int | None) -> dict:
    index = WORK / name
    shutil.rmtree(index, ignore_errors=True)
    # The empty index (its ONNX export included) is made first, untimed: the step times an add, not a create.
    subprocess.run([sys.executable, "-c", f"from simsearch.engine import Engine; Engine.create({str(index)!r}).close()"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    args = ["index", "add", str(source), "--index", str(index), "--json"]
    if ray_actors:
        args += ["--ray", "local", "--ray-actors", str(ray_actors)]
    result = timed(args)
    report = json.loads(result.pop("stdout").strip().splitlines()[-1])
    # Ray Data's own account of the embedding stage (actors' start-up included, Ray's start-up not).
    stage = re.findall(r"execution finished in ([0-9.]+) seconds", result.pop("stderr"))
    result.update(images=len(report["added"]), vectors=report["vectors_added"],
                  ray_data_seconds=float(stage[-1]) if stage else None)
    return result


def compare_step(prefix: str, test_images: list[Path]) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from simsearch.engine import Engine

    scores = {}
    vectors = {}
    for variant in ("local", "ray1", "ray2"):
        with Engine.open(WORK / f"{prefix}-{variant}") as engine:
            vectors[variant] = engine.info()["bank_vectors"]
            scores[variant] = np.array([r.score for r in engine.query_many([str(p) for p in test_images])])
    local = scores["local"]
    out = {"test_images": len(test_images), "vectors": vectors}
    for variant in ("ray1", "ray2"):
        rel = np.abs(scores[variant] - local) / np.maximum(np.abs(local), 1e-12)
        out[f"max_rel_dev_{variant}"] = float(rel.max())
    return out


PHASES = """
import json, sys, time
from simsearch.engine import Engine
marks = {}
def progress(stage, done, total):
    marks.setdefault(stage, time.perf_counter())
with Engine.create(sys.argv[1]) as engine:
    start = time.perf_counter()
    report = engine.add([sys.argv[2]], progress=progress)
    end = time.perf_counter()
print(json.dumps({"hash_s": marks["embedding"] - start, "embed_s": marks["writing"] - marks["embedding"],
                  "write_s": end - marks["writing"], "images": len(report.added), "vectors": report.vectors_added}))
"""


def phases_step(source: Path) -> dict:
    """A local add's phases, from its progress callback: hashing, reading + embedding, the write."""
    index = WORK / "mt-phases"
    shutil.rmtree(index, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", PHASES, str(index), str(source)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in json.loads(out.splitlines()[-1]).items()}


THREADS = """
import glob, json, sys, time
from simsearch.engine import Engine
from simsearch.images import file_sha256
from simsearch.ingest import WorkItem, embed_items
files = sorted(glob.glob(sys.argv[2] + "/*"))[:150]
items = [WorkItem(f, file_sha256(f), True) for f in files]
with Engine.open(sys.argv[1]) as engine:
    embedder = engine.embedder
    start = time.perf_counter()
    n = sum(1 for _ in embed_items(embedder, items))
    print(json.dumps({"runtime": embedder.runtime, "images": n, "images_per_s": n / (time.perf_counter() - start)}))
"""


def threads_step(index: Path, source: Path) -> dict:
    """In one process, `ingest.embed_items` (what a local add and each actor run) on 150 images with the
    model on 2 threads, then on 1 (SIMSEARCH_THREADS), alternated twice."""
    out = {}
    for round_ in (1, 2):
        for threads in ("2", "1"):
            run = subprocess.run([sys.executable, "-c", THREADS, str(index), str(source)], check=True,
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT), "SIMSEARCH_THREADS": threads})
            result = json.loads(run.stdout.splitlines()[-1])
            out[f"threads{threads}-round{round_}"] = round(result["images_per_s"], 2)
            out["runtime"] = result["runtime"]
    return out


def eval_step(ray: bool) -> dict:
    args = ["eval", str(PIPED), "--category", "PA_BDP01_TL", "--category", "PA_BRG03_TL", "--json"]
    if ray:
        args += ["--ray", "local"]
    result = timed(args)
    result.pop("stderr")
    rows = [json.loads(line) for line in result.pop("stdout").strip().splitlines()]
    result["categories"] = {row["category"]: {k: row.get(k) for k in METRICS} for row in rows}
    return result


def eval_compare() -> dict:
    local = json.loads((CACHE / "eval-local.json").read_text())["categories"]
    ray = json.loads((CACHE / "eval-ray.json").read_text())["categories"]
    out = {}
    for name in local:
        diffs = {k: abs(local[name][k] - ray[name][k]) for k in METRICS
                 if isinstance(local[name].get(k), (int, float)) and isinstance(ray[name].get(k), (int, float))}
        out[name] = {"max_abs_diff": max(diffs.values()) if diffs else None, "diffs": diffs}
    return out


def steps() -> dict:
    piped_test = sorted(p for kind in (CATEGORY / "test").iterdir() for p in kind.iterdir())
    mt_test = sorted(p for kind in (MT / "test").iterdir() for p in kind.iterdir())[::20]
    return {
        "piped-local": lambda: add_step("piped-local", CATEGORY / "train" / "good", None),
        "piped-ray1": lambda: add_step("piped-ray1", CATEGORY / "train" / "good", 1),
        "piped-ray2": lambda: add_step("piped-ray2", CATEGORY / "train" / "good", 2),
        "piped-compare": lambda: compare_step("piped", piped_test),
        "eval-local": lambda: eval_step(False),
        "eval-ray": lambda: eval_step(True),
        "eval-compare": eval_compare,
        "mt-local": lambda: add_step("mt-local", MT / "train" / "good", None),
        "mt-ray1": lambda: add_step("mt-ray1", MT / "train" / "good", 1),
        "mt-ray2": lambda: add_step("mt-ray2", MT / "train" / "good", 2),
        "mt-compare": lambda: compare_step("mt", mt_test),
        "mt-phases": lambda: phases_step(MT / "train" / "good"),
        "embed-threads": lambda: threads_step(WORK / "mt-local", MT / "train" / "good"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", nargs="*")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--round", type=int, default=1, help="rounds after the first repeat the add steps "
                                                             "only, cached as <step>-r<N>.json")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.report:
        for path in sorted(CACHE.glob("*.json")):
            print(path.stem, path.read_text())
        return
    for name, run in steps().items():
        if args.steps and name not in args.steps:
            continue
        if args.round > 1:
            if name.endswith(("compare", "phases", "threads")) or name.startswith("eval"):
                continue
            source = {"piped": CATEGORY, "mt": MT}[name.split("-")[0]] / "train" / "good"
            actors = {"local": None, "ray1": 1, "ray2": 2}[name.split("-")[1]]
            name = f"{name}-r{args.round}"
            run = (lambda n, src, a: lambda: add_step(n, src, a))(name, source, actors)
        cached = CACHE / f"{name}.json"
        if cached.exists():
            continue
        print(f"{time.strftime('%H:%M:%S')} {name}", flush=True)
        result = run()
        cached.write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
