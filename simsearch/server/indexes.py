"""The indexes a server answers for, and what it does with them: queries, adds, removes, calibrations.

Every served index has one reader `Engine`, shared by all query threads. The Engine re-reads the bank
generation and the latest calibration on every query, so a change the CLI commits is seen by the next
request; the reader is reopened when the index's database file was replaced (an index deleted and built
again). Writes (add, remove, calibrate) run on a fresh Engine of their own, so the banks the readers
search are never modified under them; the Engine's flock orders them with CLI writers.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..engine import Engine
from ..errors import BadInput, ImageTooLarge, IndexUnavailable, RequestRefused, SimsearchError, UnknownIndex
from ..images import Image, decode, header_size
from ..overlay import heatmap_overlay
from ..records import AddReport, QueryResult, query_record
from .uploads import Upload

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Models:
    """One loaded model per embedder fingerprint in this process, shared by every Engine that needs it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_fingerprint: dict = {}  # fingerprint -> Embedder

    def attach(self, engine: Engine) -> Engine:
        fingerprint = engine.config.fingerprint
        with self._lock:  # the first request loads it; the others wait rather than load it again
            if fingerprint not in self._by_fingerprint:
                self._by_fingerprint[fingerprint] = engine.embedder
        engine.use_embedder(self._by_fingerprint[fingerprint])
        return engine


@dataclass(frozen=True)
class Exposure:
    """What answers may show, and what uploads may be."""

    expose_paths: bool = False  # server paths (off: sha256 and thumbnail URLs only; paths in messages hidden)
    max_pixels: int = 50_000_000  # per uploaded image, checked from its header before decoding
    max_request_pixels: int = 100_000_000  # all images of one request together: bounds a request's work


@dataclass
class RecentQuery:
    id: str
    created_at: float
    record: dict  # the public JSON record of the query
    preview_png: bytes  # a small heatmap overlay for the gallery


@dataclass
class ServedIndex:
    name: str
    directory: Path
    models: Models
    exposure: Exposure = field(default_factory=Exposure)
    keep_recent: int = 24
    keep_heatmap_bytes: int = 64 * 2**20
    _reader: Engine | None = field(default=None, repr=False)
    _identity: tuple[int, int] | None = field(default=None, repr=False)
    _open_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _write_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _recent_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _recent: deque = field(default_factory=deque, repr=False)
    _heatmaps: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def database(self) -> Path:
        return self.directory / Engine.DB

    def _database_identity(self) -> tuple[int, int]:
        try:
            st = os.stat(self.database)
        except FileNotFoundError:
            raise IndexUnavailable(f"index {self.name!r} has no index yet (run `simsearch index add`)") from None
        return st.st_dev, st.st_ino

    def ready(self) -> bool:
        return self.database.is_file()

    def reader(self) -> Engine:
        """The shared reader, reopened if the database file is no longer the one it opened."""
        identity = self._database_identity()
        if self._reader is not None and self._identity == identity:
            return self._reader
        with self._open_lock:
            if self._reader is None or self._identity != identity:
                try:
                    engine = Engine.open(self.directory)
                except SimsearchError as exc:
                    raise IndexUnavailable(f"index {self.name!r}: {exc}") from None
                try:
                    self.models.attach(engine)
                except SimsearchError as exc:  # e.g. its weights file is missing
                    engine.close()
                    raise IndexUnavailable(f"index {self.name!r}: {exc}") from None
                old, self._reader, self._identity = self._reader, engine, identity
                if old is not None:
                    old.close()  # queries still holding it keep their checked-out connections
            return self._reader

    @contextlib.contextmanager
    def writer(self):
        """A fresh Engine for one write; in-process writers queue here, other processes at the Engine's flock."""
        self.reader()  # same errors as a read when the index is missing; loads the shared model
        with self._write_lock:
            engine = Engine.open(self.directory)
            try:
                yield self.models.attach(engine)
            finally:
                engine.close()

    def close(self) -> None:
        with self._open_lock:
            if self._reader is not None:
                self._reader.close()
            self._reader = self._identity = None

    # -- the gallery of recent queries and their heatmaps ------------------------------------
    def remember(self, entry: RecentQuery, heatmap_png: bytes | None) -> None:
        with self._recent_lock:
            self._recent.append(entry)
            while len(self._recent) > self.keep_recent:
                self._recent.popleft()
            if heatmap_png is not None:
                self._heatmaps[entry.id] = heatmap_png
                while sum(len(v) for v in self._heatmaps.values()) > self.keep_heatmap_bytes:
                    self._heatmaps.popitem(last=False)

    def recent(self, limit: int) -> list[RecentQuery]:
        with self._recent_lock:
            return list(self._recent)[-limit:][::-1]  # newest first

    def recent_query(self, query_id: str) -> RecentQuery | None:
        with self._recent_lock:
            return next((q for q in self._recent if q.id == query_id), None)

    def heatmap(self, query_id: str) -> bytes | None:
        with self._recent_lock:
            return self._heatmaps.get(query_id)


    # -- what clients ask of it ----------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"/v1/indexes/{self.name}"

    def decode_all(self, uploads: list[Upload]) -> list[Image]:
        """Every upload decoded, or an error and none: each within the pixel limit, all of them together within
        the request's (from their headers, before any is decoded; the work of a request grows with its pixels)."""
        total = sum(w * h for w, h in (header_size(u.data) or (0, 0) for u in uploads))
        if total > self.exposure.max_request_pixels:
            raise ImageTooLarge(f"{len(uploads)} images of {total} pixels in all, over the limit of "
                                f"{self.exposure.max_request_pixels} pixels per request (--max-request-pixels)")
        return [u.decode(self.exposure.max_pixels) for u in uploads]

    def query(self, uploads: list[Upload], heatmap: str) -> list[dict]:
        """Each upload's `simsearch query --json` record, all from one bank generation and one calibration."""
        images = self.decode_all(uploads)
        results = self.reader().query_many(images)  # one bank view and one calibration for all of them
        records = []
        for img, result in zip(images, results):
            pixel_threshold = result.pixel_threshold
            record = self._public_record(result, img.width, img.height)
            record["query_id"] = query_id = uuid.uuid4().hex[:16]
            heatmap_png = None
            if heatmap != "none":
                heatmap_png = _png(heatmap_overlay(img.rgb, result.anomaly_map, pixel_threshold, result.regions,
                                                   score=result.score, image_threshold=result.threshold))
                record["heatmap"] = (f"{self.url}/queries/{query_id}/heatmap.png" if heatmap == "url" else
                                     "data:image/png;base64," + base64.b64encode(heatmap_png).decode())
            kept = heatmap_png if heatmap == "url" else None
            self.remember(RecentQuery(query_id, time.time(), dict(record, heatmap=record["heatmap"] if kept else None),
                                      _preview_png(img.rgb, result.anomaly_map, pixel_threshold)), kept)
            records.append(record)
        return records

    def _public_record(self, result: QueryResult, width: int, height: int) -> dict:
        record = query_record(result)
        cell = max(result.peak.w, result.peak.h)  # one patch cell, in the query's pixels
        for region in [*record["regions"], record["peak"]]:
            region["nearest"] = self._public_nearest(region["nearest"], region, cell)
        record.update(width=width, height=height)
        return record

    def _public_nearest(self, nearest: dict | None, box: dict, cell: int) -> dict | None:
        """A nearest reference as sha256 + thumbnail URL (its server path only when exposed)."""
        if nearest is None:
            return None
        # The crop: the region's size (at least 2 x 2 patch cells) centred on the nearest good patch.
        w, h = max(box["w"], 2 * cell), max(box["h"], 2 * cell)
        x, y = max(0, nearest["x"] + cell // 2 - w // 2), max(0, nearest["y"] + cell // 2 - h // 2)
        out = {k: nearest[k] for k in ("sha256", "x", "y", "distance")}
        out["thumbnail"] = f"{self.url}/references/{out['sha256']}/thumbnail?x={x}&y={y}&w={w}&h={h}"
        out["image"] = nearest["image"] if self.exposure.expose_paths else None
        return out

    def overview(self) -> dict:
        engine = self.reader()
        info = engine.info()
        if not self.exposure.expose_paths:
            info.pop("index", None)
        info["calibration"] = calibration_summary(engine)
        return {"name": self.name, **info}

    def images(self, role: str | None) -> list[dict]:
        keys = ("sha256", "role", "width", "height", "added_at", "n_vectors")
        return [{**{k: row[k] for k in keys}, **({"image": row["path"]} if self.exposure.expose_paths else {})}
                for row in self.reader().images(role)]

    def drift(self) -> dict:
        return self.reader().drift()

    def add(self, uploads: list[Upload], holdout: float, coreset: float | None, recalibrate: bool = True) -> dict:
        """Add uploaded good images; their bytes are kept in <index>/uploads/ so that `index repair` can re-embed."""
        self.decode_all(uploads)  # all readable, or nothing is stored
        skipped, fresh = [], {}
        with self.writer() as engine:
            known = engine.known_images([u.sha256 for u in uploads])
            for upload in uploads:
                sha = upload.sha256
                if sha in known:
                    skipped.append({"image": upload.name, "sha256": sha,
                                    "reason": f"already in the index ({known[sha]['role']} image)"})
                elif sha in fresh:
                    skipped.append({"image": upload.name, "sha256": sha,
                                    "reason": f"same image as {fresh[sha].name} in this request"})
                else:
                    fresh[sha] = upload
            folder = self.directory / "uploads"
            folder.mkdir(exist_ok=True)
            stored, created = {}, []
            for sha, upload in fresh.items():
                path = folder / f"{sha}{upload.suffix()}"
                if not path.exists():
                    tmp = path.with_name(path.name + ".tmp")
                    tmp.write_bytes(upload.data)
                    os.replace(tmp, path)
                    created.append(path)
                stored[str(path)] = sha
            report = None
            try:
                report = (engine.add(list(stored), holdout=holdout, coreset=coreset, recalibrate=recalibrate)
                          if stored else AddReport(generation=engine.generation))  # every upload known already
            finally:  # a file not taken (an error, or a CLI writer added the same image first) is not kept
                taken = set(report.added + report.held_out) if report else set()
                for path in created:
                    if str(path) not in taken:
                        path.unlink(missing_ok=True)
            _cal, warning = engine.current_calibration()
        skipped += [{"image": fresh[stored[p]].name, "sha256": stored[p], "reason": why}
                    for p, why in report.skipped if p in stored]
        return {"added": [stored[p] for p in report.added], "held_out": [stored[p] for p in report.held_out],
                "skipped": skipped, "vectors_added": report.vectors_added, "generation": report.generation,
                "calibration": report.calibration, "warning": warning}

    def remove(self, sha256: str, recalibrate: bool = True) -> dict:
        with self.writer() as engine:
            found, _missing = engine.find_images([sha256])
            if not found:
                raise RequestRefused(404, f"no image with sha256 {sha256} in index {self.name!r}")
            result = engine.remove([sha256], recalibrate=recalibrate)
            uploads = (self.directory / "uploads").resolve()
            for row in found:  # an uploaded file goes with its image
                path = Path(row["path"]).resolve()
                if path.parent == uploads:
                    path.unlink(missing_ok=True)
            _cal, warning = engine.current_calibration()
        return {"removed": [r["sha256"] for r in found], "vectors_removed": result["vectors_removed"],
                "generation": result["generation"], "calibration": result["calibration"], "warning": warning}

    def calibrate(self, target_fpr: float, min_region_area: int | None, folds: int | None = None,
                  fold_order: str = "capture") -> dict:
        """Thresholds from the good images the index stores outside its bank (held out, or given before), or
        from `folds` folds of the bank itself (in `fold_order`)."""
        with self.writer() as engine:
            cal = engine.calibrate(None, folds=folds, target_fpr=target_fpr, min_region_area=min_region_area,
                                   fold_order=fold_order)
            summary = calibration_summary(engine)
        return {**asdict(cal), **{k: summary[k] for k in ("target_false_alarms_per_100_good",
                                                           "expected_false_alarms_per_100_good")}}

    def thumbnail(self, sha256: str, x: int, y: int, w: int | None, h: int | None, size: int) -> bytes:
        """A PNG crop of a stored image, shifted inside it (never cut smaller), its longer side `size` px."""
        row = self.reader().known_images([sha256]).get(sha256)
        if row is None:
            raise RequestRefused(404, f"no image with sha256 {sha256} in index {self.name!r}")
        rgb = _stored_pixels.get(row["path"], sha256)
        height, width = rgb.shape[:2]
        w, h = min(w or width, width), min(h or height, height)
        x, y = min(x, width - w), min(y, height - h)
        factor = size / max(w, h)
        crop = cv2.resize(rgb[y:y + h, x:x + w], (max(1, round(w * factor)), max(1, round(h * factor))),
                          interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
        return _png(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))


class Registry:
    """Indexes named on the command line (NAME=DIR) and/or every index folder inside a root folder."""

    def __init__(self, named: dict[str, Path], root: Path | None = None, exposure: Exposure = Exposure(),
                 keep_recent: int = 24):
        for name in named:
            if not NAME_PATTERN.match(name):
                raise BadInput(f"index name {name!r}: use letters, digits, '.', '_' and '-' (up to 64)")
        self.root = root
        self.models = Models()
        self._new = functools.partial(ServedIndex, models=self.models, exposure=exposure, keep_recent=keep_recent)
        self._lock = threading.Lock()
        self._served = {name: self._new(name, Path(d)) for name, d in named.items()}

    def names(self) -> list[str]:
        found = set(self._served)
        if self.root is not None and self.root.is_dir():
            found |= {p.name for p in self.root.iterdir() if NAME_PATTERN.match(p.name) and Engine.exists(p)}
        return sorted(found)

    def get(self, name: str) -> ServedIndex:
        served = self._served.get(name)
        if served is not None:
            return served
        # An index built under the root folder after the server started is served from its first request.
        if self.root is not None and NAME_PATTERN.match(name) and Engine.exists(self.root / name):
            with self._lock:
                return self._served.setdefault(name, self._new(name, self.root / name))
        raise UnknownIndex(f"no index named {name!r} is served here (served: {', '.join(self.names()) or 'none'})")

    def hide_paths(self, message: str) -> str:
        """`message` with the served folders' paths replaced by the index's name (`<index NAME>`) and the root's
        by `<root>`: a client learns which index, not where it lives on the server."""
        places = [(str(s.directory), f"<index {s.name}>") for s in list(self._served.values())]
        if self.root is not None:
            places.append((str(self.root), "<root>"))
        forms = {form: label for place, label in places for form in (place, str(Path(place).resolve()))
                 if os.path.isabs(form) and form != os.sep}
        for form in sorted(forms, key=len, reverse=True):  # a folder inside the root before the root
            message = message.replace(form, forms[form])
        return message

    def close(self) -> None:
        for served in self._served.values():
            served.close()


def calibration_summary(engine: Engine) -> dict | None:
    """The latest calibration, with what its threshold means in false alarms per 100 good parts."""
    latest = engine.latest_calibration()
    if latest is None:
        return None
    expected = latest["details"].get("expected_fpr")
    return {**{k: latest[k] for k in ("id", "image_threshold", "pixel_threshold", "min_region_area", "target_fpr",
                                      "f1_threshold", "n_good", "n_defect", "generation", "method")},
            "expected_fpr": expected,
            "target_false_alarms_per_100_good": round(100 * latest["target_fpr"], 4),
            "expected_false_alarms_per_100_good": None if expected is None else round(100 * expected, 4)}


class PixelCache:
    """Decoded stored images for thumbnails, least recently used out first, bounded by bytes: one image at the
    50 MP limit decodes to 150 MB, so a bound by count would not bound memory. An image larger than the
    whole budget is decoded for its request and not kept."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._items.values())

    def get(self, path: str, sha256: str) -> np.ndarray:
        """A stored image's pixels, from the path its catalog row holds (never one a client names)."""
        key = (path, sha256)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        try:
            data = Path(path).read_bytes()
        except OSError:
            raise RequestRefused(404, f"the file of image {sha256} is no longer on the server") from None
        if Upload("", data).sha256 != sha256:
            raise RequestRefused(409, f"the file of image {sha256} has changed since it was added")
        rgb = decode(data, sha256)  # the size limit it passed when it was added
        if rgb.nbytes <= self.max_bytes:
            with self._lock:
                self._items[key] = rgb
                total = sum(a.nbytes for a in self._items.values())
                while total > self.max_bytes:
                    _, dropped = self._items.popitem(last=False)
                    total -= dropped.nbytes
        return rgb


_stored_pixels = PixelCache()


def _png(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _preview_png(rgb: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None, side: int = 240) -> bytes:
    """A small heatmap overlay for the gallery (scaled down before colouring: cheap on large images)."""
    h, w = anomaly_map.shape
    factor = min(1.0, side / max(h, w))
    if factor < 1.0:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        anomaly_map = cv2.resize(anomaly_map, size, interpolation=cv2.INTER_AREA)
    return _png(heatmap_overlay(rgb, anomaly_map, pixel_threshold, legend=False))
