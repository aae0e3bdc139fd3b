"""Verdicts in image files (:mod:`nsfw_guard.verdict_metadata`), and ``nsfw-guard check`` reading
them back: real files, hostile metadata included."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from nsfw_guard import make_verdict, read_verdict, save_with_verdict
from nsfw_guard.cli import EXIT_FLAGGED, EXIT_OK, main
from nsfw_guard.verdict_metadata import MAX_VERDICT_BYTES, VERDICT_FORMATS, VerdictMetadataError

from .conftest import PHOTO_PATHS

CLEAN = make_verdict(
    model="Freepik/nsfw_image_detector@main",
    level="neutral",
    scores={"neutral": 0.97, "low": 0.02, "medium": 0.007, "high": 0.003},
    flagged=False,
    check_level="medium",
    threshold=0.5,
    action=None,
)


def _png(text: str | bytes, key: str = "nsfw-guard") -> bytes:
    """A PNG whose text chunk ``key`` holds ``text`` as it is (bytes: a raw tEXt chunk)."""
    info = PngInfo()
    info.add_text(key, text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _jpeg_with_user_comment(comment: bytes, endian: str = ">") -> bytes:
    exif = Image.Exif()
    exif.endian = endian
    exif[ExifTags.IFD.Exif] = {0x9286: comment}  # Pillow 10 drops changes made through get_ifd
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


AVIF = pytest.param(
    ".avif",
    marks=pytest.mark.skipif(".avif" not in Image.registered_extensions(), reason="Pillow < 11.3"),
)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif", ".gif", AVIF])
def test_save_with_verdict_round_trips_in_every_format_that_carries_one(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    save_with_verdict(Image.new("RGB", (16, 12), (40, 80, 120)), path, CLEAN)
    with Image.open(path) as image:
        assert image.format in VERDICT_FORMATS and image.size == (16, 12)
    assert read_verdict(path) == read_verdict(path.read_bytes()) == CLEAN
    with open(path, "rb") as file:
        assert read_verdict(file) == CLEAN


def test_the_verdict_is_ascii_json_read_from_the_headers_alone():
    verdict = {**CLEAN, "model": "/models/modèle ü"}
    buffer = io.BytesIO()
    save_with_verdict(Image.new("RGB", (64, 64)), buffer, verdict, format="PNG")
    with Image.open(buffer) as image:
        assert image.text["nsfw-guard"].isascii()
    # Its pixels cut short: the verdict, before them, is still read (they are never decoded).
    cut = buffer.getvalue()[: buffer.getvalue().index(b"IDAT") + 10]
    assert read_verdict(cut) == verdict


def test_save_with_verdict_keeps_the_callers_own_metadata(tmp_path):
    text = PngInfo()
    text.add_text("prompt", "a lighthouse")
    save_with_verdict(Image.new("RGB", (8, 8)), tmp_path / "a.png", CLEAN, pnginfo=text)
    with Image.open(tmp_path / "a.png") as image:
        assert image.text["prompt"] == "a lighthouse"
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    save_with_verdict(Image.new("RGB", (8, 8)), tmp_path / "a.jpg", CLEAN, exif=exif)
    with Image.open(tmp_path / "a.jpg") as image:
        assert image.getexif()[0x010F] == "Camera maker"
    assert read_verdict(tmp_path / "a.png") == read_verdict(tmp_path / "a.jpg") == CLEAN
    assert [chunk[:2] for chunk in text.chunks] == [(b"tEXt", b"prompt\0a lighthouse")]  # untouched


def test_a_format_that_cannot_carry_a_verdict_is_refused_before_anything_is_written(tmp_path):
    for name in ("image.bmp", "image.ico", "image.unknown"):
        with pytest.raises(ValueError, match="cannot carry an nsfw-guard verdict; use one of PNG"):
            save_with_verdict(Image.new("RGB", (8, 8)), tmp_path / name, CLEAN)
        assert not (tmp_path / name).exists()


def test_files_without_a_verdict_and_other_tools_comments_have_none(tmp_path):
    assert read_verdict(PHOTO_PATHS[0]) is None
    assert read_verdict(_png("a prompt", key="parameters")) is None
    assert read_verdict(_jpeg_with_user_comment(b"ASCII\0\0\0Shot on a phone")) is None
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF", comment=b"made with GIMP")
    assert read_verdict(gif.getvalue()) is None


@pytest.mark.parametrize(("endian", "encoding"), [("<", "utf-16-le"), (">", "utf-16-be")])
def test_a_utf16_user_comment_is_read_in_the_exif_byte_order(endian, encoding):
    text = json.dumps(CLEAN).encode(encoding)
    assert read_verdict(_jpeg_with_user_comment(b"UNICODE\0" + text, endian)) == CLEAN


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_png(json.dumps(CLEAN)[:-20]), "not JSON"),  # cut short
        (_png("[" * 20000 + "]" * 20000), "not JSON"),  # nested past the parser's stack
        (_png(json.dumps({**CLEAN, "level": 3})), "level: 3 is not one of"),
        (_png(json.dumps({**CLEAN, "flagged": "no"})), "flagged: 'no' is not true or false"),
        (_png(json.dumps({**CLEAN, "scores": {"neutral": 1}})), "scores: "),
        (_png(json.dumps({**CLEAN, "threshold": "NaN"})), "threshold: 'NaN' is not a number"),
        (_png(json.dumps(CLEAN).replace("0.5", "NaN")), "not JSON: NaN is not a number"),
        (_png(json.dumps({**CLEAN, "model": ["a"]})), "model: ['a'] is not"),
        (_png(json.dumps({**CLEAN, "format": 2})), "format 2: this version of nsfw-guard reads"),
        (_png(json.dumps([CLEAN])), "expected a JSON object, got list"),
        (_png(json.dumps({**CLEAN, "model": "m" * MAX_VERDICT_BYTES})), "bytes, over the 65536"),
        (_jpeg_with_user_comment(b'ASCII\0\0\0{"nsfw_guard": "\xff\xfe"}'), "not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not an image Pillow can open"),
    ],
)
def test_hostile_metadata_is_a_clear_error_never_a_crash(data, message):
    with pytest.raises(VerdictMetadataError, match=re.escape(message)):
        read_verdict(data)


# nsfw-guard check ---------------------------------------------------------------------------------


def _check(capsys, checkpoint, *paths) -> tuple[int, list[list[str]]]:
    code = main(["check", "--device", "cpu", "--model", str(checkpoint), *map(str, paths)])
    return code, [line.split("\t") for line in capsys.readouterr().out.splitlines()]


def test_check_shows_a_censored_copys_recorded_verdict(level_checkpoints, tmp_path, capsys):
    source, copies = tmp_path / "photos", tmp_path / "copies"
    source.mkdir()
    Image.open(PHOTO_PATHS[0]).save(source / "one.jpg")
    model = level_checkpoints["high"]
    options = ["--output", tmp_path / "r.jsonl", "--censor-to", copies, "--action", "pixelate"]
    scan = ["scan", source, "--device", "cpu", "--workers", "0", "--quiet", "--model", model]
    main([str(arg) for arg in [*scan, *options]])
    capsys.readouterr()
    neutral = level_checkpoints["neutral"]
    code, lines = _check(capsys, neutral, copies / "one.jpg", source / "one.jpg")
    assert code == EXIT_OK  # its own verdict decides; the recorded one is shown beside it
    (copy_line, original_line) = lines
    assert copy_line[1:4:2] == ["neutral", "ok"]
    assert copy_line[4] == (
        f"recorded: level=high FLAGGED censored=pixelate at=medium/0.5 "
        f"model={os.path.realpath(model)}"
    )
    assert len(original_line) == 4  # no metadata: the line as it always was


def test_a_forged_verdict_never_lowers_checks_own(level_checkpoints, tmp_path, capsys):
    forged = tmp_path / "forged.png"
    model = "evil\x1b[2J\nmodel"
    save_with_verdict(Image.open(PHOTO_PATHS[0]), forged, {**CLEAN, "model": model})
    code, [line] = _check(capsys, level_checkpoints["high"], forged)
    assert code == EXIT_FLAGGED and line[1:4:2] == ["high", "FLAGGED"]
    # What the file claims, with its control characters escaped (no terminal escapes).
    assert line[4] == "recorded: level=neutral ok at=medium/0.5 model=evil\\x1b[2J\\nmodel"


def test_check_says_when_a_recorded_verdict_cannot_be_read(level_checkpoints, tmp_path, capsys):
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(_png(json.dumps(CLEAN)[:-20]))
    flagged_uncensored = tmp_path / "flagged.gif"
    verdict = {**CLEAN, "level": "high", "flagged": True, "action": "none"}
    save_with_verdict(Image.new("RGB", (8, 8)), flagged_uncensored, verdict)
    code, lines = _check(capsys, level_checkpoints["neutral"], damaged, flagged_uncensored)
    assert code == EXIT_OK
    assert lines[0][3] == "ok" and lines[0][4].startswith("recorded: unreadable (not JSON: ")
    assert lines[1][4].startswith("recorded: level=high FLAGGED not-censored at=medium/0.5")
