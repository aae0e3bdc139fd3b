"""``nsfw-guard review RESULTS.jsonl``: a page for people to review what a scan found.

A small Starlette app over a scan's records (JSON lines, CSV or parquet): the page at ``/``
shows them as a grid of thumbnails (flagged ones blurred until hovered or clicked), filtered by
level and sorted by score on the server, a page at a time, so 10,000 records are as quick as
ten. Each decision (approve or reject, made with the keyboard or a click) is appended at once
to the decisions file beside the records (:func:`decisions_path`; the image's path, member,
realpath, bytes and mtime, the decision, the time: one ``O_APPEND`` write and an ``fsync`` per
decision, or none and an error when the disk is full), which the page reads back on reload. A
decision is about the version of the file the reviewer saw (as ``scan --resume`` tells versions
apart, :func:`~nsfw_guard.records.record_key`): a record of another file with the same path, or
of the file changed and scanned again, is undecided.
``/decisions.csv`` exports the latest decision per record.

Only the images the records name are ever read, by their index in the records: no route takes
a path. Thumbnails are made on demand (the same decode as ``scan``, shards included) and kept
in memory. Started with a model, it also makes each record's region map on demand
(``/map/N``: the map ``action="regions"`` uses, as a PNG of one colour whose alpha is the map,
none of the image's pixels), which the page draws over the blurred thumbnail.

Who may use it (:class:`ReviewGate`): with a ``key``, every route needs it, as a bearer token
or as the cookie that opening ``/?key=KEY`` sets (the address ``nsfw-guard review`` prints);
with ``hosts``, requests must name one of them in their ``Host`` header (so a web page cannot
reach a server on 127.0.0.1 through a DNS name of its own). A decision must come as JSON from
the page's own origin, so other sites cannot make one.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import functools
import io
import itertools
import json
import os
import time
import warnings
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import censor
from .access import bearer_matches, same_key, wrong_host
from .decode import decode_frames
from .inputs import ImageBatch
from .levels import parse_check_level
from .own_files import append_line, glued_lines
from .preprocess import seen_rgb
from .records import read_records, record_key
from .scoring import NSFWScorer
from .sources import ScanInput, find_images, read_input

__all__ = [
    "DECISIONS",
    "Decisions",
    "ReviewApp",
    "ReviewGate",
    "create_app",
    "decisions_path",
]

DECISIONS = ("approve", "reject")
THUMBNAIL_SIZE = 256
FRAME_MS = 200
"""How long an animation's thumbnail shows each of its frames."""
_SORTS = ("score", "path")
_LINE_START = b'{"path": '
"""How every line of a decisions file begins (``path`` is the first field written)."""
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

DecisionKey = tuple[str, int, float, str | None]
"""``(realpath, bytes, mtime, member)``: the image version a record or a decision is about, as
``scan --resume`` tells versions apart (:func:`~nsfw_guard.records.record_key`)."""


def decisions_path(results: str | os.PathLike) -> Path:
    """Where the decisions about ``results`` go, beside it: ``results.decisions.jsonl`` for
    ``results.jsonl``, ``results.csv.decisions.jsonl`` for ``results.csv`` (so that the two do
    not share one). A CSV or parquet record file's decisions made before that, at the
    ``results.decisions.jsonl`` of the first kind, are still found there while no
    ``results.jsonl`` is beside it and nothing is at the new name.

    Example:
        >>> decisions_path("scans/results.jsonl").as_posix()
        'scans/results.decisions.jsonl'
        >>> decisions_path("scans/results.csv").as_posix()
        'scans/results.csv.decisions.jsonl'
    """
    results = Path(results)
    by_stem = results.with_name(f"{results.stem}.decisions.jsonl")
    if results.suffix == ".jsonl":
        return by_stem
    by_name = results.with_name(f"{results.name}.decisions.jsonl")
    earlier = os.path.lexists(by_stem) and not os.path.lexists(by_name)
    return by_stem if earlier and not results.with_suffix(".jsonl").exists() else by_name


class Decisions:
    """The decisions file: appended to, one line per decision, never rewritten.

    ``latest()``: the latest decision per image version (:data:`DecisionKey`); ``path_only``:
    the latest per ``(path, member)`` of the lines written before decisions named the version.

    Example:
        >>> import tempfile
        >>> decisions = Decisions(Path(tempfile.mkdtemp()) / "r.decisions.jsonl")
        >>> image = {"path": "a.jpg", "realpath": "/data/a.jpg", "bytes": 10, "mtime": 1.5}
        >>> _ = decisions.add(image, "reject")
        >>> decisions.latest()[record_key(image)]["decision"]
        'reject'
    """

    def __init__(self, path: Path):
        self.path = path
        self._latest: dict[DecisionKey, dict[str, Any]] = {}
        self.path_only: dict[tuple[str, str | None], dict[str, Any]] = {}
        if path.is_symlink():  # appends never go through a link (O_NOFOLLOW): say so now
            raise ValueError(f"{path} is a link; nsfw-guard does not write through it")
        if not path.exists():
            return
        if not path.is_file():
            raise ValueError(f"{path} is not a regular file")
        data = path.read_bytes()
        *lines, tail = data.split(b"\n")  # tail: what follows the last line break
        cut_lines = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            entry = _decision(line)
            if entry is not None:
                self._keep(entry)
                continue
            try:
                glued = _glued_decisions(line)
            except ValueError:
                raise ValueError(
                    f"{path}, line {number}: not a decision; is this file nsfw-guard's?"
                ) from None
            for entry in glued:
                self._keep(entry)
            cut_lines.append(number)
        if cut_lines:
            warnings.warn(
                f"{path}, line(s) {', '.join(map(str, cut_lines))}: decisions cut short and "
                "glued together (written while the disk was full?); the whole ones are kept, "
                "the cut ones skipped and left in the file as they are",
                stacklevel=2,
            )
        if tail.strip():
            self._end_cut_line(tail, len(data) - len(tail), len(lines))

    def _keep(self, entry: dict[str, Any]) -> None:
        if "bytes" in entry:
            self._latest[record_key(entry)] = entry
        else:  # written before decisions named the version
            self.path_only[(entry["path"], entry.get("member"))] = entry

    def _end_cut_line(self, tail: bytes, end: int, whole: int) -> None:
        """A last line without its line break (a kill while it was appended): kept when it is a
        whole decision (the next append ends its line), else copied to a file of its own beside
        this one (never deleted) and cut off here, so that appends go on from the last whole
        line."""
        entry = _decision(tail)
        if entry is not None:
            self._keep(entry)
            return
        for number in itertools.count(1):
            aside = self.path.with_name(f"{self.path.name}.cut-line-{number}")
            try:
                descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
            except FileExistsError:
                continue
            break
        try:
            if os.write(descriptor, tail) < len(tail):  # the disk is full: cut nothing off
                raise OSError(errno.ENOSPC, "the cut line did not fit beside it", str(aside))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.truncate(self.path, end)  # only once the cut line is safe elsewhere
        warnings.warn(
            f"{self.path}: its last line was cut short (the review stopped while writing it); "
            f"{whole} whole line(s) kept, the cut line moved to {aside}",
            stacklevel=3,
        )

    def latest(self) -> dict[DecisionKey, dict[str, Any]]:
        return dict(self._latest)

    def add(self, record: Mapping[str, Any], decision: str) -> dict[str, Any]:
        """Append a decision about the image version ``record`` names (a single ``write`` to a
        file opened for appending, then ``fsync``): a kill never leaves half a line but the last
        one, and a decision is answered only once it is whole on disk (else ``OSError``)."""
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r}: expected one of {', '.join(DECISIONS)}")
        entry = {
            "path": record["path"],
            "member": record.get("member"),
            "realpath": record.get("realpath"),
            "bytes": int(record["bytes"]),
            "mtime": float(record["mtime"]),
            "decision": decision,
            "time": time.time(),
        }
        append_line(self.path, (json.dumps(entry, ensure_ascii=True) + "\n").encode())
        self._latest[record_key(entry)] = entry
        return entry


def _decision(line: bytes) -> dict[str, Any] | None:
    """The decision on one line of a decisions file, or ``None`` if it holds none. Lines
    written before decisions named the image's version lack ``realpath``, ``bytes`` and
    ``mtime``."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("decision") not in DECISIONS:
        return None
    if not isinstance(entry.get("path"), str) or not _is_text(entry.get("member")):
        return None
    if not _is_number(entry.get("time")):
        return None
    if "bytes" not in entry:
        return entry
    whole = isinstance(entry["bytes"], int) and not isinstance(entry["bytes"], bool)
    version = whole and _is_number(entry.get("mtime")) and _is_text(entry.get("realpath"))
    return entry if version else None


def _is_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _glued_decisions(line: bytes) -> list[dict[str, Any]]:
    """The whole decisions on a line that appends cut short (by a full disk) and the appends
    after them make: decisions, and decisions cut short, glued together. ``ValueError`` if a
    part is neither (the line is another program's).

    Example:
        >>> _glued_decisions(b'{"pa{"path": "a.jpg", "decision": "reject", "time": 1}')
        [{'path': 'a.jpg', 'decision': 'reject', 'time': 1}]
    """
    decisions = []
    for part in glued_lines(line, _LINE_START):
        entry = _decision(part)
        if entry is not None:
            decisions.append(entry)
        elif not _LINE_START.startswith(part[: len(_LINE_START)]) or _is_json(part):
            raise ValueError(f"{part[:40]!r}: neither a decision nor one cut short")
    return decisions


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


@dataclass
class _Item:
    index: int
    record: dict[str, Any]

    @functools.cached_property
    def key(self) -> DecisionKey:
        return record_key(self.record)

    @property
    def name(self) -> tuple[str, str | None]:
        return (self.record["path"], self.record.get("member"))

    def score(self) -> float:
        """How bad: its highest score at a level >= low (errors first)."""
        values = [self.record.get(name) for name in ("low", "medium", "high")]
        return 2.0 if self.record.get("error") else max((v or 0.0) for v in values)


class ReviewApp:
    """The review server's state and routes. ``Starlette(routes=ReviewApp(...).routes)``.

    ``scorer``: the model for the region maps (``/map/N``); ``None``: no maps.
    ``region_params``: the maps' ``map`` and ``cells`` (see :func:`region_overlay_map`).
    """

    def __init__(
        self,
        results: str | os.PathLike,
        cache_size: int = 2048,
        scorer: NSFWScorer | None = None,
        region_params: dict[str, Any] | None = None,
    ):
        self.results = Path(results)
        self.scorer = scorer
        self.region_params = censor.check_params("regions", region_params or {})
        self._model_lock = asyncio.Lock()
        self.items = [_Item(i, record) for i, record in enumerate(read_records(self.results))]
        self.decisions = Decisions(decisions_path(self.results))
        self._path_only = self._apply_path_only()
        self.counts = dict(  # records per level ("error" for errors): they never change
            Counter(
                "error" if item.record.get("error") else item.record.get("level") or "none"
                for item in self.items
            )
        )
        self.page = resources.files("nsfw_guard").joinpath("web/review.html").read_bytes()
        self._thumbnails: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = asyncio.Lock()
        self.routes = [
            Route("/", self.index),
            Route("/api/records", self.records),
            Route("/api/decisions", self.decide, methods=["POST"]),
            Route("/decisions.csv", self.export),
            Route("/thumbnail/{index:int}", self.thumbnail),
            Route("/map/{index:int}", self.region_map),
        ]

    def _apply_path_only(self) -> dict[DecisionKey, dict[str, Any]]:
        """The decisions written before they named the image's version, by the version each
        applies to: a decision applies to a record when no other record has its path and member
        and its file is older than the decision; else to none (it may be of another file)."""
        named: defaultdict[tuple[str, str | None], list[_Item]] = defaultdict(list)
        for item in self.items:
            named[item.name].append(item)
        applied, unsure = {}, 0
        for name, entry in self.decisions.path_only.items():
            items = named.get(name, [])
            if len(items) == 1 and float(items[0].record["mtime"]) <= entry["time"]:
                applied[items[0].key] = entry
            elif items:
                unsure += 1
        if unsure:
            warnings.warn(
                f"{self.decisions.path}: {unsure} decision(s) written before decisions named "
                "the image's version are not applied: another record has the same path, or the "
                "file changed after the decision",
                stacklevel=3,
            )
        return applied

    def _latest(self) -> dict[DecisionKey, dict[str, Any]]:
        return {**self._path_only, **self.decisions.latest()}

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def records(self, request: Request) -> JSONResponse:
        """A page of records: ``level`` (a level or ``flagged``/``error``/``undecided``),
        ``sort`` (``score``, worst first, or ``path``), ``offset``, ``limit``."""
        query = request.query_params
        try:
            offset = max(0, int(query.get("offset", 0)))
            limit = min(500, max(1, int(query.get("limit", 100))))
        except ValueError:
            return _error(400, "offset and limit must be integers")
        sort = query.get("sort", "score")
        if sort not in _SORTS:
            return _error(400, f"sort {sort!r}: expected one of {', '.join(_SORTS)}")
        latest = self._latest()
        selected = [item for item in self.items if _matches(item, query.get("level"), latest)]
        if sort == "score":
            selected.sort(key=lambda item: -item.score())
        else:
            selected.sort(key=lambda item: item.name[0] + "\0" + (item.name[1] or ""))
        return JSONResponse(
            {
                "total": len(selected),
                "all": len(self.items),
                "counts": self.counts,
                "decided": sum(1 for item in self.items if item.key in latest),
                "maps": self.scorer is not None,
                "records": [
                    _shown(item, latest.get(item.key)) for item in selected[offset : offset + limit]
                ],
            }
        )

    async def decide(self, request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, 'send the decision as application/json: {"index", "decision"}')
        try:
            body = await request.json()
            index, decision = body["index"], body["decision"]
        except (ValueError, KeyError, TypeError):
            index = decision = None
        if type(index) is not int or not isinstance(decision, str):  # not 1.9, "1" or true
            return _error(400, 'send {"index": N, "decision": "approve" or "reject"}')
        if not 0 <= index < len(self.items) or decision not in DECISIONS:
            return _error(400, f"no record {index}, or a decision other than approve/reject")
        try:
            async with self._lock:  # one append at a time, in the order they came
                entry = await asyncio.to_thread(
                    self.decisions.add, self.items[index].record, decision
                )
        except OSError as error:  # nothing kept: the page says so, the reviewer decides again
            status = 507 if error.errno in _DISK_FULL else 500
            return _error(status, f"the decision was not saved: {error}")
        return JSONResponse({"index": index, **entry})

    async def export(self, request: Request) -> Response:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "member", "decision", "time", "level", "flagged", "realpath"])
        latest = self._latest()
        for item in self.items:  # a row per decided record: its decision, never another file's
            entry = latest.get(item.key)
            if entry is None:
                continue
            record = item.record
            row = [*item.name, entry["decision"], entry["time"], record.get("level")]
            cells = (*row, record.get("flagged"), record.get("realpath"))
            writer.writerow([_inert(cell) for cell in cells])
        name = f"{self.results.stem}.decisions.csv"
        return Response(
            buffer.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    async def thumbnail(self, request: Request) -> Response:
        index = request.path_params["index"]
        if not 0 <= index < len(self.items):
            return _error(404, f"no record {index}")
        thumbnail = self._thumbnails.get(index)
        if thumbnail is None:
            try:
                thumbnail = await asyncio.to_thread(self._make_thumbnail, self.items[index].record)
            except Exception as error:  # gone, changed, unreadable: say so, in the grid
                return _error(404, f"{type(error).__name__}: {error}")
            self._thumbnails[index] = thumbnail
            if len(self._thumbnails) > self._cache_size:
                self._thumbnails.popitem(last=False)
        self._thumbnails.move_to_end(index)
        data, media_type = thumbnail
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    async def region_map(self, request: Request) -> Response:
        """The record's region map at ``level`` (default: the record's own level, or medium):
        a PNG overlay (see :mod:`nsfw_guard.overlay`)."""
        from .overlay import overlay_png, region_overlay_map

        index = request.path_params["index"]
        if self.scorer is None:
            return _error(404, "no region maps: start nsfw-guard review with --model MODEL")
        if not 0 <= index < len(self.items):
            return _error(404, f"no record {index}")
        record = self.items[index].record
        shown = record.get("level") if record.get("level") in ("low", "medium", "high") else None
        try:
            level = parse_check_level(request.query_params.get("level", shown or "medium"))
        except ValueError as error:
            return _error(400, str(error))
        try:
            data = await asyncio.to_thread(_recorded_bytes, record)
        except Exception as error:  # gone, changed, unreadable: as for thumbnails
            return _error(404, f"{type(error).__name__}: {error}")
        try:
            async with self._model_lock:  # one map at a time on the model
                region_map = await asyncio.to_thread(
                    region_overlay_map, self.scorer, data, level, self.region_params
                )
        except Exception as error:  # a file cut short or odd inside
            return _error(422, f"no map for record {index}: {type(error).__name__}: {error}")
        headers = {
            "X-NSFW-Map-Level": level.value,
            "X-NSFW-Map-Frame": str(region_map.frame),
            "Cache-Control": "max-age=3600",
        }
        return Response(overlay_png(region_map.values), media_type="image/png", headers=headers)

    def _make_thumbnail(self, record: dict[str, Any]) -> tuple[bytes, str]:
        """The record's image as a JPEG thumbnail, or an animation's every frame as an animated
        WebP (``FRAME_MS`` a frame): ``(bytes, media type)``."""
        data = _recorded_bytes(record)
        frames = [_thumbnail(frame) for frame in decode_frames(data, None, THUMBNAIL_SIZE)]
        size = (max(f.width for f in frames), max(f.height for f in frames))
        frames = [_on_canvas(frame, size) for frame in frames]  # an icon's sizes differ
        buffer = io.BytesIO()
        if len(frames) == 1:
            frames[0].save(buffer, format="JPEG", quality=85)
            return buffer.getvalue(), "image/jpeg"
        # Every frame, each long enough to be seen: a frame nobody can see is not reviewed.
        frames[0].save(
            buffer,
            format="WEBP",
            save_all=True,
            append_images=frames[1:],
            duration=FRAME_MS,
            loop=0,
            quality=80,
        )
        return buffer.getvalue(), "image/webp"


def _recorded_bytes(record: dict[str, Any]) -> bytes:
    """The bytes of the image a record names, if its file is still the version scanned."""
    path = record.get("realpath") or record["path"]
    info = os.stat(path)
    if (info.st_size, info.st_mtime) != (record["bytes"], record["mtime"]):
        raise FileExistsError("the file changed since it was scanned")
    source = _shard_members(path, info.st_size, info.st_mtime).get(record.get("member"))
    if source is None:
        raise FileNotFoundError(f"{path}: no {record.get('member') or 'image'} there now")
    return read_input(source)  # a shard's member: checked again to be this version


def _thumbnail(frame: ImageBatch) -> Image.Image:
    """A decoded frame as the RGB thumbnail people see (alpha over white, as the model sees it)."""
    array = (seen_rgb(frame)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    image = Image.fromarray(array.numpy())
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return image


def _on_canvas(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` centred on a white canvas of ``size`` (the image itself when it fits)."""
    if image.size == size:
        return image
    canvas = Image.new("RGB", size, "white")
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    return canvas


@functools.lru_cache(maxsize=64)
def _shard_members(path: str, size: int, mtime: float) -> dict[str | None, ScanInput]:
    """The inputs in the file at ``path`` (one, or a shard's members), by member name; listed
    once per version of the file."""
    return {item.member and item.member.name: item for item in find_images([path])}


def _inert(cell: Any) -> Any:
    """A CSV cell no spreadsheet runs as a formula: text beginning with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return gets a leading ``'`` (OWASP's advice on CSV injection).

    Example:
        >>> _inert("=HYPERLINK(1)"), _inert("photos/a.jpg"), _inert(0.5)
        ("'=HYPERLINK(1)", 'photos/a.jpg', 0.5)
    """
    if isinstance(cell, str) and cell.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + cell
    return cell


def _matches(item: _Item, level: str | None, latest: dict) -> bool:
    record = item.record
    if not level or level == "all":
        return True
    if level == "flagged":
        return bool(record.get("flagged"))
    if level == "error":
        return bool(record.get("error"))
    if level == "undecided":
        return item.key not in latest
    return record.get("level") == level


def _shown(item: _Item, decision: dict[str, Any] | None) -> dict[str, Any]:
    record = item.record
    return {
        "index": item.index,
        "path": record["path"],
        "member": record.get("member"),
        "level": record.get("level"),
        "flagged": record.get("flagged"),
        "error": record.get("error"),
        "scores": {name: record.get(name) for name in ("neutral", "low", "medium", "high")},
        "decision": decision and decision["decision"],
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status)


class ReviewGate:
    """ASGI middleware: who may use the review server (see the module's docstring).

    ``key``: required on every route (``Authorization: Bearer KEY``, or the cookie that
    ``GET /?key=KEY`` sets before it redirects to ``/``); ``None``: no key. ``hosts``: the
    names the ``Host`` header may give (``None``: any).
    """

    def __init__(self, app: ASGIApp, key: str | None = None, hosts: frozenset[str] | None = None):
        self.app = app
        self.key = key
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(Request(scope))
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        refusal = wrong_host(host, self.hosts)
        if refusal is not None:
            return _error(400, refusal)
        origin = request.headers.get("origin")
        own = (None, f"http://{host}", f"https://{host}")
        if request.method not in ("GET", "HEAD") and origin not in own:
            return _error(403, f"a request from {origin!r}: only the review page may send one")
        if self.key is None:
            return None
        cookie = f"nsfw_guard_review_{request.url.port or 80}"
        given = request.query_params.get("key")
        if request.url.path == "/" and given is not None and same_key(given, self.key):
            response = RedirectResponse("./", status_code=303)  # the key leaves the address bar
            response.set_cookie(cookie, self.key, httponly=True, samesite="lax")
            return response
        bearer = bearer_matches(request.headers.get("authorization", ""), self.key)
        if bearer or same_key(request.cookies.get(cookie, ""), self.key):
            return None
        if request.url.path == "/":
            return HTMLResponse(_NO_KEY_PAGE, 401)
        return _error(401, "missing or wrong key: open the address nsfw-guard review printed")


_NO_KEY_PAGE = (
    "<!doctype html><title>nsfw-guard review</title><p>This review page needs its key: open "
    "the address <code>nsfw-guard review</code> printed (it ends in <code>?key=...</code>).</p>"
)


def create_app(
    results: str | os.PathLike,
    key: str | None = None,
    hosts: frozenset[str] | None = None,
    scorer: NSFWScorer | None = None,
    region_params: dict[str, Any] | None = None,
) -> Starlette:
    """The review server's app for a record file, behind a :class:`ReviewGate` with ``key``
    and ``hosts``; with a ``scorer``, it serves region maps (made with ``region_params``).

    Example:
        >>> import tempfile
        >>> from nsfw_guard.records import RecordFile, _example
        >>> results = Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> with RecordFile(results) as file:
        ...     file.write([_example("a.jpg")])
        >>> from starlette.testclient import TestClient
        >>> client = TestClient(create_app(results, key="secret"))
        >>> client.get("/api/records").status_code
        401
        >>> client.get("/api/records", headers={"Authorization": "Bearer secret"}).json()["total"]
        1
    """
    gate = Middleware(ReviewGate, key=key, hosts=hosts)
    app = ReviewApp(results, scorer=scorer, region_params=region_params)
    return Starlette(routes=app.routes, middleware=[gate])
