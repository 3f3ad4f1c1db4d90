"""`simsearch eval`: measure a method on MVTec-layout data, the way anomalib does, with no test leakage.

Per category: a fresh index from all of train/good; the image threshold from cross-scoring train/good
(`simsearch calibrate --folds k`: k folds, each scored against the bank without it, then the order-statistics
rule), and the pixel threshold from the same cross-scores' maps (their region levels, as
`calibrate` does); every test image scored; metrics from `metrics.py` at the masks' resolution, overall and
per defect type, and the confusion counts at the image threshold.
"""
from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..calibration import threshold_for_fpr
from ..calibrator import fold_of as folds_in_order, fold_spread
from ..engine import Engine
from ..errors import BadInput
from ..finetune import FinetuneSettings, finetune_files
from ..records import Progress
from ..scoring import find_regions
from . import metrics
from .baselines import BASELINES
from .datasets import Category, load_mask
from .feature_cache import FeatureCache

METHODS = ("patchcore", *BASELINES)

@dataclass
class Case:
    """One scored test image, kept for the report (not for JSON)."""
    path: str
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" or the defect folder's name
    score: float
    anomaly_map: np.ndarray | None = field(repr=False)  # (H, W) float32 at the image's resolution
    mask_path: str | None = None
    regions: list = field(default_factory=list)  # scoring.Region at the pixel threshold, best first


@dataclass
class CategoryResult:
    category: str
    method: str
    n_train: int
    n_test_good: int
    n_test_defect: int
    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    threshold: float
    f1_at_threshold: float | None
    best_f1: float | None
    fpr_good: float | None  # on test/good at the calibrated threshold
    target_fpr: float
    expected_fpr: float  # what the threshold rule promises with this many cross-scores
    fold_order: str = "capture"  # how train/good was cut into the threshold's folds
    fold_spread: dict | None = None  # per fold: its own threshold, its share above the threshold (fold_spread)
    border_profile: list | None = None  # what the calibration learned of the edges (borders.py); engine only
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    # With fine-tuning: the head's training (loss, steps, seed, final loss...); None for the frozen embedder.
    finetune: dict | None = None
    # The pixel threshold (and the regions' min area) from the train/good cross-scores' maps, as `calibrate`
    # sets them; None for a method without maps.
    pixel_threshold: float | None = None
    min_region_area: int | None = None
    confusion: dict = field(default_factory=dict)  # tp, fp, tn, fn at the calibrated image threshold
    # defect type -> {count, image_auroc (that type vs test/good), pixel_auroc, aupro (masks permitting)}
    per_defect: dict = field(default_factory=dict)
    # Kept for the report, not for JSON: every test image as a Case.
    cases: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "cases"}
        return d


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _score_tests(category: Category, score: Callable, progress: Progress | None) -> list[tuple]:
    """(sample, score, map or None) for every test image."""
    out = []
    for i, sample in enumerate(category.test):
        if progress:
            progress("test", i, len(category.test))
        value, amap = score(sample.path)
        out.append((sample, float(value), amap))
    if progress:
        progress("test", len(category.test), len(category.test))
    return out


def _run_patchcore(category: Category, settings: dict, folds: int, workdir, progress, seconds: dict,
                   finetune: FinetuneSettings | None = None, trained: dict | None = None,
                   coreset: float | None = None, fold_order: str = "capture"):
    with tempfile.TemporaryDirectory(prefix=f"simsearch-eval-{category.name}-", dir=workdir) as tmp:
        head = None
        if finetune is not None:  # the head learns from train/good only, never from a test image
            start = time.perf_counter()
            head = Path(tmp) / "head.safetensors"
            info, run = finetune_files([str(p) for p in category.train], head, settings=finetune,
                                       progress=(lambda d, t, _loss: progress("finetune", d, t)) if progress else None,
                                       **settings)
            seconds["finetune"] = time.perf_counter() - start
            if trained is not None:
                trained.update(info.training, sha256=info.sha256, train_seconds=round(run.seconds, 2),
                               kinds_seen=run.kinds_seen)
        start = time.perf_counter()
        engine = Engine.create(Path(tmp) / "index", head=head, **settings)
        engine.add([str(p) for p in category.train], coreset=coreset,
                   progress=(lambda _stage, d, t: progress("build", d, t)) if progress else None)
        seconds["build"] = time.perf_counter() - start
        start = time.perf_counter()
        # `simsearch calibrate --folds`: every train image re-embedded and scored on all its patches against the
        # bank without its fold; its map gives the pixel threshold too. The queries below then carry its regions.
        engine.record_queries = False
        engine.calibrate(folds=folds, fold_order=fold_order,
                         progress=(lambda _stage, d, t: progress("threshold", d, t)) if progress else None)
        measured = engine.latest_calibration()
        train_scores = np.asarray(measured["details"]["good_scores"])
        train_folds = np.asarray(measured["details"]["good_folds"])
        levels, area = np.asarray(measured["details"]["region_levels"]), int(measured["min_region_area"])
        profile = measured["details"].get("border_profile")
        seconds["threshold"] = time.perf_counter() - start
        start = time.perf_counter()

        def score(path):
            result = engine.query(str(path))
            return result.score, result.anomaly_map
        tests = _score_tests(category, score, progress)
        engine.close()
        seconds["test"] = time.perf_counter() - start
    return train_scores, train_folds, tests, levels, area, profile


def _run_detector(cls: Callable, category: Category, folds: int, progress, seconds: dict,
                  fold_order: str = "capture"):
    """A baseline: fit on train/good; the threshold from k refits, each scoring the fold it left out (folds as
    the engine's, calibrator.fold_of). One feature cache for all k + 1 fits: each train image is decoded (and
    embedded) once."""
    cache = FeatureCache()

    def make():
        return cls(cache=cache)
    start = time.perf_counter()
    detector = make()
    detector.fit(category.train)
    seconds["build"] = time.perf_counter() - start
    start = time.perf_counter()
    folds = max(2, min(folds, len(category.train)))
    train_folds = folds_in_order([str(p) for p in category.train], folds, fold_order)
    train_scores = np.zeros(len(category.train))
    for f in range(folds):
        if progress:
            progress("threshold", f, folds)
        held = np.flatnonzero(train_folds == f)
        fold_detector = make()
        fold_detector.fit([p for p, fo in zip(category.train, train_folds) if fo != f])
        for pos in held:
            train_scores[pos] = fold_detector.score(category.train[pos])[0]
    seconds["threshold"] = time.perf_counter() - start
    start = time.perf_counter()
    tests = _score_tests(category, detector.score, progress)
    seconds["test"] = time.perf_counter() - start
    return train_scores, train_folds, tests, None, None, None


def evaluate_category(category: Category, *, method: str = "patchcore", settings: dict | None = None,
                      folds: int = 5, target_fpr: float = 0.01, workdir: str | Path | None = None,
                      progress: Progress | None = None, finetune: FinetuneSettings | None = None,
                      coreset: float | None = None, fold_order: str = "capture") -> CategoryResult:
    """One method on one category. `settings`: IndexConfig overrides for the engine's fresh index.
    `fold_order`: how train/good is cut into the threshold's folds (calibrator.fold_of).
    `finetune`: train a projection head on the category's train/good first and build the index with it.
    `coreset`: the engine keeps that fraction of train/good's patch vectors (`Engine.add`)."""
    seconds: dict[str, float] = {}
    trained: dict = {}
    if (finetune is not None or coreset is not None) and method != "patchcore":
        raise BadInput(f"fine-tuning and a coreset apply to the engine (patchcore), not to {method!r}")
    if method == "patchcore":
        train_scores, train_folds, tests, levels, area, profile = _run_patchcore(
            category, settings or {}, folds, workdir, progress, seconds, finetune, trained, coreset, fold_order)
    elif method in BASELINES:
        train_scores, train_folds, tests, levels, area, profile = _run_detector(BASELINES[method], category, folds, progress,
                                                                       seconds, fold_order)
    else:
        raise BadInput(f"unknown method {method!r}; available: {METHODS}")
    choice = threshold_for_fpr(train_scores, target_fpr)
    pixel_threshold = None if levels is None else threshold_for_fpr(levels, target_fpr).threshold

    start = time.perf_counter()
    labels = np.asarray([sample.label for sample, _, _ in tests])
    scores = np.asarray([score for _, score, _ in tests])
    with_maps = category.has_masks and all(amap is not None for _, _, amap in tests)
    masks = [load_mask(sample, amap.shape) for sample, _, amap in tests] if with_maps else []
    maps = [amap for _, _, amap in tests] if with_maps else []
    at = metrics.f1_at(labels, scores, choice.threshold)
    cases = [Case(str(sample.path), sample.label, sample.defect_type, score, amap,
                  None if sample.mask_path is None else str(sample.mask_path),
                  find_regions(amap, pixel_threshold, area) if pixel_threshold is not None and amap is not None
                  else []) for sample, score, amap in tests]
    result = CategoryResult(
        category=category.name, method=method, n_train=len(category.train),
        n_test_good=int((labels == 0).sum()), n_test_defect=int(labels.sum()),
        image_auroc=metrics.image_auroc(labels, scores),
        pixel_auroc=metrics.pixel_auroc(masks, maps) if with_maps else None,
        aupro=metrics.aupro(masks, maps, max_fpr=0.3) if with_maps else None,
        threshold=choice.threshold, f1_at_threshold=at["f1"],
        best_f1=metrics.best_f1(labels, scores)[0] if 0 < labels.sum() < len(labels) else None,
        fpr_good=at["fpr_good"], target_fpr=target_fpr, expected_fpr=choice.expected_fpr,
        fold_order=fold_order, fold_spread=fold_spread(train_scores, train_folds, choice.threshold, target_fpr),
        pixel_threshold=pixel_threshold, min_region_area=area, border_profile=profile,
        confusion={k: at[k] for k in ("tp", "fp", "tn", "fn")},
        per_defect=per_defect_metrics([s.defect_type for s, _, _ in tests], scores, masks, maps),
        cases=cases, finetune=trained or None)
    seconds["metrics"] = time.perf_counter() - start
    result.seconds = {k: round(v, 2) for k, v in seconds.items()}
    result.peak_rss_mib = round(peak_rss_mib(), 1)
    return result


def per_defect_metrics(kinds: list[str], scores: np.ndarray, masks: list, maps: list) -> dict:
    """defect type -> {count, image_auroc, pixel_auroc, aupro} of that type's images against all good ones.

    kinds: (N,) "good" or a defect type per test image; scores (N,); masks, maps: per image (H_i, W_i), or
    empty lists when there are no pixel metrics (then those two are None). Each type is scored with the good
    images' pixels as its normal pixels, as the whole set is.
    """
    kinds_arr = np.asarray(kinds)
    good = kinds_arr == "good"
    out = {}
    for kind in sorted(set(kinds) - {"good"}):
        picked = np.flatnonzero(good | (kinds_arr == kind))
        labels = (kinds_arr[picked] != "good").astype(int)
        entry = {"count": int((kinds_arr == kind).sum()),
                 "image_auroc": metrics.image_auroc(labels, scores[picked]) if good.any() else None,
                 "pixel_auroc": None, "aupro": None}
        if masks:
            sub_masks, sub_maps = [masks[i] for i in picked], [maps[i] for i in picked]
            entry["pixel_auroc"] = metrics.pixel_auroc(sub_masks, sub_maps)
            entry["aupro"] = metrics.aupro(sub_masks, sub_maps, max_fpr=0.3)
        out[kind] = entry
    return out


def mean_row(results: list[CategoryResult]) -> dict:
    """Means over categories of each metric (categories without a value are left out of that mean)."""
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold", "best_f1", "fpr_good")
    out = {}
    for key in keys:
        values = [getattr(r, key) for r in results if getattr(r, key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["seconds"] = round(sum(sum(r.seconds.values()) for r in results), 1)
    return out
