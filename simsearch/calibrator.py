"""Calibration of an index: thresholds and applicability limits from good images outside the bank, stored in
the catalog, and whether the latest one holds for the bank a query scores against. The threshold rule itself
(order statistics) is in calibration.py, the applicability checks in applicability.py.

Good images come from one of two sources:
- calibration images: held out at `index add --holdout`, or given to `calibrate` (then remembered);
- folds of the bank itself (`calibrate --folds K`): each bank image scored against the bank without its fold,
  as `simsearch eval` does. Those banks are 1/K smaller than the real one, so the scores run a little high
  and the false-alarm rate on new good parts comes out at or below the promise, not above it.

A calibration records the bank generation it was measured on: the one its scores came from (the view
taken before scoring), never a later one a writer committed meanwhile. A writer that changes the bank
recalibrates inside its own transaction (`after_write`), so the new generation and its calibration are
committed together; when it cannot (or is told not to), an add carries the old calibration over, marked as
predating the add (more references shorten nearest-neighbour distances, so its threshold still bounds the
false alarms), and a remove leaves the index uncalibrated (scores can rise).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import applicability
from .borders import border_divisors, border_profile
from .calibration import f1_best_threshold, threshold_for_fpr
from .errors import BadInput, ImageError, IndexNotReady, SimsearchError
from .images import Image, expand_paths, load_image
from .ingest import pooled_vector
from .records import Calibration, Progress
from .scoring import candidates_score, region_level, score_grid
from .store.banks import BankView
from .store.vectors import uses_two_stage

HOLDOUT, FOLDS = "calibration images", "folds"


@dataclass
class GoodMeasure:
    """One good image as a calibration sees it."""

    score: float  # image score
    level: float  # region level of its map (see scoring.region_level)
    pooled_distance: float  # its pooled vector's L2 distance to the nearest reference image
    stats: dict  # applicability.image_stats
    grid: np.ndarray  # (Hc, Wc) plain patch scores, from which the border profile is learned
    candidates: np.ndarray  # (n,) positions and (n,) scores the image score is taken from (scoring.score_candidates)
    candidate_scores: np.ndarray
    fold: int | None = None  # with folds of the bank: the fold it was scored in


FOLD_ORDERS = ("capture", "interleaved")


def check_fold_order(order: str) -> None:
    """BadInput unless `order` is one of FOLD_ORDERS (see fold_of)."""
    if order not in FOLD_ORDERS:
        raise BadInput(f"fold order must be one of {', '.join(FOLD_ORDERS)}, got {order!r}")


def capture_key(path: str) -> list:
    """Sort key of a file path in capture order: its digit runs compared as numbers ("part_9" < "part_10"),
    since cameras and line software name images by date, batch and counter."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def fold_of(paths: list, folds: int, order: str = "capture") -> np.ndarray:
    """(n,) fold number of each of the n image paths.

    "capture": contiguous runs in capture order (capture_key), so a fold is mostly one batch and is scored
    against a bank without its batch, as a new batch's good parts will be; "interleaved": every folds-th
    image in the given order (neighbours of one batch spread over all folds, which hides batch shift)."""
    check_fold_order(order)
    n = len(paths)
    if order == "interleaved":
        return np.arange(n) % folds
    ranked = sorted(range(n), key=lambda i: capture_key(paths[i]))
    fold = np.empty(n, np.int64)
    fold[ranked] = np.arange(n) * folds // max(n, 1)  # n // folds images per fold, the rest spread evenly
    return fold


def fold_spread(scores: np.ndarray, fold: np.ndarray, threshold: float, target_fpr: float) -> dict:
    """How much the folds disagree: (n,) good scores and (n,) fold numbers -> per fold, the threshold its own
    scores would give at target_fpr and the share of its scores above the calibrated `threshold`."""
    thresholds, false_alarms = [], []
    for f in np.unique(fold):
        own = np.asarray(scores)[fold == f]
        thresholds.append(float(threshold_for_fpr(own, target_fpr).threshold))
        false_alarms.append(float(np.mean(own > threshold)))
    return {"thresholds": thresholds, "false_alarms": false_alarms}


class Calibrator:
    """Calibrations of one index: `index` is the Engine (catalog, bank store, embedder, writer lock)."""

    def __init__(self, index):
        self.index = index

    def latest(self) -> dict | None:
        return self.index.catalog.latest_calibration()

    def current(self, generation: int | None = None) -> tuple[dict | None, str | None]:
        """(the calibration that gives verdicts on bank `generation` (default: the committed one) or None,
        a warning when there is none, or when it predates adds since)."""
        cal = self.latest()
        if cal is None:
            return None, "not calibrated: run `simsearch calibrate` (or POST .../calibrate) to get verdicts"
        if generation is None:
            generation = self.index.catalog.state()["generation"]
        if cal["generation"] != generation:
            return None, (f"calibration {cal['id']} was made on bank generation {cal['generation']}, the bank is now "
                          f"at {generation} after a change that can raise scores: recalibrate to get verdicts")
        predates = cal["details"].get("predates_adds_since")
        if predates is not None:
            return cal, (f"calibration {cal['id']} was measured on bank generation {predates}, before the adds since: "
                         "verdicts use its thresholds (false alarms stay near its rate, sensitivity may have "
                         "dropped); recalibrate to measure it again")
        return cal, None

    def default_min_region_area(self, height: int, width: int) -> int:
        """Two by two patch cells, in the pixels of an image of (height, width)."""
        config = self.index.config
        side = 2 * config.patch_stride / config.scale_for(height, width)
        return int(round(side * side))

    # -- measuring ----------------------------------------------------------------------------------------
    def _measure(self, img: Image, bank, other_pooled: np.ndarray, area: int,
                 profile: list[float] | None = None) -> GoodMeasure:
        """One good image scored against `bank` (its image score with the border `profile`, if given); its pooled
        distance to `other_pooled` ((M, D) references)."""
        scored = score_grid(bank, self.index.embedder.embed(img), self.index.config.search,
                            border_profile=profile)
        pooled = pooled_vector(scored.grid)
        distance = float(applicability.nearest_distances(pooled[None, :], other_pooled)[0])
        return GoodMeasure(scored.score, region_level(scored.anomaly_map, area), distance,
                           applicability.image_stats(img.rgb), scored.scores, scored.candidates,
                           scored.candidate_scores)

    def _with_borders(self, measure, view: BankView) -> tuple[list[GoodMeasure], list[float] | None]:
        """`measure(profile)` -> good measures, their image scores taken as a query takes them, and the border
        profile learned from them (borders.py; None when the configuration does not divide by it).

        On a flat bank the scores are taken again from each measure's candidates. On a two-stage bank the first
        pass refined its patches by the undivided rule, so a patch that the divided rule refines could keep its
        stage-1 distance (an upper bound): on every 4th Magnetic Tile train image with `two_stage="on"` the
        calibration's scores ran a median 1.5% (at most 4.7%) above the same images queried. There every image is
        measured again with the profile (twice the calibration's time) so the threshold means what it says."""
        measures = measure(None)
        search = self.index.config.search
        if search.border_discount == 0 or not measures:
            return measures, None
        profile = border_profile([m.grid for m in measures])
        # searched in two stages by the rule the scorer follows (without building the scorer to ask it)
        two_stage = getattr(view.patches, "two_stage", False)
        if two_stage or uses_two_stage(self.index.config.two_stage, view.patches.ntotal):
            return measure(profile), profile
        for m in measures:
            m.score = candidates_score(m.candidates, m.candidate_scores, search.image_top_k,
                                       border_divisors(m.grid.shape, profile, search.border_discount))
        return measures, profile

    def _held_measures(self, files: list[str], view: BankView, area: int, progress: Progress | None,
                       new_rows: dict | None = None, profile: list[float] | None = None) -> list[GoodMeasure]:
        """Calibration images scored against the whole bank (one measure per distinct image; `profile`: see
        `_measure`)."""
        _ids, pooled = view.images.all_vectors()
        bank = self.index.banks.scorer(view)
        measures, seen = [], set()
        for i, path in enumerate(files):
            if progress:
                progress("scoring", i, len(files))
            img = load_image(path)
            if img.sha256 in seen:
                continue  # the same image under another name: one score, not two
            seen.add(img.sha256)
            measures.append(self._measure(img, bank, pooled, area, profile))
            if new_rows is not None:
                new_rows[img.sha256] = dict(path=os.path.abspath(path), sha256=img.sha256, width=img.width,
                                            height=img.height, added_at=time.time())
        if progress:
            progress("scoring", len(files), len(files))
        return measures

    def _fold_measures(self, view: BankView, folds: int, area: int, progress: Progress | None,
                       conn=None, order: str = "capture", profile: list[float] | None = None) -> list[GoodMeasure]:
        """Every bank image scored against the bank without its fold (re-embedded from its file, all patches);
        folds in `order` (see fold_of). `conn`: a writer's transaction, whose rows `view` holds. `profile`: see
        `_measure`."""
        catalog = self.index.catalog
        refs = catalog.images("reference", conn)
        if len(refs) < 2:
            raise IndexNotReady(f"--folds needs at least 2 reference images, the index has {len(refs)}")
        folds = max(2, min(int(folds), len(refs)))
        owners = catalog.vector_owners(conn)
        pooled_ids, pooled = view.images.all_vectors()
        fold = fold_of([r["path"] for r in refs], folds, order)
        measures = []
        for f in range(folds):
            members = [refs[i] for i in np.flatnonzero(fold == f)]
            member_ids = np.asarray([r["id"] for r in members], np.int64)
            bank = view.patches.clone()
            bank.remove(owners[np.isin(owners[:, 1], member_ids), 0])
            if self.index.config.two_stage != "off":  # scored as queries will be: in two stages where they are
                images = view.images.clone()
                images.remove(member_ids)
                kept = owners[~np.isin(owners[:, 1], member_ids)]
                bank = self.index.banks.scorer_for(bank, images, lambda kept=kept: kept)
            others = pooled[~np.isin(pooled_ids, member_ids)]
            for row in members:
                if progress:
                    progress("scoring folds", len(measures), len(refs))
                img = load_image(row["path"])
                if img.sha256 != row["sha256"]:
                    raise ImageError(f"{row['path']}: changed since it was added to the bank; cannot score it")
                measures.append(self._measure(img, bank, others, area, profile))
                measures[-1].fold = f
        if progress:
            progress("scoring folds", len(refs), len(refs))
        return measures

    def _good_files(self, good: Iterable[str] | None) -> tuple[list[str], bool]:
        """(the good files to score, whether they were given rather than held out)."""
        catalog = self.index.catalog
        if good:
            given = list(good)
            files, _ = expand_paths(given)
            if not files:
                raise BadInput(f"no images in {', '.join(given)}")
            in_bank = catalog.known_hashes([load_image(p).sha256 for p in files])
            members = [r["path"] for r in in_bank.values() if r["role"] == "reference"]
            if members:
                raise BadInput(f"{len(members)} of these good images are in the bank (e.g. {members[0]}); "
                               "bank images score zero against themselves: calibrate with --folds instead")
            return files, True
        held = catalog.images("calibration")
        if not held:
            raise IndexNotReady("no calibration images: give good images that are not in the bank, calibrate on "
                                "the bank itself with --folds 5, or move some bank images out with "
                                "`simsearch index holdout`")
        return [r["path"] for r in held], False

    def _first_size(self, files: list[str]) -> tuple[int, int]:
        first = load_image(files[0])
        return first.height, first.width

    # -- calibrating --------------------------------------------------------------------------------------
    def calibrate(self, good: Iterable[str] | None = None, *, folds: int | None = None, target_fpr: float = 0.01,
                  defects: Iterable[str] | None = None, min_region_area: int | None = None,
                  progress: Progress | None = None, fold_order: str = "capture") -> Calibration:
        """Thresholds from good images outside the bank (default: the calibration images), or from folds of
        the bank (`folds`, in `fold_order`: see fold_of); see the module docstring and calibration.py."""
        if not 0 < target_fpr < 1:
            raise BadInput(f"target false-positive rate must be in (0, 1), got {target_fpr}")
        check_fold_order(fold_order)  # before any work
        if folds is not None and (good or folds < 2):
            raise BadInput("--folds takes no good images (it scores the bank's own) and needs K >= 2"
                           if good else f"--folds must be >= 2, got {folds}")
        good_files, given = ([], False) if folds is not None else self._good_files(good)
        defect_files = expand_paths(list(defects))[0] if defects else []
        if defects and not defect_files:
            raise BadInput(f"no images in {', '.join(defects)}")
        if min_region_area is None:  # sized on the first good image (images of one product share a size)
            sized = good_files or [r["path"] for r in self.index.catalog.images("reference")[:1]]
            if not sized:
                raise IndexNotReady("the index has no reference images yet (run `simsearch index add`)")
            min_region_area = self.default_min_region_area(*self._first_size(sized))
        area = int(min_region_area)
        if area < 1:
            raise BadInput(f"min region area must be >= 1 px, got {area}")
        view = self.index.banks.view()  # the generation every score below comes from
        if view.patches.ntotal == 0:
            raise IndexNotReady("the index has no reference images yet (run `simsearch index add`)")
        new_rows: dict = {}
        if folds is not None:
            measures, profile = self._with_borders(
                lambda p: self._fold_measures(view, folds, area, progress, order=fold_order, profile=p), view)
            source = {"kind": FOLDS, "folds": folds, "order": fold_order}
        else:
            measures, profile = self._with_borders(
                lambda p: self._held_measures(good_files, view, area, progress, new_rows, p), view)
            source = {"kind": HOLDOUT}
        defect_scores = [self.index.inspector.score(load_image(p), view, border_profile=profile).score
                         for p in defect_files]
        values = self._values(measures, defect_scores, target_fpr, area, view.generation, source, profile)
        catalog = self.index.catalog
        with self.index.writer_lock():
            with catalog.begin() as conn:
                if given:  # remember the given good images so that a later `calibrate` can re-score them
                    known = catalog.known_hashes(list(new_rows))
                    catalog.insert_calibration_images(conn, [r for s, r in new_rows.items() if s not in known])
                cal_id = catalog.insert_calibration(conn, values)
        return self._record(cal_id, values)

    def _values(self, measures: list[GoodMeasure], defect_scores: list[float], target_fpr: float, area: int,
                generation: int, source: dict, profile: list[float] | None) -> dict:
        """The calibrations row of these measures (`profile`: the border profile their scores were taken with)."""
        good_scores = [m.score for m in measures]
        levels = [m.level for m in measures]
        image_choice = threshold_for_fpr(np.asarray(good_scores), target_fpr)
        pixel_choice = threshold_for_fpr(np.asarray(levels), target_fpr)
        f1_t = f1 = None
        if defect_scores:
            f1_t, f1 = f1_best_threshold(np.asarray(good_scores), np.asarray(defect_scores))
        method = image_choice.describe("image") + "; " + pixel_choice.describe(f"pixel (regions of >= {area} px)")
        spread = None
        if source["kind"] == FOLDS:
            order = source.get("order", "interleaved")
            method += (f"; good scores from {source['folds']} folds of the bank ({order} order), each against the "
                       "bank without it (a smaller bank: false alarms at or below that rate)")
            spread = fold_spread(np.asarray(good_scores), np.asarray([m.fold for m in measures]),
                                 image_choice.threshold, target_fpr)
        limits = applicability.fit_limits([m.stats for m in measures], [m.pooled_distance for m in measures])
        return dict(generation=generation, target_fpr=target_fpr, image_threshold=image_choice.threshold,
                    pixel_threshold=pixel_choice.threshold, min_region_area=area, f1_threshold=f1_t,
                    n_good=len(good_scores), n_defect=len(defect_scores), method=method,
                    details={"good_scores": good_scores, "defect_scores": defect_scores, "region_levels": levels,
                             "expected_fpr": image_choice.expected_fpr, "k": image_choice.k,
                             "target_met": image_choice.target_met, "f1": f1, "source": source,
                             "applicability": limits, "fold_spread": spread,
                             "good_folds": [m.fold for m in measures], "border_profile": profile})

    @staticmethod
    def _record(cal_id: int, values: dict) -> Calibration:
        return Calibration(id=cal_id, image_threshold=values["image_threshold"],
                           pixel_threshold=values["pixel_threshold"], min_region_area=values["min_region_area"],
                           target_fpr=values["target_fpr"], expected_fpr=values["details"]["expected_fpr"],
                           n_good=values["n_good"], n_defect=values["n_defect"], method=values["method"],
                           f1_threshold=values["f1_threshold"], f1=values["details"]["f1"],
                           generation=values["generation"], fold_spread=values["details"]["fold_spread"],
                           border_profile=values["details"]["border_profile"])

    # -- after a write ------------------------------------------------------------------------------------
    def after_write(self, txn, change: str, recalibrate: bool) -> str | None:
        """Called by a writer inside its bank transaction, after `publish`: recalibrate on the new generation
        with the latest calibration's source and settings, committed with it; else, after an add that kept the
        bank's kind, carry the calibration over as predating it. `change`: "add" or "remove". Returns a note
        for the writer's report (why it did not recalibrate), or None."""
        catalog = self.index.catalog
        latest = catalog.latest_calibration(txn.conn)
        if latest is None or txn.published is None:
            return None
        note = None
        if recalibrate:
            try:
                values = self._recalibration(latest, txn.published, txn.conn)
                catalog.insert_calibration(txn.conn, values)
                return None
            except SimsearchError as exc:
                note = f"not recalibrated ({exc})"
        else:
            note = "not recalibrated (asked not to)"
        same_kind = txn.published.patches.kind == txn.base.patches.kind
        if change == "add" and same_kind and latest["generation"] == txn.base.generation:
            since = latest["details"].get("predates_adds_since", latest["generation"])
            catalog.carry_calibration(txn.conn, txn.base.generation, txn.published.generation,
                                      f"carried over to generation {txn.published.generation}, predating the add",
                                      {"predates_adds_since": since})
            return note + "; verdicts keep its thresholds, marked as predating the add"
        return note + "; verdicts are null until the index is recalibrated (scores can rise after a remove)"

    def _recalibration(self, latest: dict, view: BankView, conn) -> dict:
        """The latest calibration measured again on `view` (of the writer's transaction `conn`), from the same
        source with the same settings (labelled defects are not stored: the F1 threshold is left out)."""
        source = latest["details"].get("source", {"kind": HOLDOUT})
        area, target = int(latest["min_region_area"]), float(latest["target_fpr"])
        if source["kind"] == FOLDS:
            # Calibrations from before fold orders existed used interleaved folds.
            measures, profile = self._with_borders(lambda p: self._fold_measures(
                view, int(source["folds"]), area, None, conn, source.get("order", "interleaved"), p), view)
        else:
            held = self.index.catalog.images("calibration", conn)
            if not held:
                raise IndexNotReady("the index holds no calibration images")
            measures, profile = self._with_borders(
                lambda p: self._held_measures([r["path"] for r in held], view, area, None, profile=p), view)
        return self._values(measures, [], target, area, view.generation, source, profile)
