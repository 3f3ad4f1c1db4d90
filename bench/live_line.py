"""A live line measured (issue 17): what an add's recalibration costs, and how often the drift statistic cries
drift on good parts.

    .venv/bin/python bench/live_line.py                    # every step not cached yet
    .venv/bin/python bench/live_line.py --steps drift      # one step
    .venv/bin/python bench/live_line.py --report           # the cached results only

Steps (cached in bench/.cache/live_line/<step>.json; --force runs a cached step again):
- recalibration: an index of PIPED PA_BDP01_TL's train/good but 4 (a) with a quarter held out and calibrated
  on it, (b) without a holdout, calibrated with --folds 5; and of Magnetic Tile's train/good but 4 with a
  tenth held out. Two good images added with the recalibration, two without: seconds per add, and the
  difference (what recalibrating costs).
- drift: per dev set with enough good images (Magnetic Tile: a fifth of train/good as the bank, 200 other
  train/good and 100 test/good images scored; the tire: half as the bank, every other good image scored); then 2,000 draws of a calibration set of N of the other train/good scores and a
  window of n of the rest (all good, exchangeable): how often the drift test (drift.py, beta-binomial) flags
  the window at its level, against a plain binomial test with p = k / (N + 1). And the same calibration
  draws against test/good windows (other captures), for information.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from cached_steps import run_steps  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
CACHE = ROOT / "bench" / ".cache" / "live_line"
DRAWS = 2000


def timed_adds(engine, extra: list[str]) -> dict:
    start = time.perf_counter()
    with_recal = engine.add(extra[:2])
    t_with = time.perf_counter() - start
    start = time.perf_counter()
    without = engine.add(extra[2:], recalibrate=False)
    t_without = time.perf_counter() - start
    assert with_recal.calibration is None and "asked not to" in without.calibration
    return {"add_2_recalibrated_s": round(t_with, 2), "add_2_not_recalibrated_s": round(t_without, 2),
            "recalibration_s": round(t_with - t_without, 2)}


def step_recalibration() -> dict:
    from simsearch import Engine
    from simsearch.evaluation.datasets import load_category

    out = {}
    cases = (("piped PA_BDP01_TL, 1/4 held out", DATA / "piped", "PA_BDP01_TL", 0.25, None),
             ("piped PA_BDP01_TL, --folds 5", DATA / "piped", "PA_BDP01_TL", 0.0, 5),
             ("magnetic_tile, 1/10 held out", DATA / "magnetic_tile", "magnetic_tile", 0.1, None))
    for name, root, cat, holdout, folds in cases:
        train = [str(p) for p in load_category(root, cat).train]
        with tempfile.TemporaryDirectory() as tmp, Engine.create(Path(tmp) / "index") as engine:
            engine.record_queries = False
            engine.add(train[:-4], holdout=holdout)
            cal = engine.calibrate(folds=folds)
            out[name] = {"calibration_images": cal.n_good, "bank_images": engine.info()["reference_images"],
                         **timed_adds(engine, train[-4:])}
        print(f"  {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def good_scores(root: Path, cat: str, bank_every: int, limit: int) -> dict:
    """Every bank_every-th train/good image as the bank; the scores of up to `limit` other train/good images
    and of up to limit / 2 test/good images against it."""
    from simsearch import Engine
    from simsearch.evaluation.datasets import load_category

    category = load_category(root, cat)
    train = [str(p) for p in category.train]
    test_good = [str(s.path) for s in category.test if s.label == 0]
    with tempfile.TemporaryDirectory() as tmp, Engine.create(Path(tmp) / "index") as engine:
        engine.record_queries = False
        engine.add(train[::bank_every])
        others = [p for i, p in enumerate(train) if i % bank_every]
        rest = [engine.query(p).score for p in others[::max(1, len(others) // limit)][:limit]]
        test = [engine.query(p).score for p in test_good[::max(1, 2 * len(test_good) // limit)][:limit // 2]]
    return {"train": rest, "test": test}


def flag_rates(cal_pool: np.ndarray, line_pool: np.ndarray | None, n_cal: int, window: int,
               rng: np.random.Generator) -> dict:
    """Share of draws the beta-binomial test (and a plain binomial one) flags: calibration of n_cal from
    cal_pool, a window of `window` from the rest of cal_pool (line_pool None) or from line_pool."""
    from simsearch.drift import ALPHA, beta_binomial_upper_tail, drift_line

    flagged = naive = 0
    for _ in range(DRAWS):
        order = rng.permutation(len(cal_pool))
        cal = cal_pool[order[:n_cal]]
        pool = cal_pool[order[n_cal:]] if line_pool is None else line_pool
        line_scores = rng.choice(pool, window, replace=len(pool) < window)
        line, k, n = drift_line(list(cal))
        count = int((line_scores > line).sum())
        flagged += beta_binomial_upper_tail(count, window, k, n) < ALPHA
        p = k / (n + 1)
        naive += sum(math.comb(window, i) * p ** i * (1 - p) ** (window - i) for i in range(count, window + 1)) < ALPHA
    return {"beta_binomial": flagged / DRAWS, "binomial": naive / DRAWS}


def step_drift() -> dict:
    from simsearch.drift import ALPHA

    rng = np.random.default_rng(0)
    out = {"alpha": ALPHA, "draws": DRAWS}
    # The bank of Magnetic Tile is a fifth of train/good (an exact one, to keep the scoring within minutes here).
    for name, root, cat, bank_every, limit in (("magnetic_tile", DATA / "magnetic_tile", "magnetic_tile", 5, 200),
                                               ("mvtec3d_tire", DATA / "mvtec3d_tire", "tire", 2, 200)):
        scores = good_scores(root, cat, bank_every, limit)
        train, test = np.asarray(scores["train"]), np.asarray(scores["test"])
        rows = {}
        for n_cal in (20, 50):
            window = min(100, len(train) - n_cal)
            rows[f"N={n_cal}, window {window}, good from train"] = flag_rates(train, None, n_cal, window, rng)
            rows[f"N={n_cal}, window {min(window, len(test))}, test/good"] = flag_rates(
                train, test, n_cal, min(window, len(test)), rng)
        out[name] = {"scored_train_good": len(train), "scored_test_good": len(test), "rates": rows}
        print(f"  {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


STEPS = {"recalibration": step_recalibration, "drift": step_drift}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    run_steps(STEPS, args.steps, CACHE, force=args.force, report_only=args.report)


if __name__ == "__main__":
    main()
