"""Verdicts written into the image files users keep, and read back from them.

A verdict is one JSON object (format 1; ``"nsfw_guard"`` first, ASCII only)::

    {"nsfw_guard": "0.1.0", "format": 1, "model": "Freepik/nsfw_image_detector",
     "level": "high", "scores": {"neutral": 0.01, "low": 0.02, "medium": 0.07, "high": 0.9},
     "flagged": true, "check_level": "medium", "threshold": 0.5, "action": "blur",
     "frames": 1, "frames_checked": 1, "reason": null}

``nsfw_guard`` is the version that wrote it, ``model`` the checkpoint (a Hub id, ``id@revision``
or a folder; ``null`` when the writer was not told), ``level`` and ``scores`` the image's as
checked (an animation's: its worst frame's), ``flagged`` whether it was flagged at
``check_level``/``threshold``, ``action`` what was done to the pixels of this file (``"blur"``,
``"pixelate"``, ``"blank"``, ``"regions"`` (the flagged regions, or the whole image where those
did not clear the flag), ``"custom"``; ``"none"``: flagged but left as it was; ``null``: not
flagged, nothing done). ``frames``, ``frames_checked`` and ``reason`` (why a guard blocked an
image without a verdict) are ``null`` when unknown.

Where it goes (:data:`VERDICT_FORMATS`): a PNG ``tEXt`` chunk named ``nsfw-guard``; EXIF
``UserComment`` (with its ``ASCII`` character code) in JPEG, MPO, WebP, TIFF and AVIF; the
comment of a GIF. Other formats (BMP, PPM, TGA, ICO, ICNS, ...) cannot carry it.

Metadata is untrusted input: :func:`read_verdict` gives back only a verdict that passes
:func:`validate_verdict`, raises :class:`VerdictMetadataError` for any other, and never says more
than a file's own bytes claim (anyone can write any verdict into a file).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from . import __version__

__all__ = [
    "FORMAT_VERSION",
    "MAX_VERDICT_BYTES",
    "METADATA_KEY",
    "VERDICT_FORMATS",
    "VerdictMetadataError",
    "make_verdict",
    "read_verdict",
    "save_with_verdict",
    "validate_verdict",
    "verdict_save_options",
]

FORMAT_VERSION = 1
METADATA_KEY = "nsfw-guard"
"""The PNG text chunk's keyword."""
MAX_VERDICT_BYTES = 64 * 1024
"""A verdict's largest encoded size: a longer one is refused, unread."""
VERDICT_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "TIFF", "AVIF", "GIF")
"""The Pillow formats that carry a verdict."""

_EXIF_FORMATS = ("JPEG", "MPO", "WEBP", "TIFF", "AVIF")
_USER_COMMENT = 0x9286
_ASCII_CODE = b"ASCII\0\0\0"
_UNICODE_CODE = b"UNICODE\0"
_UNDEFINED_CODE = b"\0" * 8
# A comment or UserComment is someone else's unless it opens like ours.
_OURS = re.compile(rb'\s*\{\s*"nsfw_guard"\s*:')
_LEVELS = ("neutral", "low", "medium", "high")
_ACTIONS = ("blur", "pixelate", "blank", "regions", "custom", "none")


class VerdictMetadataError(ValueError):
    """A file's verdict metadata is there but cannot be read, or a verdict is not valid."""


def make_verdict(
    *,
    model: str | os.PathLike | None,
    level: str,
    scores: Mapping[str, float],
    flagged: bool,
    check_level: str,
    threshold: float,
    action: str | Callable[..., Any] | None,
    frames: int | None = None,
    frames_checked: int | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """A valid verdict (format 1) from a check's results; levels may be ``NSFWLevel`` members,
    and a callable ``action`` is recorded as ``"custom"``.

    Example:
        >>> verdict = make_verdict(
        ...     model="Freepik/nsfw_image_detector", level="high",
        ...     scores={"neutral": 0.0, "low": 0.1, "medium": 0.2, "high": 0.7},
        ...     flagged=True, check_level="medium", threshold=0.5, action="blur",
        ... )
        >>> verdict["level"], verdict["action"], verdict["format"]
        ('high', 'blur', 1)
    """

    def name(value: Any) -> Any:
        return getattr(value, "value", value)  # an NSFWLevel member: its string

    return validate_verdict(
        {
            "nsfw_guard": __version__,
            "format": FORMAT_VERSION,
            "model": None if model is None else os.fspath(model),
            "level": name(level),
            "scores": {name(key): float(value) for key, value in scores.items()},
            "flagged": flagged,
            "check_level": name(check_level),
            "threshold": float(threshold),
            "action": "custom" if callable(action) else action,
            "frames": frames,
            "frames_checked": frames_checked,
            "reason": reason,
        }
    )


def validate_verdict(value: Any) -> dict[str, Any]:
    """``value`` as a format 1 verdict (its fields in order; unknown fields dropped), or
    :class:`VerdictMetadataError` saying which field is wrong.

    Example:
        >>> validate_verdict(  # doctest: +ELLIPSIS
        ...     {"nsfw_guard": "0.1.0", "format": 1, "level": "extreme"})
        Traceback (most recent call last):
        ...
        nsfw_guard.verdict_metadata.VerdictMetadataError: level: 'extreme' is not one of ...
    """
    if not isinstance(value, Mapping):
        raise VerdictMetadataError(f"expected a JSON object, got {type(value).__name__}")
    if value.get("format") != FORMAT_VERSION or isinstance(value.get("format"), bool):
        raise VerdictMetadataError(
            f"format {value.get('format')!r}: this version of nsfw-guard reads format "
            f"{FORMAT_VERSION}"
        )
    fields: dict[str, Any] = {}

    def field(key: str, accepted: str, ok: Any, optional: bool = False) -> None:
        if key not in value and not optional:
            raise VerdictMetadataError(f"{key}: missing")
        item = value.get(key)
        if not (optional and item is None) and not ok(item):
            raise VerdictMetadataError(f"{key}: {_short(item)} is not {accepted}")
        fields[key] = item

    def text(item: Any) -> bool:
        return isinstance(item, str) and len(item) <= 4096

    def count(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and item >= 0

    field("nsfw_guard", "a version string", lambda item: text(item) and len(item) <= 64)
    fields["format"] = FORMAT_VERSION
    field("model", "a model name or null", text, optional=True)
    field("level", f"one of {', '.join(_LEVELS)}", lambda item: item in _LEVELS)
    field("scores", "{neutral, low, medium, high} numbers in [0, 1]", _scores)
    fields["scores"] = {level: float(fields["scores"][level]) for level in _LEVELS}
    field("flagged", "true or false", lambda item: isinstance(item, bool))
    field("check_level", "low, medium or high", lambda item: item in _LEVELS[1:])
    field("threshold", "a number in [0, 1]", _unit_number)
    fields["threshold"] = float(fields["threshold"])
    field("action", f"one of {', '.join(_ACTIONS)} or null", lambda a: a in _ACTIONS, True)
    field("frames", "a frame count", count, optional=True)
    field("frames_checked", "a frame count", count, optional=True)
    field("reason", "a short text", text, optional=True)
    return fields


def verdict_save_options(
    fmt: str, verdict: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The keywords for ``Image.save`` that write ``verdict`` into a file of format ``fmt``,
    merged into ``params`` (a PNG's own ``pnginfo`` keeps its chunks); ``None`` when ``fmt``
    cannot carry it.

    Example:
        >>> sorted(verdict_save_options("GIF", make_verdict(
        ...     model=None, level="neutral", scores=dict.fromkeys(_LEVELS, 0.25),
        ...     flagged=False, check_level="medium", threshold=0.5, action=None)))
        ['comment']
        >>> verdict_save_options("BMP", {}) is None
        True
    """
    if fmt not in VERDICT_FORMATS:
        return None
    text = json.dumps(validate_verdict(verdict), separators=(",", ":"), allow_nan=False)
    options = dict(params or {})
    if fmt == "PNG":
        info = copy.deepcopy(options.get("pnginfo")) or PngInfo()
        info.add_text(METADATA_KEY, text)
        options["pnginfo"] = info
    elif fmt == "GIF":
        options["comment"] = text.encode("ascii")
    else:
        exif, given = Image.Exif(), options.get("exif")
        if given:  # the caller's own EXIF, kept
            exif.load(given.tobytes() if isinstance(given, Image.Exif) else given)
        # Set as a new dict: Pillow 10 does not write changes made in place through get_ifd.
        fields = dict(exif.get_ifd(ExifTags.IFD.Exif))
        fields[_USER_COMMENT] = _ASCII_CODE + text.encode("ascii")
        exif[ExifTags.IFD.Exif] = fields
        options["exif"] = exif.tobytes()
    return options


def save_with_verdict(
    image: Image.Image,
    fp: str | os.PathLike | BinaryIO,
    verdict: Mapping[str, Any],
    format: str | None = None,
    **params: Any,
) -> None:
    """Save ``image`` like ``Image.save`` (format from ``format`` or the file name), with
    ``verdict`` (see :func:`make_verdict`) in its metadata. A format that cannot carry it raises
    ``ValueError`` before anything is written.

    Example:
        >>> buffer = io.BytesIO()
        >>> verdict = make_verdict(
        ...     model="Freepik/nsfw_image_detector", level="low",
        ...     scores={"neutral": 0.3, "low": 0.6, "medium": 0.08, "high": 0.02},
        ...     flagged=False, check_level="medium", threshold=0.5, action=None,
        ... )
        >>> save_with_verdict(Image.new("RGB", (8, 8)), buffer, verdict, format="JPEG")
        >>> read_verdict(buffer.getvalue()) == verdict
        True
    """
    if format is None:
        name = os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else getattr(fp, "name", "")
        Image.init()
        format = Image.registered_extensions().get(Path(str(name)).suffix.lower())
    fmt = (format or "").upper()
    options = verdict_save_options(fmt, verdict, params)
    if options is None:
        what = f"format {fmt}" if fmt else "a file name without an image extension"
        raise ValueError(
            f"{what} cannot carry an nsfw-guard verdict; use one of "
            f"{', '.join(VERDICT_FORMATS)} (a file name ending in .png, .jpg, .webp, ...)"
        )
    image.save(fp, format=fmt, **options)


def read_verdict(source: bytes | str | os.PathLike | BinaryIO | Image.Image) -> dict | None:
    """The verdict in an image's metadata (file bytes, a path, a binary file or an opened
    image), or ``None`` when it has none. Metadata that names itself a verdict but is not a
    valid one (cut short, not JSON, wrong types, over :data:`MAX_VERDICT_BYTES`) raises
    :class:`VerdictMetadataError`, as does a file that is not an image Pillow can open. Only
    the file's headers are read, never its pixels.

    Example:
        >>> read_verdict("tests/data/rocket.jpg") is None
        True
    """
    if isinstance(source, Image.Image):
        return _read(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # large images: only the headers are read
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as error:  # not an image, or broken before its metadata
        raise VerdictMetadataError(f"not an image Pillow can open: {_short(error)}") from None
    with image:
        return _read(image)


def _read(image: Image.Image) -> dict[str, Any] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd EXIF
            candidates = _candidates(image)
    except Exception as error:  # hostile EXIF: Pillow's parser raises many kinds
        raise VerdictMetadataError(f"unreadable metadata: {_short(error)}") from None
    for raw, named in candidates:
        if named or _OURS.match(raw):
            return _parse(raw)
    return None


def _candidates(image: Image.Image) -> list[tuple[bytes, bool]]:
    """Where a verdict may be: ``(bytes, named ours)`` for the PNG chunk, EXIF UserComment and
    the file's comment. Only what Pillow read with the headers (a PNG's pixels are not decoded
    to find text chunks after them)."""
    found = []
    text = image.info.get(METADATA_KEY)
    if isinstance(text, str):
        found.append((text.encode("utf-8", "surrogateescape"), True))
    if "exif" in image.info or image.format == "TIFF":
        exif = image.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif).get(_USER_COMMENT)
        if comment is not None:
            found.append((_user_comment(comment, exif.endian), False))
    comment = image.info.get("comment")
    if isinstance(comment, bytes):
        found.append((comment, False))
    return found


def _user_comment(value: Any, endian: str | None) -> bytes:
    """A UserComment's text as bytes (its 8-byte character code removed; UTF-16 as UTF-8)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        return b""
    code, body = value[:8], value[8:]
    if code == _UNICODE_CODE:
        encoding = "utf-16-be" if endian == ">" else "utf-16-le"
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            encoding = "utf-16"
        return body.decode(encoding, "replace").encode("utf-8")
    return body if code in (_ASCII_CODE, _UNDEFINED_CODE) else b""


def _parse(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_VERDICT_BYTES:
        raise VerdictMetadataError(f"{len(raw)} bytes, over the {MAX_VERDICT_BYTES} a verdict has")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise VerdictMetadataError("not UTF-8 text") from None
    except (ValueError, RecursionError) as error:
        raise VerdictMetadataError(f"not JSON: {_short(error)}") from None
    return validate_verdict(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON has")


def _scores(item: Any) -> bool:
    return (
        isinstance(item, Mapping)
        and set(item) == set(_LEVELS)
        and all(_unit_number(score) for score in item.values())
    )


def _unit_number(item: Any) -> bool:
    return (
        isinstance(item, (int, float))
        and not isinstance(item, bool)
        and math.isfinite(item)
        and 0.0 <= item <= 1.0
    )


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, Exception) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
