"""Calibration of an index: thresholds from good images outside the bank, stored in the catalog, and
whether the latest one is fresh for the bank a query scores against. The threshold rule itself (order
statistics) is in calibration.py.

A calibration records the bank generation it was measured on: the one its scores came from (the view
taken before scoring), never a later one a writer committed meanwhile.
"""
from __future__ import annotations

import os
import time
from typing import Iterable

import numpy as np

from .calibration import f1_best_threshold, threshold_for_fpr
from .errors import BadInput, IndexNotReady
from .images import expand_paths, load_image
from .records import Calibration, Progress
from .scoring import region_level


class Calibrator:
    """Calibrations of one index: `index` is the Engine (catalog, bank store, inspector, writer lock)."""

    def __init__(self, index):
        self.index = index

    def latest(self) -> dict | None:
        return self.index.catalog.latest_calibration()

    def current(self, generation: int | None = None) -> tuple[dict | None, str | None]:
        """(latest calibration if fresh for bank `generation` (default: the committed one), warning if there
        is none or it is stale)."""
        cal = self.latest()
        if cal is None:
            return None, "not calibrated: run `simsearch calibrate` to get verdicts"
        if generation is None:
            generation = self.index.catalog.state()["generation"]
        if cal["generation"] != generation:
            return None, (f"calibration {cal['id']} was made on bank generation {cal['generation']}, the bank is now "
                          f"at {generation}: run `simsearch calibrate` again to get verdicts")
        return cal, None

    def default_min_region_area(self, height: int, width: int) -> int:
        """Two by two patch cells, in the pixels of an image of (height, width)."""
        config = self.index.config
        side = 2 * config.patch_stride / config.scale_for(height, width)
        return int(round(side * side))

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
                               "bank images score zero against themselves and cannot calibrate")
            return files, True
        held = catalog.images("calibration")
        if not held:
            raise IndexNotReady("no held-out images to calibrate on: give good images that are not in the bank, "
                                "or add images with --holdout")
        return [r["path"] for r in held], False

    def calibrate(self, good: Iterable[str] | None = None, *, target_fpr: float = 0.01,
                  defects: Iterable[str] | None = None, min_region_area: int | None = None,
                  progress: Progress | None = None) -> Calibration:
        """Thresholds from good images outside the bank (default: the held-out ones); see calibration.py."""
        if not 0 < target_fpr < 1:
            raise BadInput(f"target false-positive rate must be in (0, 1), got {target_fpr}")
        good_files, given = self._good_files(good)
        defect_files = expand_paths(list(defects))[0] if defects else []
        if defects and not defect_files:
            raise BadInput(f"no images in {', '.join(defects)}")
        if min_region_area is None:  # sized on the first good image (images of one product share a size)
            first = load_image(good_files[0])
            min_region_area = self.default_min_region_area(first.height, first.width)
        area = int(min_region_area)
        if area < 1:
            raise BadInput(f"min region area must be >= 1 px, got {area}")
        view = self.index.banks.view()  # the generation every score below comes from
        inspector = self.index.inspector
        total = len(good_files) + len(defect_files)
        good_scores, levels, defect_scores, new_rows = [], [], [], {}
        for i, path in enumerate(good_files + defect_files):
            if progress:
                progress("scoring", i, total)
            img = load_image(path)
            if i < len(good_files) and img.sha256 in new_rows:
                continue  # the same image under another name: one score, not two
            scored = inspector.score(img, view)
            if i < len(good_files):
                good_scores.append(scored.score)
                levels.append(region_level(scored.anomaly_map, area))
                new_rows.setdefault(img.sha256, dict(path=os.path.abspath(path), sha256=img.sha256, width=img.width,
                                                     height=img.height, added_at=time.time()))
            else:
                defect_scores.append(scored.score)
        if progress:
            progress("scoring", total, total)
        image_choice = threshold_for_fpr(np.asarray(good_scores), target_fpr)
        pixel_choice = threshold_for_fpr(np.asarray(levels), target_fpr)
        f1_t = f1 = None
        if defect_scores:
            f1_t, f1 = f1_best_threshold(np.asarray(good_scores), np.asarray(defect_scores))
        method = image_choice.describe("image") + "; " + pixel_choice.describe(f"pixel (regions of >= {area} px)")
        catalog = self.index.catalog
        with self.index.writer_lock():
            if given:  # remember the given good images so that a later `calibrate` can re-score them
                known = catalog.known_hashes(list(new_rows))
                with catalog.begin() as conn:
                    catalog.insert_calibration_images(conn, [r for s, r in new_rows.items() if s not in known])
            cal_id = catalog.add_calibration(dict(
                generation=view.generation, target_fpr=target_fpr, image_threshold=image_choice.threshold,
                pixel_threshold=pixel_choice.threshold, min_region_area=area, f1_threshold=f1_t,
                n_good=len(good_scores), n_defect=len(defect_scores), method=method,
                details={"good_scores": good_scores, "defect_scores": defect_scores, "region_levels": levels,
                         "expected_fpr": image_choice.expected_fpr, "k": image_choice.k,
                         "target_met": image_choice.target_met, "f1": f1}))
        return Calibration(id=cal_id, image_threshold=image_choice.threshold, pixel_threshold=pixel_choice.threshold,
                           min_region_area=area, target_fpr=target_fpr, expected_fpr=image_choice.expected_fpr,
                           n_good=len(good_scores), n_defect=len(defect_scores), method=method,
                           f1_threshold=f1_t, f1=f1, generation=view.generation)
