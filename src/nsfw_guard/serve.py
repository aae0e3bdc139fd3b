"""``nsfw-guard serve``: a moderation API over HTTP, with dynamic batching (``pip install
"nsfw-guard[serve]"``).

Built on LitServe: its inference worker loads the model once and batches the requests that
arrive within ``batch_timeout`` (up to ``max_batch_size``) into one in-graph check, whatever
route, level or threshold each asked for. In front of it, :class:`RequestGate` (an ASGI
middleware in the API server process) answers everything a request can get wrong with a 4xx
and a JSON error before it reaches the worker: the API key, the body's size and the time it
takes to arrive, its content type, its JSON, multipart form or base64, the number of images,
level, threshold and action, and images that are not images or are over Pillow's pixel limit.
It also serves the page at ``/``, ``/healthz`` and ``/metrics`` (Prometheus, every process's
metrics: LitServe's worker is a process of its own). In the worker, whatever fails for one
request is that request's own error (422; 503 if the model fails on it alone), never its
batch's. Every frame of an animation is checked.

Routes:

- ``POST /v1/moderate``: images as multipart files, JSON ``{"images": [base64, ...], "level",
  "threshold"}`` or one raw image body (``level``/``threshold`` as query parameters) →
  ``{"model", "results": [{"level", "scores", "flagged", "frames", "frames_checked", "error"}]}``
  in request order.
- ``POST /v1/censor``: one image → the image, censored if flagged (same format, or PNG where
  Pillow cannot write it), the verdict in ``X-NSFW-*`` headers; ``action``, ``level``,
  ``threshold`` as parameters.
- ``POST /v1/map``: one image (as for ``/v1/censor``) → its region map at ``level`` (the map
  ``action="regions"`` uses) as a PNG overlay: one colour, alpha the map, so it holds none of
  the image's pixels; the verdict in the same headers.
- ``GET /healthz`` (never needs the key), ``GET /metrics``, ``GET /`` (the page).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import litserve as ls
import torch
from PIL import Image, UnidentifiedImageError
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import DEFAULT_MODEL, censor
from .access import bearer_matches, wrong_host
from .check import CheckStep
from .decode import count_frames
from .levels import NSFWLevel
from .prepared import FRAME_CHUNK, Prepared, check_prepared, prepare_bytes

__all__ = ["ACTIONS", "LEVELS", "ModerationAPI", "RequestGate", "ServeSettings", "build_server"]

LEVELS = ("low", "medium", "high")
ACTIONS = ("blur", "pixelate", "blank", "regions")
_WORKER_PATH = "/internal/check"  # LitServe's route; only the gate sends requests there
_ROUTES = {"/v1/moderate": "moderate", "/v1/censor": "censor", "/v1/map": "map"}
_ONE_IMAGE = ("censor", "map")  # the routes that take one image
_SCORES = ("neutral", "low", "medium", "high")
_LOG = logging.getLogger(__name__)
_PARAMETERS = ("level", "threshold", "action")  # JSON fields, form fields or query parameters
_MAX_FORM_FIELDS = 50

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs; one object, passed to the gate and the worker."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str | None = None
    backend: str = "torch"
    """``"onnxruntime"``: ``model`` is a file written by ``nsfw-guard export``."""
    compile: bool | None = None
    """``torch.compile`` the classifier; ``None``: on CUDA only."""
    level: str = "medium"
    threshold: float = 0.5
    action: str = "blur"
    region_params: dict[str, Any] = field(default_factory=dict)
    """``action="regions"``'s settings (``margin``, ``censor``, ``map``...: see
    :meth:`nsfw_guard.check.CheckStep.censor_regions`)."""
    max_batch_size: int = 16
    batch_timeout_ms: float = 10.0
    max_bytes: int = 20 * 2**20
    request_timeout: float = 5.0
    """Seconds a request's whole body may take to arrive (408 after)."""
    max_images: int = 32
    max_frames: int = 0
    """0: every frame of an animation; N: an even sample of N (flagged, as unchecked)."""
    api_key: str | None = None
    model_name: str = DEFAULT_MODEL
    hosts: frozenset[str] | None = None
    """The host names requests may give (:func:`~nsfw_guard.access.allowed_hosts`); ``None``:
    any."""


class BadRequest(Exception):
    """A request the service refuses: its HTTP status and what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status, headers)


def _in_error_shape(scope: Scope, receive: Receive, send: Send) -> Send:
    """``send``, with LitServe's own error answers (``{"detail": ...}``: a request that waited
    past its timeout, 504) rewritten as the service's ``{"error": {"status", "message"}}``."""
    failed: dict[str, Any] = {}

    async def send_in_shape(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            failed.update(start=message, status=message["status"], body=b"")
            return
        if not failed:
            await send(message)
            return
        failed["body"] += message.get("body", b"")
        if message.get("more_body"):
            return
        try:
            answer = json.loads(failed["body"])
        except ValueError:
            answer = None
        if isinstance(answer, dict) and "error" in answer:  # the worker's own: as it is
            await send(failed["start"])
            await send({"type": "http.response.body", "body": failed["body"]})
            return
        detail = answer.get("detail") if isinstance(answer, dict) else None
        text = str(detail or failed["body"][:200].decode("utf-8", "replace"))
        if failed["status"] == 504:
            text = f"{text}: the server is busy; try again"
        await _error(failed["status"], text)(scope, receive, send)

    return send_in_shape


# Metrics: every process writes its own (prometheus_client's multiprocess mode) --------------------


@functools.cache
def _metrics() -> Any:
    """This process's metric objects, made on first use (after the server set
    ``PROMETHEUS_MULTIPROC_DIR``), registered nowhere: ``/metrics`` reads every process's."""
    from types import SimpleNamespace

    from prometheus_client import Counter, Histogram

    sizes = (1, 2, 4, 8, 16, 32, 64, 128)
    return SimpleNamespace(
        requests=Counter(
            "nsfw_guard_requests", "HTTP requests", ["route", "status"], registry=None
        ),
        errors=Counter(
            "nsfw_guard_errors",
            "Requests answered with an error",
            ["route", "status"],
            registry=None,
        ),
        images=Counter("nsfw_guard_images", "Images checked", ["level"], registry=None),
        latency=Histogram(
            "nsfw_guard_request_seconds", "Request latency", ["route"], registry=None
        ),
        batch_requests=Histogram(
            "nsfw_guard_batch_requests", "Requests per model batch", buckets=sizes, registry=None
        ),
        batch_images=Histogram(
            "nsfw_guard_batch_images", "Images per model batch", buckets=sizes, registry=None
        ),
    )


def _metrics_text() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


# The gate: every check a request can fail, in the API server process ------------------------------


class RequestGate:
    """ASGI middleware in front of LitServe: auth, limits and parsing (a 4xx with a JSON error
    for anything wrong, never a 500), the page, ``/healthz`` and ``/metrics``. A valid
    moderation or censor request reaches the worker as one canonical JSON body."""

    def __init__(self, app: Callable, settings: ServeSettings):
        self.app = app
        self.settings = settings
        self.page = resources.files("nsfw_guard").joinpath("web/moderate.html").read_bytes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        route = path if path in (*_ROUTES, "/", "/healthz", "/metrics") else "other"
        status = 500
        started = time.perf_counter()

        async def send_and_note(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            answer = await self._answer(scope, receive, path, method)
            if isinstance(answer, Response):
                await answer(scope, receive, send_and_note)
            else:  # on to LitServe, with the body to read (rewritten for the worker)
                await self.app(scope, answer, _in_error_shape(scope, receive, send_and_note))
        finally:
            metrics = _metrics()
            metrics.requests.labels(route, str(status)).inc()
            if status >= 400:
                metrics.errors.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _answer(
        self, scope: Scope, receive: Receive, path: str, method: str
    ) -> Response | Receive:
        """The gate's own response, or how LitServe is to read the request's body (the
        canonical JSON of a checked moderation or censor request)."""
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        refusal = wrong_host(host, self.settings.hosts)
        if refusal is not None:
            return _error(400, refusal)
        if path in ("/healthz", "/health"):
            scope["path"] = "/health"  # LitServe's: 200 once the worker is ready
            return receive
        if path == "/" and method == "GET":  # a static page: it sends the key with each call
            return Response(self.page, media_type="text/html; charset=utf-8")
        if not self._authorized(scope):
            return _error(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                {"WWW-Authenticate": "Bearer"},
            )
        if path == "/metrics" and method == "GET":
            body, media_type = await asyncio.to_thread(_metrics_text)
            return Response(body, media_type=media_type)
        if path == _WORKER_PATH:
            return _error(404, "not found")
        if path not in _ROUTES:
            return receive  # LitServe's own routes (/info) or its 404
        if method != "POST":
            return _error(405, f"{path} takes POST", {"Allow": "POST"})
        try:
            job = await self._parse(scope, receive, _ROUTES[path])
        except BadRequest as error:
            # A body that did not arrive leaves the connection unusable: it is closed.
            headers = {"Connection": "close"} if error.status == 408 else None
            return _error(error.status, error.message, headers)
        body = json.dumps(job).encode()
        authorization = [(k, v) for k, v in scope["headers"] if k == b"authorization"]
        scope.update(path=_WORKER_PATH, raw_path=_WORKER_PATH.encode(), query_string=b"")
        scope["headers"] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *authorization,
        ]
        sent = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal sent
            if sent:
                return await receive()  # the client's disconnect, if it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    def _authorized(self, scope: Scope) -> bool:
        key = self.settings.api_key
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        return not key or bearer_matches(header, key)

    async def _parse(self, scope: Scope, receive: Receive, kind: str) -> dict[str, Any]:
        """The request as ``{"kind", "images": [base64], "level", "threshold", "action"}``."""
        settings = self.settings
        body = await _read_body(scope, receive, settings.max_bytes, settings.request_timeout)
        request = Request(scope)
        params: dict[str, Any] = dict(request.query_params)
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            images, fields = await asyncio.to_thread(
                _multipart, content_type, body, settings.max_images
            )
            params.update(fields)
        elif media_type == "application/json":
            images, fields = _json_images(body, kind)
            params.update(fields)
        elif media_type.startswith("image/") or media_type == "application/octet-stream":
            images = [body]
        else:
            shown = media_type or "none"
            raise BadRequest(
                415,
                f"content type {shown}: send multipart/form-data (image files), "
                'application/json ({"images": [base64, ...]}) or an image',
            )
        unknown = sorted(set(params) - set(_PARAMETERS))
        if unknown:
            message = f"unknown field(s): {', '.join(unknown)}; accepted: {', '.join(_PARAMETERS)}"
            if media_type == "multipart/form-data":
                message += " (images go as files: parts with a filename)"
            raise BadRequest(400, message)
        if not images:
            raise BadRequest(400, "no images in the request")
        if kind in _ONE_IMAGE and len(images) != 1:
            raise BadRequest(400, f"/v1/{kind} takes one image, got {len(images)}")
        if len(images) > settings.max_images:
            raise BadRequest(
                413, f"{len(images)} images in one request; at most {settings.max_images}"
            )
        job = {
            "kind": kind,
            "level": _level(params.get("level", settings.level)),
            "threshold": _threshold(params.get("threshold", settings.threshold)),
            "action": _action(params.get("action", settings.action)),
        }
        await asyncio.to_thread(_check_images, images)
        job["images"] = [base64.b64encode(data).decode("ascii") for data in images]
        return job


async def _read_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> bytes:
    """The request's body: at most ``limit`` bytes (413), all of it within ``timeout`` seconds
    (408: a slow or stalled client holds nothing longer)."""
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the request has {int(declared)} bytes; at most {limit}")
    chunks: list[bytes] = []

    async def read() -> bytes:
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"the request has more than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        received = sum(map(len, chunks))
        raise BadRequest(
            408,
            f"the request body did not arrive within {timeout:g} s ({received} bytes came): "
            "send it whole without pausing (--request-timeout)",
        ) from None


class _Form:
    """The image files and text fields of a multipart/form-data body, read by python-multipart's
    parser (its callbacks are the ``on_*`` methods); a :class:`BadRequest` for anything wrong."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.images: list[bytes] = []
        self.fields: dict[str, str] = {}
        self.complete = False  # whether the closing boundary came
        self._field_count = 0
        self._header_name = self._header_value = self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def read(self, body: bytes, boundary: bytes) -> None:
        callbacks = {name: getattr(self, name) for name in dir(self) if name.startswith("on_")}
        try:
            parser = MultipartParser(boundary, callbacks)
            parser.write(body)
            parser.finalize()
        except FormParserError as error:  # python-multipart's: a ValueError
            raise BadRequest(400, f"the multipart body cannot be read: {error}") from None
        if not self.complete:
            closing = f"--{boundary.decode('latin-1')}--"
            raise BadRequest(
                400, f"the multipart body ends before its closing boundary ({closing})"
            )

    def on_part_begin(self) -> None:
        self._disposition, self._data = b"", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequest(
                400,
                'a multipart part without a name: each needs "Content-Disposition: form-data; '
                'name=..." (and a filename for an image)',
            )
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = b"filename" in options
        if self._is_file:
            if len(self.images) == self.max_images:
                limit = self.max_images
                raise BadRequest(413, f"more than {limit} images in one request; at most {limit}")
        else:
            self._field_count += 1
            if self._field_count > _MAX_FORM_FIELDS:
                accepted = ", ".join(_PARAMETERS)
                raise BadRequest(
                    400, f"more than {_MAX_FORM_FIELDS} form fields; the fields are {accepted}"
                )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._is_file:
            self.images.append(bytes(self._data))
        else:
            self.fields[self._name] = self._data.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.complete = True


def _multipart(
    content_type: str, body: bytes, max_images: int
) -> tuple[list[bytes], dict[str, str]]:
    """A multipart/form-data body's images (its file parts) and fields."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest(
            400,
            "multipart/form-data without a boundary: send "
            "'Content-Type: multipart/form-data; boundary=...' (HTTP clients add it)",
        )
    form = _Form(max_images)
    form.read(body, boundary)
    return form.images, form.fields


def _json_images(body: bytes, kind: str) -> tuple[list[bytes], dict[str, Any]]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest(400, "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest(400, 'the JSON body must be an object: {"images": [base64, ...]}')
    if kind in _ONE_IMAGE and "image" in value:
        value = dict(value)
        value["images"] = [value.pop("image")]
    encoded = value.pop("images", None)
    if not isinstance(encoded, list):
        raise BadRequest(400, '"images" must be a list of base64 strings')
    images = []
    for index, text in enumerate(encoded):
        if not isinstance(text, str):
            raise BadRequest(400, f"images[{index}] is not a base64 string")
        if text.startswith("data:") and "," in text:  # a data URL, as browsers make them
            text = text.split(",", 1)[1]
        try:
            images.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"images[{index}] is not valid base64") from None
    return images, value


def _quoted(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error never echoes a huge field back.

    Example:
        >>> _quoted("x" * 100)
        "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (102 characters)"
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}... ({len(text)} characters)"


def _level(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in LEVELS:
        raise BadRequest(400, f"level {_quoted(value)}: expected one of {', '.join(LEVELS)}")
    return text


def _threshold(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # a 400-digit JSON integer overflows
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise BadRequest(400, f"threshold {_quoted(value)}: expected a number in [0, 1]")
    return number


def _action(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ACTIONS:
        raise BadRequest(400, f"action {_quoted(value)}: expected one of {', '.join(ACTIONS)}")
    return text


def _check_images(images: list[bytes]) -> None:
    """What an image's header can tell: empty, not an image, over Pillow's pixel limit. (A file
    cut short shows only once decoded: the worker answers 422 for it.)"""
    for index, data in enumerate(images):
        if not data:
            raise BadRequest(400, f"images[{index}] is empty")
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.width * image.height
                limit = Image.MAX_IMAGE_PIXELS
                if limit and pixels > limit:
                    message = f"has {pixels} pixels, over the limit of {limit}"
                    raise Image.DecompressionBombError(message)
                count_frames(image)  # frames adding up to too many pixels
        except Image.DecompressionBombError as error:
            raise BadRequest(413, f"images[{index}] {error}") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise BadRequest(422, f"images[{index}] is not an image Pillow can read: {e}") from None


# The worker: one batched, in-graph check ----------------------------------------------------------


@dataclass
class _Job:
    kind: str
    images: list[bytes]
    level: str
    threshold: float
    action: str
    prepared: list[Prepared] | None = None
    verdicts: list[dict[str, Any]] | None = None
    error: str | None = None
    """Why this request failed in the worker; ``None``: it has its verdicts."""
    status: int = 422
    """Its error's HTTP status: 422 for its images, 503 where the model could not check them."""


class ModerationAPI(ls.LitAPI):
    """LitServe's worker: each batch of requests (any mix of routes, levels and thresholds)
    is decoded in threads and checked as one in-graph batch; each request gets its verdicts,
    or its censored image."""

    def __init__(self, settings: ServeSettings):
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout_ms / 1000,
            api_path=_WORKER_PATH,
        )
        self.settings = settings

    def setup(self, device: str) -> None:
        from .detector import NSFWDetector

        settings = self.settings
        detector = NSFWDetector.from_pretrained(
            settings.model,
            revision=settings.revision,
            device=device,
            dtype=getattr(torch, settings.dtype) if settings.dtype else None,
            backend=settings.backend,
            compile=settings.compile,
        )
        self.scorer = detector.scorer
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
        self.steps = {
            action: CheckStep(self.scorer, action=action, threshold=0.0)
            for action in ACTIONS
            if action != "regions"
        }

    # LitServe reads these two signatures for its route: no annotations (they would be strings
    # here, from __future__), so it passes the parsed JSON and returns our Response as it is.
    def decode_request(self, request):  # the gate's canonical JSON, parsed
        return _Job(
            request["kind"],
            [base64.b64decode(text) for text in request["images"]],
            request["level"],
            request["threshold"],
            request["action"],
        )

    def batch(self, inputs: list[_Job]) -> list[_Job]:
        return inputs

    def predict(self, jobs: list[_Job] | _Job) -> list[Any] | Any:
        if isinstance(jobs, _Job):  # --max-batch-size 1: LitServe passes requests one by one
            return self.predict([jobs])[0]
        preprocess = self.scorer.preprocess
        max_frames = self.settings.max_frames or None

        def prepare(data: bytes, chunk: int) -> Prepared | Exception:
            try:
                return prepare_bytes(data, preprocess, max_frames=max_frames, chunk=chunk)
            except Exception as error:  # a file cut short, or odd inside
                return error

        # A request's images share one chunk of frames held at once; the rest are streamed.
        flat = [
            (data, max(1, FRAME_CHUNK // len(job.images))) for job in jobs for data in job.images
        ]
        prepared = list(self.pool.map(lambda item: prepare(*item), flat))
        position = 0
        for job in jobs:
            results = prepared[position : position + len(job.images)]
            position += len(job.images)
            bad = next(((i, r) for i, r in enumerate(results) if isinstance(r, Exception)), None)
            if bad is not None:
                index, error = bad
                reason = f"{type(error).__name__}: {error}".strip()
                job.error = f"images[{index}] could not be decoded: {reason}"
                job.status = 413 if isinstance(error, Image.DecompressionBombError) else 422
            else:
                job.prepared = results
        decoded = [job for job in jobs if job.error is None]
        self._check(decoded)
        metrics = _metrics()
        metrics.batch_requests.observe(len(jobs))
        metrics.batch_images.observe(sum(len(job.images) for job in decoded))
        for job in jobs:
            for verdict in job.verdicts or ():
                metrics.images.labels(verdict["level"]).inc()
        return jobs

    def _check(self, jobs: list[_Job]) -> None:
        """Give each job its verdicts, checked as one batch. Should the batch fail, each job is
        checked alone: only a job that fails alone gets an error (503: the images were read, the
        model failed), not the jobs batched with it."""
        try:
            self._check_together(jobs)
        except Exception:
            for job in jobs:
                try:
                    self._check_together([job])
                except Exception as error:
                    _LOG.exception("a request's images could not be checked")
                    job.error = f"the images could not be checked: {type(error).__name__}: {error}"
                    job.status = 503

    def _check_together(self, jobs: list[_Job]) -> None:
        images = [image for job in jobs for image in job.prepared]
        levels = [NSFWLevel.parse(job.level) for job in jobs for _ in job.prepared]
        thresholds = [job.threshold for job in jobs for _ in job.prepared]
        verdicts = iter(self._verdicts(images, levels, thresholds))
        for job in jobs:
            job.verdicts = [next(verdicts) for _ in job.prepared]
            # A frame past an animation's first chunk that cannot be decoded: its own 422.
            bad = next(((i, v) for i, v in enumerate(job.verdicts) if v["error"]), None)
            if bad is not None:
                job.error = f"images[{bad[0]}] could not be decoded: {bad[1]['error']}"
                job.verdicts = None

    def _verdicts(
        self, images: list[Prepared], levels: list[NSFWLevel], thresholds: list[float]
    ) -> list[dict[str, Any]]:
        """Each image's verdict at its own level and threshold, in-graph; one host transfer."""
        verdicts = check_prepared(
            images,
            self.steps["blur"],  # any: levels and thresholds are the images' own
            self.settings.max_batch_size * 2,
            levels=levels,
            thresholds=thresholds,
        )
        return [
            {
                "level": verdict.level.value,
                "scores": dict(zip(_SCORES, verdict.scores, strict=True)),
                "flagged": verdict.flagged,
                "frames": image.frame_count,
                "frames_checked": image.frames_checked,
                "error": verdict.error,
            }
            for verdict, image in zip(verdicts, images, strict=True)
        ]

    def unbatch(self, outputs: list[Any]) -> list[Any]:
        return outputs

    def encode_response(self, job):  # a _Job, with its verdicts or its error
        if job.error is None:
            try:
                return self._answer(job)
            except Exception as error:  # raised to LitServe, it would fail the whole batch
                job.error = f"the answer could not be made: {type(error).__name__}: {error}"
        return _error(job.status, job.error)

    def _answer(self, job: _Job) -> Response:
        if job.kind == "moderate":
            return JSONResponse({"model": self.settings.model_name, "results": job.verdicts})
        verdict = job.verdicts[0]
        headers = {
            "X-NSFW-Level": verdict["level"],
            "X-NSFW-Flagged": str(verdict["flagged"]).lower(),
            "X-NSFW-Scores": ",".join(f"{name}={verdict['scores'][name]:.6f}" for name in _SCORES),
        }
        if job.kind == "map":
            return self._map(job, headers)
        return self._censored(job, verdict, headers)

    def _map(self, job: _Job, headers: dict[str, str]) -> Response:
        from .overlay import overlay_png, region_overlay_map

        params = {**censor.REGION_DEFAULTS, **self.settings.region_params}
        region_map = region_overlay_map(self.scorer, job.images[0], job.level, params)
        headers["X-NSFW-Map"] = params["map"]
        headers["X-NSFW-Map-Frame"] = str(region_map.frame)
        return Response(overlay_png(region_map.values), media_type="image/png", headers=headers)

    def _censored(self, job: _Job, verdict: dict[str, Any], headers: dict[str, str]) -> Response:
        data = job.images[0]
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
        if not verdict["flagged"]:  # the image as it came, byte for byte
            return Response(
                data, media_type=Image.MIME.get(fmt, "application/octet-stream"), headers=headers
            )
        from .copies import save_censored
        from .verdict_metadata import make_verdict

        buffer = io.BytesIO()
        recorded = make_verdict(
            model=self.settings.model_name,
            level=verdict["level"],
            scores=verdict["scores"],
            flagged=verdict["flagged"],
            check_level=job.level,
            threshold=job.threshold,
            action=job.action,
            frames=verdict["frames"],
            frames_checked=verdict["frames_checked"],
        )
        step = self.steps.get(job.action)
        if step is None:  # "regions": its map and re-check need the request's level and threshold
            step = CheckStep(
                self.scorer,
                level=job.level,
                threshold=job.threshold,
                action="regions",
                censor_params=self.settings.region_params,
            )
        written = save_censored(data, buffer, step, recorded)
        headers["X-NSFW-Action"] = job.action
        media_type = Image.MIME.get(written, "application/octet-stream")
        return Response(buffer.getvalue(), media_type=media_type, headers=headers)


# The server ---------------------------------------------------------------------------------------


def build_server(settings: ServeSettings, *, accelerator: str = "auto") -> ls.LitServer:
    """A LitServer with the gate in front of the worker. ``PROMETHEUS_MULTIPROC_DIR`` must be
    set (to an empty folder) before it runs, for ``/metrics``.

    Example:
        >>> from nsfw_guard.testing import make_checkpoint
        >>> import tempfile
        >>> server = build_server(ServeSettings(model=str(make_checkpoint(tempfile.mkdtemp()))))
        >>> server.run(host="127.0.0.1", port=8000, generate_client_file=False)  # doctest: +SKIP
    """
    censor.check_params("regions", settings.region_params)  # a bad setting fails before serving
    return _ModerationServer(
        ModerationAPI(settings),
        accelerator=accelerator,
        devices=1,
        workers_per_device=1,
        timeout=120,
        middlewares=[(RequestGate, {"settings": settings})],
        disable_openapi_url=True,
        model_metadata={"model": settings.model_name},
    )


class _ModerationServer(ls.LitServer):
    """LitServer that stops its worker monitor before it shuts down, and says so when its model
    worker dies.

    LitServe's monitor thread polls an event held by its multiprocessing manager. On Ctrl-C or
    SIGTERM nothing sets that event, and the manager is shut down under the polling thread,
    which then logs a traceback (or takes the workers' end for a crash). When the model worker
    does die, the monitor shuts the server down, and ``run`` fails with the manager's
    ``EOFError``: here it fails with what happened.
    """

    def run(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().run(*args, **kwargs)
        except (EOFError, ConnectionError) as error:  # the manager is gone: the monitor shut down
            raise RuntimeError(
                "the server stopped: its model worker process ended (it crashed or was killed)"
            ) from error

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        monitor = next((t for t in threading.enumerate() if t.name == "litserve-monitoring"), None)
        if monitor is not None and monitor is not threading.current_thread():
            # From a thread of its own: this one's connection to the manager may still be
            # waiting on that event (a wait that Ctrl-C interrupted).
            stop_monitor = threading.Thread(target=self._stop_monitor, daemon=True)
            stop_monitor.start()
            stop_monitor.join(timeout=10)
            monitor.join(timeout=self.monitor_internal + 10)
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    def _stop_monitor(self) -> None:
        with contextlib.suppress(EOFError, OSError):  # the manager is gone, and the monitor with it
            self._shutdown_event.set()
