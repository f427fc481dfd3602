"""The headless HTTP API, ``/api/v1``: JSON over an open `ImageIndex`, without Gradio.

`build_api` makes a FastAPI app of its own; `app.server.build_server` mounts it at
:data:`API_PREFIX` beside the page (or alone: ``serve --api-only``). Every error is a JSON
``{"error": "..."}`` that says what to do, with its status code; a traceback stays in the
server log. What it serves follows the page's rules (README, "Guarantees"): an image is named
by its id, its path relative to the indexed folder (see :func:`checked_id`), and a file is
read only if it is indexed and its real path is inside the folder; uploads are bounded in
bytes and in pixels as the page's are.
"""

from __future__ import annotations

import io
import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from mocoretrieval.data import load_image
from mocoretrieval.duplicates import DEFAULT_DUPLICATE_THRESHOLD
from mocoretrieval.errors import ImageError, IndexFormatError, MoCoRetrievalError
from mocoretrieval.layout import DATABASE
from mocoretrieval.pathsafety import display

from .thumbnails import PathOutsideRootError, resolve_in_root, stored_thumbnail, thumbnail
from .views import MAX_K, MAX_UPLOAD_MB, MIN_DUPLICATE_THRESHOLD

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
# A multipart body is the file plus its headers and boundaries: a few hundred bytes, or a few
# kB with long names. The stream is cut at the file limit plus this, the file checked exactly.
MULTIPART_SLACK = 64 * 1024
READY_WAIT_S = 5.0  # readiness waits this long for a running request (a duplicate search)
# Latency buckets in seconds: a health check takes ~1 ms, a search 20-300 ms on a CPU (README,
# "Web app"), a duplicate search of a large collection minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiError(Exception):
    """A request the API refuses: its status code and a message that says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- ids and parameters ----------------------------------------------------------------------


def checked_id(image_id: str) -> str:
    """An image id as the client sent it, refused unless it is a relative path in its one
    canonical form.

    The id of an image is its path relative to the indexed folder (POSIX, as results give it),
    percent-encoded in URLs. Not the store's row id: that changes when a file is edited and
    re-embedded, or the index rebuilt, while a path is what the user knows, stays the same
    across updates and rebuilds, and is what every result already carries.

    Raises:
        ApiError: 400 for an empty, absolute or non-canonical path (``..``, ``.``, ``//``):
            such an id names no indexed image, and may try to name a file outside the folder.
    """
    parts = image_id.split("/")
    if not image_id or "\x00" in image_id or any(p in ("", ".", "..") for p in parts):
        raise ApiError(
            400,
            "an image id is its path relative to the indexed folder, as results give it "
            "(e.g. 'holiday/beach.jpg'): no leading '/', no '.' or '..' parts",
        )
    return image_id


def int_param(value: Any, name: str, default: int, low: int, high: int) -> int:
    """``value`` (text from a query string or a form) as an int in [low, high]; None: default."""
    if value is None or value == "":
        return default
    try:
        number = int(str(value))
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return number


def threshold_param(value: Any) -> float:
    """A duplicate threshold in [MIN_DUPLICATE_THRESHOLD, 1]: below it most of a collection
    links up into one group, which costs the server time and the reader patience (as in the
    page, where the slider stops there)."""
    if value is None or value == "":
        return DEFAULT_DUPLICATE_THRESHOLD
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not MIN_DUPLICATE_THRESHOLD <= threshold <= 1.0:  # NaN fails too
        raise ApiError(
            400,
            f"threshold must be a similarity from {MIN_DUPLICATE_THRESHOLD:g} to 1, got {value!r}",
        )
    return threshold


# --- metrics ---------------------------------------------------------------------------------


class Metrics:
    """Request counts and latencies per endpoint, written in Prometheus's text format (0.0.4)
    by hand: three metric families do not need a client library."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}  # (endpoint, method, status)
        self.latency: dict[str, list[float]] = {}  # endpoint -> bucket counts, sum, count
        self.images: int | None = None  # the index's size when last read

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            row = self.latency.setdefault(endpoint, [0.0] * (len(BUCKETS) + 2))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    row[i] += 1
            row[-2] += seconds
            row[-1] += 1

    def render(self) -> str:
        lines = [
            "# HELP mocoretrieval_http_requests_total API requests by endpoint, method, status.",
            "# TYPE mocoretrieval_http_requests_total counter",
        ]
        with self._lock:
            for (endpoint, method, status), n in sorted(self.requests.items()):
                labels = f'endpoint="{endpoint}",method="{method}",status="{status}"'
                lines.append(f"mocoretrieval_http_requests_total{{{labels}}} {n}")
            lines += [
                "# HELP mocoretrieval_http_request_duration_seconds API request latency.",
                "# TYPE mocoretrieval_http_request_duration_seconds histogram",
            ]
            name = "mocoretrieval_http_request_duration_seconds"
            for endpoint, row in sorted(self.latency.items()):
                for bound, n in zip((*map(str, BUCKETS), "+Inf"), (*row[: len(BUCKETS)], row[-1])):
                    lines.append(f'{name}_bucket{{endpoint="{endpoint}",le="{bound}"}} {n:g}')
                lines.append(f'{name}_sum{{endpoint="{endpoint}"}} {row[-2]:.6f}')
                lines.append(f'{name}_count{{endpoint="{endpoint}"}} {row[-1]:g}')
            if self.images is not None:
                lines += [
                    "# HELP mocoretrieval_index_images Images in the index, as last read.",
                    "# TYPE mocoretrieval_index_images gauge",
                    f"mocoretrieval_index_images {self.images}",
                ]
        return "\n".join(lines) + "\n"


class Measured:
    """ASGI middleware: each request's endpoint (its route template, so that ids do not make a
    label each), method, status and latency go to `Metrics`."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception the app did not handle

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            endpoint = API_PREFIX + path.replace(":path", "") if path else "unmatched"
            self.metrics.observe(endpoint, scope["method"], status, time.perf_counter() - start)


# --- errors as JSON --------------------------------------------------------------------------


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def domain_status(e: MoCoRetrievalError) -> int:
    """The status of a library error: a bad image is the client's, an index that cannot be
    read now is unavailable, anything else the server's."""
    if isinstance(e, ImageError):
        return 400
    if isinstance(e, IndexFormatError):
        return 503
    return 500


def add_json_errors(app: FastAPI, unexpected_too: bool = True) -> None:
    """Every error ``app`` answers is ``{"error": "..."}``; an unexpected one is logged with its
    traceback and answered with one line (unless ``unexpected_too`` is False: an app that only
    mounts others, whose own handlers answered and logged it already)."""

    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(e.status, e.message)

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: the API is under {API_PREFIX} (README, 'HTTP API')"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed here (README, 'HTTP API')"
        return error(e.status_code, message, dict(e.headers or {}))

    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, f"bad request: {e.errors()[0].get('msg', 'invalid parameter')}")

    async def domain(request: Request, e: MoCoRetrievalError) -> JSONResponse:
        return error(domain_status(e), str(e))

    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error(500, "the server failed unexpectedly; the server log has the details")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(MoCoRetrievalError, domain)
    if unexpected_too:
        app.add_exception_handler(Exception, unexpected)


# --- the app ---------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class Api:
    """The endpoints over one open index.

    One index call runs at a time (``lock``), as the page runs one search at a time: the
    index's connection, manifest and FAISS index are shared by every request, and a query's
    decoding and model memory stay bounded however many clients there are. Uploads are read
    and thumbnails encoded outside the lock.
    """

    def __init__(self, index: Any, k_default: int, max_upload_mb: float) -> None:
        self.index = index
        self.k_default = max(1, min(MAX_K, int(k_default)))
        self.max_upload_mb = float(max_upload_mb)
        self.max_bytes = int(max_upload_mb * 1e6)  # MB as the page counts them: 10^6 bytes
        self.lock = threading.Lock()
        self.metrics = Metrics()

    # --- reading the index --------------------------------------------------------------------

    def count(self) -> int:
        n = len(self.index)
        self.metrics.images = n
        return n

    def shown(self, rel: str) -> bool:
        """Whether an image may be named to a client: its real path is inside the folder (a
        symlink out of it, or a vanished file, is left out, as the page leaves it out)."""
        try:
            resolve_in_root(self.index.roots, rel)
        except PathOutsideRootError as e:
            logger.warning("%s", e)
            return False
        except ImageError:
            return False
        return True

    def indexed(self, image_id: str) -> tuple[str, Path]:
        """The id checked (400), indexed (404) and inside the folder (404): its real path."""
        rel = checked_id(image_id)
        with self.lock:
            known = rel in self.index
        if not known:
            raise ApiError(404, f"no image {display(rel)!r} in the index: use an id from results")
        try:
            return rel, resolve_in_root(self.index.roots, rel)
        except PathOutsideRootError as e:
            logger.warning("%s", e)
        except ImageError:
            pass
        raise ApiError(404, f"image {display(rel)!r} is not available (moved or deleted?)")

    def results(self, request: Request, hits: Sequence[Any], k: int) -> dict[str, Any]:
        """The first ``k`` hits as JSON; ``left_out`` counts those not shown (see `shown`)."""
        base = request.scope.get("root_path", "")
        hits = list(hits)[:k]
        shown = [r for r in hits if self.shown(r.relpath)]
        return {
            "k": k,
            "results": [self.item(base, r.relpath, r.score, r.timestamp) for r in shown],
            "left_out": len(hits) - len(shown),
        }

    @staticmethod
    def item(base: str, rel: str, score: float, timestamp: float | None = None) -> dict[str, Any]:
        """One hit as JSON; ``timestamp`` is the matching keyframe's second for a video, null
        for an image."""
        quoted = quote(rel, safe="/")
        return {
            "path": rel,
            "score": round(float(score), 6),
            "timestamp": None if timestamp is None else round(float(timestamp), 3),
            "thumbnail": f"{base}/thumbnail/{quoted}",
            "similar": f"{base}/similar/{quoted}",
        }

    # --- uploads ------------------------------------------------------------------------------

    def too_large(self) -> ApiError:
        return ApiError(
            413,
            f"upload too large: at most {self.max_upload_mb:g} MB ({self.max_bytes} bytes) "
            "per image; send a smaller file, or start the server with a larger --max-upload-mb",
        )

    async def receive_upload(self, request: Request) -> tuple[str, Path, str | None]:
        """The uploaded image, stored in a private temporary file (mode 0600; delete it):
        ``(its name as the client gave it, the file, the form's k)``. The body is cut off once
        it is larger than the limit allows, whatever Content-Length says."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                400,
                "send the image as a multipart form field named 'image', "
                "e.g. curl -F image=@photo.jpg",
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes + MULTIPART_SLACK:
            raise self.too_large()
        received = 0

        async def bounded() -> dict:
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes + MULTIPART_SLACK:
                raise _TooLarge
            return message

        try:
            form = await Request(request.scope, bounded).form(max_files=1, max_fields=4)
        except _TooLarge:
            raise self.too_large() from None
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "no image: send it as the form field 'image'")
            if upload.size is not None and upload.size > self.max_bytes:
                raise self.too_large()
            name = display(Path(upload.filename or "upload").name)
            suffix = Path(name).suffix  # decoders are chosen by it (camera RAW, HEIC)
            suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
            with tempfile.NamedTemporaryFile(
                prefix="mocoretrieval-upload-", suffix=suffix, delete=False
            ) as out:
                while chunk := await upload.read(1 << 20):
                    out.write(chunk)
            k = form.get("k")
            return name, Path(out.name), k if isinstance(k, str) else None
        finally:
            await form.close()

    def search_file(self, request: Request, name: str, path: Path, k: int) -> dict[str, Any]:
        with self.lock:
            min_side = getattr(self.index.encoder, "resize_size", None)
        try:
            image = load_image(path, min_side=min_side)
        except ImageError as e:
            if e.reason.startswith(("decompression bomb", "too large to decode")):
                limit = Image.MAX_IMAGE_PIXELS
                raise ApiError(
                    413, f"image too large: {e.reason}; at most {limit} pixels per image"
                ) from None
            raise ApiError(400, f"cannot read image {name}: {e.reason}") from None
        with self.lock:
            hits = self.index.search(image, k=k)
        return self.results(request, hits, k)

    # --- endpoints ----------------------------------------------------------------------------

    async def search(self, request: Request) -> dict[str, Any]:
        """POST /search: the k images most like an uploaded one."""
        query_k = request.query_params.get("k")
        int_param(query_k, "k", self.k_default, 1, MAX_K)  # refused before the upload is read
        name, path, form_k = await self.receive_upload(request)
        try:
            k = int_param(query_k or form_k, "k", self.k_default, 1, MAX_K)
            return await run_in_threadpool(self.search_file, request, name, path, k)
        finally:
            path.unlink(missing_ok=True)

    def similar(self, request: Request, image_id: str, k: str | None = None) -> dict[str, Any]:
        """GET /similar/{id}: the k images most like an indexed one (itself left out), by the
        embedding stored for it: nothing is decoded."""
        n = int_param(k, "k", self.k_default, 1, MAX_K)
        rel, _ = self.indexed(image_id)
        with self.lock:
            hits = self.index.search(self.index.vector(rel), k=n + 1)
        return self.results(request, [r for r in hits if r.relpath != rel], n)

    def thumbnail(self, image_id: str) -> Response:
        """GET /thumbnail/{id}: a JPEG of an indexed image, at most 320 px a side."""
        rel, real = self.indexed(image_id)
        with self.lock:
            image = stored_thumbnail(self.index, rel)
        if image is None:
            try:
                image = thumbnail(real)
            except ImageError as e:
                raise ApiError(404, f"image {display(rel)!r} cannot be shown: {e.reason}") from None
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=85)
        return Response(
            out.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "private"}
        )

    def duplicates(self, request: Request, threshold: str | None = None) -> dict[str, Any]:
        """GET /duplicates: groups of near-identical images, largest first."""
        at = threshold_param(threshold)
        with self.lock:
            groups = self.index.duplicates(at) if self.count() else []
        base = request.scope.get("root_path", "")
        out = []
        for group in groups:
            members = [self.item(base, r.relpath, r.score) for r in group if self.shown(r.relpath)]
            if len(members) > 1:
                out.append(members)
        return {"threshold": at, "groups": out}

    def info(self) -> dict[str, Any]:
        """GET /info: model, images, dimension, index type, last update, skipped files. The
        server's own folders are left out: a client names images by their ids."""
        with self.lock:
            info = self.index.info()
        self.metrics.images = info.get("count")
        info = {k: v for k, v in info.items() if k not in ("root", "index_dir")}
        # Each root by name and state, never by folder (as "root" is left out).
        info["roots"] = [{k: r[k] for k in ("name", "state", "files")} for r in info["roots"]]
        return info

    def health(self) -> dict[str, Any]:
        """GET /health: liveness, 200 while the process answers; the index's size as last read
        (read now unless a request holds the index)."""
        if self.lock.acquire(blocking=False):
            try:
                self.count()
            except Exception as e:  # noqa: BLE001 - liveness: readiness says what is wrong
                logger.warning("health: the index cannot be read: %s", e)
            finally:
                self.lock.release()
        return {"status": "ok", "images": self.metrics.images}

    def ready(self) -> JSONResponse:
        """GET /ready: readiness, 503 unless the index can be read now."""
        if not self.lock.acquire(timeout=READY_WAIT_S):
            return error(503, "busy with a long request (a duplicate search?); try again soon")
        try:
            if not (Path(self.index.path) / DATABASE).is_file():
                raise IndexFormatError(f"the index database {DATABASE} is gone")
            n = self.count()
            self.index.info()
        except MoCoRetrievalError as e:
            return error(503, f"the index cannot be opened: {e}")
        finally:
            self.lock.release()
        return JSONResponse({"status": "ready", "images": n})

    def metrics_text(self) -> PlainTextResponse:
        """GET /metrics: Prometheus text exposition."""
        if self.lock.acquire(blocking=False):
            try:
                self.count()
            except MoCoRetrievalError:
                pass  # the gauge keeps its last value; /ready says what is wrong
            finally:
                self.lock.release()
        return PlainTextResponse(
            self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )


def build_api(index: Any, k_default: int = 10, max_upload_mb: float = MAX_UPLOAD_MB) -> FastAPI:
    """The API over an open index, as an app to mount at :data:`API_PREFIX`.

    Args:
        index: an open :class:`~mocoretrieval.index.ImageIndex` (its encoder loaded).
        k_default: results when a request gives no k.
        max_upload_mb: uploads above this many MB (10^6 bytes) are refused with 413; pixels
            are bounded as when indexing (Pillow's decompression-bomb limit).
    """
    api = Api(index, k_default, max_upload_mb)
    # No /docs: Swagger UI loads its scripts from a CDN, and the page promises none.
    app = FastAPI(title="mocoretrieval", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    add_json_errors(app)
    app.add_middleware(Measured, metrics=api.metrics)
    app.add_api_route("/search", api.search, methods=["POST"])
    app.add_api_route("/similar/{image_id:path}", api.similar, methods=["GET"])
    app.add_api_route("/thumbnail/{image_id:path}", api.thumbnail, methods=["GET"])
    app.add_api_route("/duplicates", api.duplicates, methods=["GET"])
    app.add_api_route("/info", api.info, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/ready", api.ready, methods=["GET"])
    app.add_api_route("/metrics", api.metrics_text, methods=["GET"])
    return app
