"""`simsearch serve`: the HTTP API and the inspection dashboard, one FastAPI app over `Engine`.

Routes live under /v1 (OpenAPI schema at /openapi.json, interactive docs at /docs, their Swagger UI files
served from the installed swagger-ui-bundle, never from a CDN); the dashboard's plain HTML/JS/CSS files are
served from /dashboard/. Every error is JSON, {"error": message, "status": code}. Requests whose Host header
is not one the server answers to are refused (DNS rebinding), and every response forbids framing.
"""

import contextlib
import hmac
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from fastapi import Body, Depends, FastAPI, Path as PathParam, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from ..records import QueryRecord
from ..errors import BadInput, RequestRefused, SimsearchError, http_status
from .indexes import NAME_PATTERN, Exposure, Registry
from .uploads import read_uploads

STATIC = Path(__file__).parent / "static"
SETTINGS_ENV = "SIMSEARCH_SERVE_SETTINGS"  # how `simsearch serve` hands its settings to uvicorn's workers
TOKEN_ENV = "SIMSEARCH_TOKEN"
SHA256 = r"^[0-9a-f]{64}$"


@dataclass
class ServerSettings:
    indexes: dict[str, str] = field(default_factory=dict)  # name -> index directory
    root: str | None = None  # every index folder inside it is served under its folder name
    token_file: str | None = None  # else the SIMSEARCH_TOKEN environment variable; no token: writes disabled
    auth_reads: bool = False  # reads need the token too
    expose_paths: bool = False  # show server paths of reference images (off: sha256 only)
    max_upload_bytes: int = 50 * 2**20  # per request
    max_pixels: int = 50_000_000  # per image, checked from the header before decoding
    max_images: int = 16  # per request
    max_request_pixels: int = 100_000_000  # all images of one request together
    keep_recent: int = 24  # queries kept for the dashboard's gallery
    # Host header values answered (any port); "*" answers any. A page on another site that points its own
    # name at 127.0.0.1 (DNS rebinding) sends its name as Host, and is refused.
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")

    def token(self) -> str | None:
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise BadInput(f"{self.token_file}: cannot read the token file ({exc.strerror or exc})") from None
            if not token:
                raise BadInput(f"{self.token_file}: the token file is empty")
            return token
        return os.environ.get(TOKEN_ENV) or None


# -- response shapes (for the OpenAPI schema): the query record is records.QueryRecord, the same record
# `simsearch query --json` prints ----------------------------------------------------------------------------
class QueryResponse(BaseModel):
    index: str
    results: list[QueryRecord]


class CalibrateRequest(BaseModel):
    target_fpr: float = Field(0.01, gt=0, lt=1, description="target false-positive rate on good parts")
    min_region_area: Optional[int] = Field(None, ge=1, le=10**8, description="smallest region in pixels")
    folds: Optional[int] = Field(None, ge=2, le=1000, description="calibrate on the bank itself: each of K folds "
                                 "of its images scored against the bank without them (instead of the calibration "
                                 "images)")
    fold_order: Literal["capture", "interleaved"] = Field(
        "capture", description="with folds: contiguous runs in file-name order (a fold is mostly one batch) or "
        "every K-th image")


class ErrorBody(BaseModel):
    error: str
    status: int


def errors(*codes: int) -> dict:
    return {code: {"model": ErrorBody} for code in codes}


IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/bmp": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
PNG = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}

IndexName = Annotated[str, PathParam(pattern=NAME_PATTERN.pattern, description="served index name")]
Sha256 = Annotated[str, PathParam(pattern=SHA256, description="sha256 of the image's file, lower-case hex")]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


class Metrics:
    """Request counts and latencies per route, and verdicts per index, in Prometheus' text format."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise to a scrape
        self.registry = CollectorRegistry()
        self.requests = Counter("simsearch_http_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("simsearch_http_request_duration_seconds", "Time to answer a request",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queries = Counter("simsearch_queries", "Images scored (verdict foreign: unlike the bank's images, no "
                               "verdict)", ["index", "verdict"], registry=self.registry)
        # Drift (simsearch/drift.py) over the index's recent queries, as of the last query this process answered.
        self.drift_share = Gauge("simsearch_drift_share", "Share of recent queries above the calibration's 5% line",
                                 ["index"], registry=self.registry)
        self.drift_expected = Gauge("simsearch_drift_expected_share", "Share of good parts expected above that line",
                                    ["index"], registry=self.registry)
        self.drift_p_value = Gauge("simsearch_drift_p_value", "One-sided binomial p-value of the recent share "
                                   "(small: the parts no longer score like the calibration's)", ["index"],
                                   registry=self.registry)

    def observe_drift(self, index: str, drift: dict) -> None:
        for gauge, key in ((self.drift_share, "share"), (self.drift_expected, "expected_share"),
                           (self.drift_p_value, "p_value")):
            if drift.get(key) is not None:
                gauge.labels(index).set(drift[key])


class MetricsMiddleware:
    """ASGI middleware: count and time every request by method, route template and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # Route templates, not raw paths, keep the number of series bounded.
            route = getattr(scope.get("route"), "path", None)
            route = route or ("/dashboard" if scope["path"].startswith("/dashboard") else "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """ASGI middleware: refuse bodies over `max_bytes` (413), by their declared length or as they stream in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over the limit of {self.max_bytes} bytes (--max-upload-mb)"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, message)(scope, receive, send)
            return
        received = 0

        async def counted():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise RequestRefused(413, message)  # raised inside the route: answered by its handler
            return event

        await self.app(scope, counted, send)


def host_of(header: bytes) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1", "Example.com:80" -> "example.com"."""
    value = header.decode("latin-1").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


# Responses say where they may be shown: never in a frame, scripts and styles from the server only (the
# dashboard has no inline code). Swagger UI's page starts it with an inline script: /docs alone allows that.
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer")]
CSP = (b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
       b"frame-ancestors 'none'")
DOCS_CSP = CSP + b"; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'"


class HostMiddleware:
    """ASGI middleware: refuse a Host header the server does not answer to (400), and add the security
    headers to every response."""

    def __init__(self, app, allowed_hosts: tuple[str, ...]):
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = host_of(dict(scope["headers"]).get(b"host", b""))
        if "*" not in self.allowed and host not in self.allowed:
            await error_response(400, f"Host {host!r} is not one this server answers to (--allowed-host)")(
                scope, receive, send)
            return
        policy = DOCS_CSP if scope["path"] == "/docs" else CSP

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS,
                                      (b"content-security-policy", policy)]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: ServerSettings) -> FastAPI:
    registry = Registry({n: Path(d) for n, d in settings.indexes.items()},
                        Path(settings.root) if settings.root else None,
                        Exposure(expose_paths=settings.expose_paths, max_pixels=settings.max_pixels,
                                 max_request_pixels=settings.max_request_pixels),
                        settings.keep_recent)
    token = settings.token()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        registry.close()

    api = FastAPI(title="simsearch", version=__version__, description=__doc__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)  # FastAPI's own pages load Swagger UI and ReDoc from a CDN: see /docs below
    api.state.registry = registry
    bearer = HTTPBearer(auto_error=False, description="the server's token (SIMSEARCH_TOKEN or --token-file)")

    def check_token(credentials: HTTPAuthorizationCredentials | None, what: str) -> None:
        if token is None:
            raise RequestRefused(403, f"{what} are disabled: start the server with {TOKEN_ENV} set or --token-file")
        if credentials is None:
            raise RequestRefused(401, f"{what} need a token: send 'Authorization: Bearer <token>'",
                                 {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise RequestRefused(401, "wrong token", {"WWW-Authenticate": "Bearer"})

    def reader_auth(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        if settings.auth_reads:
            check_token(credentials, "reads")

    def writer_auth(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        check_token(credentials, "writes")

    read, write = [Depends(reader_auth)], [Depends(writer_auth)]

    # -- errors: JSON with the status errors.http_status gives the error's class ----------------
    @api.exception_handler(SimsearchError)
    async def refused(_request, exc: SimsearchError):
        message = str(exc) if settings.expose_paths else registry.hide_paths(str(exc))
        return error_response(http_status(exc), message, getattr(exc, "headers", None))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(422, f"invalid request: {problems}")

    @api.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        # Starlette raises the error on after this answer (for the server's log), and uvicorn then drops the
        # connection: saying so keeps a keep-alive client from sending its next request into a closed socket.
        return error_response(500, f"internal error ({exc.__class__.__name__}); see the server log",
                              {"Connection": "close"})

    # -- routes -----------------------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/dashboard/")

    @api.get("/v1/health", tags=["server"])
    def health() -> dict[str, Any]:
        """Liveness (no token needed): the server answers, and which indexes are ready."""
        return {"status": "ok", "version": __version__,
                "indexes": [{"name": n, "ready": registry.get(n).ready()} for n in registry.names()]}

    @api.get("/v1/metrics", tags=["server"], dependencies=read, response_class=Response,
             responses={200: {"content": {"text/plain": {}}}, **errors(401, 403)})
    def prometheus_metrics():
        """Request counts, latencies and verdicts since the server started (Prometheus text format)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/indexes", tags=["index"], dependencies=read, responses=errors(401, 403))
    def list_indexes() -> dict[str, Any]:
        return {"indexes": [{"name": n, "ready": registry.get(n).ready(), "url": f"/v1/indexes/{n}"}
                            for n in registry.names()]}

    @api.get("/v1/indexes/{name}", tags=["index"], dependencies=read, responses=errors(401, 403, 404, 409, 503))
    async def index_overview(name: IndexName) -> dict[str, Any]:
        """Configuration, counts, calibration (thresholds, expected false alarms per 100 good parts)."""
        return await run_in_threadpool(registry.get(name).overview)

    @api.post("/v1/indexes/{name}/query", tags=["inspection"], dependencies=read, openapi_extra=IMAGE_BODY,
              responses=errors(400, 401, 403, 404, 409, 413, 415, 422, 503))
    async def query(request: Request, name: IndexName,
                    heatmap: Annotated[Literal["none", "url", "inline"],
                                       Query(description="heatmap overlay PNG: none, a URL, or inline base64")] = "none",
                    ) -> QueryResponse:
        """Score uploaded images (multipart file parts, or one image as the raw body) against the index.

        Each result is the JSON line of `simsearch query --json`; nearest references are named by sha256
        with a thumbnail URL. A request whose images cannot all be read is refused as a whole.
        """
        served = registry.get(name)
        uploads = await read_uploads(request, settings.max_images)
        records = await run_in_threadpool(served.query, uploads, heatmap)
        for record in records:
            verdict = ("foreign" if record["comparable"] is False else
                       {None: "uncalibrated", True: "anomalous", False: "ok"}[record["is_anomalous"]])
            metrics.queries.labels(name, verdict).inc()
        metrics.observe_drift(name, await run_in_threadpool(served.drift))
        return {"index": name, "results": records}

    @api.get("/v1/indexes/{name}/queries", tags=["inspection"], dependencies=read, responses=errors(401, 403, 404))
    def recent_queries(name: IndexName, limit: Annotated[int, Query(ge=1, le=1000)] = 24) -> dict[str, Any]:
        """The latest queries this server process answered for the index, newest first."""
        served = registry.get(name)
        return {"index": name, "queries": [
            {"query_id": q.id, "created_at": q.created_at, "record": q.record,
             "preview": f"{served.url}/queries/{q.id}/preview.png"} for q in served.recent(limit)]}

    @api.get("/v1/indexes/{name}/queries/{query_id}/{kind}.png", tags=["inspection"], dependencies=read,
             response_class=Response, responses={**PNG, **errors(401, 403, 404)})
    def query_image(name: IndexName, query_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}$")],
                    kind: Literal["heatmap", "preview"]):
        """A recent query's heatmap overlay (kept when asked for with heatmap=url) or its gallery preview."""
        served = registry.get(name)
        recent = served.recent_query(query_id)
        data = served.heatmap(query_id) if kind == "heatmap" else recent.preview_png if recent else None
        if data is None:
            raise RequestRefused(404, f"no {kind} kept for query {query_id} (only recent ones are kept)")
        return Response(data, media_type="image/png")

    @api.get("/v1/indexes/{name}/references/{sha256}/thumbnail", tags=["inspection"], dependencies=read,
             response_class=Response, responses={**PNG, **errors(401, 403, 404, 409)})
    async def reference_thumbnail(name: IndexName, sha256: Sha256,
                                  x: Annotated[int, Query(ge=0, le=10**6)] = 0,
                                  y: Annotated[int, Query(ge=0, le=10**6)] = 0,
                                  w: Annotated[Optional[int], Query(ge=1, le=10**6)] = None,
                                  h: Annotated[Optional[int], Query(ge=1, le=10**6)] = None,
                                  size: Annotated[int, Query(ge=16, le=1024, description="longer side")] = 160):
        """A crop of a reference image (whole image by default), scaled so its longer side is `size` px."""
        data = await run_in_threadpool(registry.get(name).thumbnail, sha256, x, y, w, h, size)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @api.get("/v1/indexes/{name}/images", tags=["index"], dependencies=read, responses=errors(401, 403, 404, 503))
    async def list_images(name: IndexName, role: Optional[Literal["reference", "calibration"]] = None,
                          limit: Annotated[int, Query(ge=1, le=10000)] = 100,
                          offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        """Images of the index (sha256, role, size), in the order they were added."""
        rows = await run_in_threadpool(registry.get(name).images, role)
        return {"index": name, "total": len(rows), "images": rows[offset:offset + limit]}

    @api.post("/v1/indexes/{name}/images", tags=["index"], dependencies=write, openapi_extra=IMAGE_BODY,
              responses=errors(400, 401, 403, 404, 409, 413, 415, 422, 503))
    async def add_images(request: Request, name: IndexName,
                         holdout: Annotated[float, Query(ge=0, lt=1, description="share kept for calibration")] = 0.0,
                         coreset: Annotated[Optional[float], Query(gt=0, le=1)] = None,
                         recalibrate: Annotated[bool, Query(description="measure the calibration again on the new "
                                                                        "bank, in the same commit")] = True,
                         ) -> dict[str, Any]:
        """Add uploaded good images to the bank; their bytes are kept in the index's uploads/ folder."""
        served = registry.get(name)
        uploads = await read_uploads(request, settings.max_images)
        return await run_in_threadpool(served.add, uploads, holdout, coreset, recalibrate)

    @api.delete("/v1/indexes/{name}/images/{sha256}", tags=["index"], dependencies=write,
                responses=errors(401, 403, 404, 409, 503))
    async def delete_image(name: IndexName, sha256: Sha256,
                           recalibrate: Annotated[bool, Query(description="measure the calibration again on the "
                                                                          "new bank, in the same commit")] = True,
                           ) -> dict[str, Any]:
        """Remove an image (its vectors and rows go together)."""
        return await run_in_threadpool(registry.get(name).remove, sha256, recalibrate)

    @api.post("/v1/indexes/{name}/calibrate", tags=["index"], dependencies=write,
              responses=errors(400, 401, 403, 404, 409, 422, 503))
    async def calibrate_index(name: IndexName,
                              request: Annotated[Optional[CalibrateRequest], Body()] = None) -> dict[str, Any]:
        """New thresholds from the index's stored good images outside the bank (held out, or given before)."""
        request = request or CalibrateRequest()
        return await run_in_threadpool(registry.get(name).calibrate, request.target_fpr, request.min_region_area,
                                       request.folds, request.fold_order)

    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    @api.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="simsearch API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    api.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
    api.mount("/dashboard", StaticFiles(directory=STATIC, html=True), name="dashboard")
    api.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    api.add_middleware(HostMiddleware, allowed_hosts=tuple(settings.allowed_hosts))
    api.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so it times everything
    return api


def app_from_environment() -> FastAPI:
    """uvicorn's factory, run in each worker process, with the settings `simsearch serve` left in the environment."""
    return create_app(ServerSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info") -> None:
    """Run the app under uvicorn; each worker process loads each index's model once, on first use."""
    import uvicorn

    create_app(settings)  # bad settings (an empty token file, a bad index name) fail here, once
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    uvicorn.run("simsearch.server.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)
