"""Inspection: scoring an image against the bank (query), the most similar reference images (search), and
the nearest good patch that explains a flag.

Every answer is computed from one `BankView` taken at its start, and the calibration is judged fresh
against that same view's generation, so a result never mixes two states of the index.
"""
from __future__ import annotations

import os

import numpy as np

from . import applicability
from .drift import drift_line
from .errors import IndexNotReady
from .images import Image, load_image
from .ingest import pooled_vector
from .records import NearestReference, QueryResult, RegionResult
from .scoring import ScoredImage, find_regions, score_grid, similarity_from_score
from .store.banks import BankView


# On a two-stage bank, patches whose stage-1 score passes this fraction of the pixel threshold are searched fully:
# a region's outline at the threshold comes from exact patch scores (docs/benchmarks.md, "Two-stage search").
REFINE_FROM = 0.8


class Inspector:
    """query / search / nearest for one index: `index` is the Engine (embedder, bank store, catalog,
    calibrations)."""

    def __init__(self, index):
        self.index = index
        self._drift_lines: dict[int, tuple[float, int, int]] = {}  # calibration id -> drift.drift_line

    def score(self, image: Image, view: BankView, cal: dict | None = None,
              border_profile: list[float] | None = None) -> ScoredImage:
        """One image through the scoring chain against `view`'s patch bank (searched in two stages where the
        configuration says so: then every patch near `cal`'s pixel threshold is searched fully, see
        REFINE_FROM), its image score taken with `cal`'s border profile (or the one given; none before a
        calibration)."""
        if view.patches.ntotal == 0:
            raise IndexNotReady("the index has no reference images yet (run `simsearch index add`)")
        grid = self.index.embedder.embed(image)
        floor = REFINE_FROM * cal["pixel_threshold"] if cal and cal.get("pixel_threshold") else None
        if border_profile is None and cal is not None:
            border_profile = cal["details"].get("border_profile")
        return score_grid(self.index.banks.scorer(view), grid, self.index.config.search, floor, border_profile)

    def query(self, image: str | os.PathLike | np.ndarray | Image) -> QueryResult:
        return self.query_many([image])[0]

    def query_many(self, images: list) -> list[QueryResult]:
        """Each image's QueryResult, all against one bank view and the calibration judged on it."""
        decoded = [load_image(image) for image in images]
        view = self.index.banks.view()
        cal, warning = self.index.calibrations.current(view.generation)
        results = [self.result(img, self.score(img, view, cal), view, cal, warning) for img in decoded]
        if cal is not None and self.index.record_queries:
            line, k, n_cal = self._drift_line(cal)
            self.index.query_log.record([(cal["id"], r.score, r.score > line, k, n_cal)
                                         for r in results if r.comparable is not False])
        return results

    def _drift_line(self, cal: dict) -> tuple[float, int, int]:
        if cal["id"] not in self._drift_lines:
            self._drift_lines[cal["id"]] = drift_line(cal["details"]["good_scores"])
        return self._drift_lines[cal["id"]]

    def applies(self, img: Image, scored: ScoredImage, view: BankView, cal: dict | None) -> str | None:
        """None when `img` is comparable with the bank by `cal`'s limits (or they are unknown), else why not."""
        limits = (cal or {}).get("details", {}).get("applicability")
        if limits is None or view.images.ntotal == 0:
            return None
        distance = float(view.images.search(pooled_vector(scored.grid)[None, :], 1)[0][0, 0])
        return applicability.judge(limits, applicability.image_stats(img.rgb), distance)

    def result(self, img: Image, scored: ScoredImage, view: BankView, cal: dict | None,
               warning: str | None) -> QueryResult:
        """A scored image as the API's QueryResult: verdict, regions with their nearest good patches, peak."""
        amap = scored.anomaly_map
        regions = []
        foreign = self.applies(img, scored, view, cal)
        comparable = None if cal is None or "applicability" not in cal["details"] else foreign is None
        if foreign is not None:
            warning = f"not comparable with the bank: {foreign}; no verdict" + (f" ({warning})" if warning else "")
        if cal is not None and foreign is None:
            for r in find_regions(amap, cal["pixel_threshold"], cal["min_region_area"]):
                regions.append(RegionResult(r.x, r.y, r.w, r.h, r.area, r.score, self.nearest(scored, *r.peak)))
        prow, pcol = np.unravel_index(int(np.argmax(scored.scores)), scored.scores.shape)
        px, py, pw, ph = (int(v) for v in scored.grid.cell_boxes()[prow, pcol])
        peak = RegionResult(px, py, pw, ph, pw * ph, float(scored.scores[prow, pcol]),
                            self.nearest(scored, px + pw // 2, py + ph // 2))
        threshold = cal["image_threshold"] if cal else None
        return QueryResult(
            image=img.source, score=scored.score, threshold=threshold,
            is_anomalous=None if cal is None or foreign is not None else bool(scored.score > threshold),
            similarity=similarity_from_score(scored.score, threshold), regions=regions, peak=peak,
            anomaly_map=amap, generation=view.generation, calibration_id=cal["id"] if cal else None,
            fingerprint=self.index.config.fingerprint, warning=warning,
            pixel_threshold=cal["pixel_threshold"] if cal else None, comparable=comparable,
            calibration_generation=cal["details"].get("predates_adds_since", cal["generation"]) if cal else None)

    def nearest(self, scored: ScoredImage, x: int, y: int) -> NearestReference | None:
        """The good patch nearest to the query's patch cell at pixel (x, y)."""
        grid = scored.grid
        h0, w0 = grid.original_size
        row = min(int(y * grid.layout.height / h0) // grid.layout.cell, grid.grid_shape[0] - 1)
        col = min(int(x * grid.layout.width / w0) // grid.layout.cell, grid.grid_shape[1] - 1)
        vid = int(scored.nearest_ids[row, col])
        ref = self.index.catalog.describe_vectors([vid]).get(vid)
        if ref is None:
            return None
        return NearestReference(image=ref["path"], x=int(ref["x"]), y=int(ref["y"]),
                                distance=float(scored.nearest_distances[row, col]), sha256=ref["sha256"])

    def search(self, image: str | os.PathLike | np.ndarray, k: int = 5) -> list[dict]:
        """The k reference images most similar overall (cosine of mean-pooled patch vectors)."""
        img = load_image(image)
        view = self.index.banks.view()
        if view.images.ntotal == 0:
            raise IndexNotReady("the index has no reference images yet (run `simsearch index add`)")
        q = pooled_vector(self.index.embedder.embed(img))[None, :]
        distances, ids = view.images.search(q, min(k, view.images.ntotal))
        rows = {r["id"]: r for r in self.index.catalog.images("reference")}
        hits = []
        for d, i in zip(distances[0], ids[0]):
            if i < 0 or int(i) not in rows:
                continue
            hits.append({"image": rows[int(i)]["path"], "sha256": rows[int(i)]["sha256"], "distance": float(d),
                         "cosine": float(np.clip(1.0 - d * d / 2.0, -1.0, 1.0))})
        return hits
