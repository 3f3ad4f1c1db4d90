"""What the engine returns, and the one JSON record of a query.

`QueryResult` (with its regions and nearest references) is the Python API's answer; `query_record` is the
only way it becomes JSON: `simsearch query --json` prints it, the server answers it (adding only what an
HTTP client needs: thumbnails, the image size, a query id), and the server's OpenAPI schema is built from
`QueryRecord` below, the same keys. `Progress` is the one progress-callback convention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

Progress = Callable[[str, int, int], None]  # (stage, done, total); a stage ends with done == total


@dataclass
class NearestReference:
    image: str  # reference image path as stored (absolute)
    x: int  # top-left of the reference patch, in that image's pixels
    y: int
    distance: float  # L2 distance between the two patch vectors
    sha256: str = ""  # the reference image's content hash (names it without a server path)


@dataclass
class RegionResult:
    x: int  # bounding box in the query image's pixels, (x, y) top-left
    y: int
    w: int
    h: int
    area: int  # pixels above the pixel threshold in this region
    score: float  # the anomaly map's maximum in the region
    nearest: NearestReference | None


@dataclass
class QueryResult:
    image: str  # the path exactly as given, or "<array>"
    # mean of the image_top_k highest patch distances to the bank (L2), sparse-bank discounted and divided near the
    # image's edges by the calibration's border profile (borders.py; none before a calibration)
    score: float
    threshold: float | None  # image threshold of a fresh calibration, else None
    is_anomalous: bool | None  # None without a fresh calibration
    similarity: float | None  # 0.5 ** (score / threshold): 1 identical, 0.5 at the threshold
    regions: list[RegionResult]
    peak: RegionResult  # the single most anomalous patch, with its nearest reference
    anomaly_map: np.ndarray = field(repr=False)  # (H, W) float32 at the image's own resolution
    generation: int = 0  # the bank generation scored against
    calibration_id: int | None = None
    fingerprint: str = ""
    warning: str | None = None
    heatmap: str | None = None
    pixel_threshold: float | None = None  # of the calibration used, for heatmaps
    # Whether the image is the kind the bank holds (applicability.py); False: no verdict, the reason in warning.
    # None without a calibration that measured it.
    comparable: bool | None = None
    calibration_generation: int | None = None  # the bank generation the calibration was measured on

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("anomaly_map")
        return d


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)  # paths now in the bank
    held_out: list[str] = field(default_factory=list)  # paths kept for calibration
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    vectors_added: int = 0
    generation: int = 0
    calibration: str | None = None  # why the add did not recalibrate, or None


@dataclass
class Calibration:
    id: int
    image_threshold: float
    pixel_threshold: float
    min_region_area: int
    target_fpr: float
    expected_fpr: float
    n_good: int
    n_defect: int
    method: str
    f1_threshold: float | None = None
    f1: float | None = None
    generation: int = 0
    # With folds of the bank: per fold, the threshold its own scores give and its share above this threshold
    # (calibrator.fold_spread); a wide spread means batches differ and the promise is fragile.
    fold_spread: dict | None = None
    # Per ring of patch cells from the image's edge (outermost first): how much higher good images scored there
    # than inside (borders.py); the image score divides by these to the configuration's power. None: not used.
    border_profile: list | None = None


# -- the JSON record: keys and units as the README documents them ----------------------------------------
@dataclass
class NearestRecord:
    image: Optional[str]  # server path of the reference (the server shows it only with --expose-paths)
    sha256: str  # content hash of the good reference image
    x: int  # top-left corner of the nearest good patch, in that image's pixels
    y: int
    distance: float  # L2 distance between the two patch vectors
    thumbnail: Optional[str] = None  # (server) URL of a crop of the reference around that patch


@dataclass
class RegionRecord:
    x: int
    y: int
    w: int
    h: int
    area: int
    score: float
    nearest: Optional[NearestRecord]


@dataclass
class QueryRecord:
    image: str  # the path (or uploaded file name) as given
    score: float
    threshold: Optional[float]
    is_anomalous: Optional[bool]  # null without a fresh calibration (see warning)
    similarity: Optional[float]
    regions: list[RegionRecord]
    peak: RegionRecord
    heatmap: Optional[str]  # the heatmap file written, or (server) its URL or data: URI
    distance: str
    generation: int
    calibration_id: Optional[int]
    fingerprint: str
    warning: Optional[str]
    comparable: Optional[bool]  # false: not the kind of image the bank holds, is_anomalous is null (see warning)
    calibration_generation: Optional[int]  # below `generation`: the calibration predates adds since
    # (server) what an HTTP client needs besides: the query's id for its images, the image's size
    query_id: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None


SERVER_ONLY = {"query_id", "width", "height"}
NEAREST_SERVER_ONLY = {"thumbnail"}


def _nearest(n: NearestReference | None) -> NearestRecord | None:
    return None if n is None else NearestRecord(image=n.image, sha256=n.sha256, x=n.x, y=n.y,
                                                distance=round(n.distance, 6))


def _region(r: RegionResult) -> RegionRecord:
    return RegionRecord(r.x, r.y, r.w, r.h, r.area, round(r.score, 6), _nearest(r.nearest))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def to_record(result: QueryResult) -> QueryRecord:
    return QueryRecord(
        image=result.image, score=round(result.score, 6), threshold=_round(result.threshold),
        is_anomalous=result.is_anomalous, similarity=_round(result.similarity),
        regions=[_region(r) for r in result.regions], peak=_region(result.peak), heatmap=result.heatmap,
        distance="l2", generation=result.generation, calibration_id=result.calibration_id,
        fingerprint=result.fingerprint, warning=result.warning, comparable=result.comparable,
        calibration_generation=result.calibration_generation)


def record_dict(record: QueryRecord) -> dict:
    """The record as JSON-ready dict; the server-only keys are left out while unset."""
    d = asdict(record)
    for key in SERVER_ONLY:
        if d[key] is None:
            d.pop(key)
    for region in [*d["regions"], d["peak"]]:
        if region["nearest"] is not None and region["nearest"]["thumbnail"] is None:
            region["nearest"].pop("thumbnail")
    return d


def query_record(result: QueryResult) -> dict:
    """The JSON line of one query (see README: keys and units)."""
    return record_dict(to_record(result))
