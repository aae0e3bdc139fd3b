"""``save_censored``: a censored image in its own format where Pillow can write RGB in it, else
PNG (``serve``'s /v1/censor answers and ``scan --censor-to`` copies both come from it); the
manifest of the copies ``scan --censor-to`` wrote, through a full disk and kills."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from nsfw_guard.check import CheckStep
from nsfw_guard.cli import main
from nsfw_guard.copies import MANIFEST_NAME, CopyFolder, save_censored
from nsfw_guard.verdict_metadata import VERDICT_FORMATS, make_verdict, read_verdict

from .conftest import file_size_limit

VERDICT = make_verdict(
    model="Freepik/nsfw_image_detector",
    level="high",
    scores={"neutral": 0.01, "low": 0.02, "medium": 0.03, "high": 0.94},
    flagged=True,
    check_level="medium",
    threshold=0.5,
    action="blank",
    frames=1,
    frames_checked=1,
)


@pytest.fixture(scope="module")
def blank(detector) -> CheckStep:
    return CheckStep(detector.scorer, action="blank")


@pytest.mark.parametrize(
    ("fmt", "mode", "written"),
    [
        # Pillow reads these, and writes them only in other modes (1-bit, palette): PNG.
        ("XBM", "1", "PNG"),
        ("MSP", "1", "PNG"),
        ("BLP", "P", "PNG"),
        # Pillow writes RGB in these: the image's own format, whatever its mode was.
        ("PNG", "RGBA", "PNG"),
        ("WEBP", "RGB", "WEBP"),
        ("BMP", "P", "BMP"),
        ("GIF", "L", "GIF"),
        ("TIFF", "1", "TIFF"),
        ("PCX", "P", "PCX"),
        ("JPEG", "L", "JPEG"),
        ("SPIDER", "F", "SPIDER"),  # a single image, whose decode refused seek(0)
    ],
)
def test_a_censored_image_keeps_its_format_where_pillow_can_write_rgb_in_it(
    blank, tmp_path, fmt, mode, written
):
    original = io.BytesIO()
    image = Image.new(mode, (40, 30), 1)
    if mode == "P":  # a whole palette: Pillow 10.1 writes a BMP of a short one it cannot read
        image.putpalette([0, 0, 0, 255, 0, 0] * 128)
    image.save(original, format=fmt)
    for target in (io.BytesIO(), tmp_path / f"copy.{fmt.lower()}"):  # serve's, scan's
        assert save_censored(original.getvalue(), target, blank, VERDICT) == written
        saved = target.getvalue() if isinstance(target, io.BytesIO) else target.read_bytes()
        with Image.open(io.BytesIO(saved)) as image:
            assert image.format == written and image.size == (40, 30)
            assert max(image.convert("L").getextrema()) <= 8  # blanked black
        # The verdict, in every format that can carry one (BMP, PCX, SPIDER cannot).
        assert read_verdict(saved) == (VERDICT if written in VERDICT_FORMATS else None)
    if written in ("JPEG", "WEBP", "TIFF"):  # EXIF UserComment, with its character code
        with Image.open(io.BytesIO(saved)) as image:
            comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[0x9286]
        assert comment.startswith(b"ASCII\0\0\0{")


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_every_frame_of_an_animation_is_censored_and_the_copy_carries_the_verdict(detector, fmt):
    blur = CheckStep(detector.scorer, action="blur")  # frames stay apart (blank ones merge)
    frames = [Image.new("RGB", (24, 16), (100 * i, 200, 100)) for i in range(3)]
    original = io.BytesIO()
    frames[0].save(original, format=fmt, save_all=True, append_images=frames[1:], duration=50)
    copy = io.BytesIO()
    assert save_censored(original.getvalue(), copy, blur, VERDICT) == fmt
    with Image.open(io.BytesIO(copy.getvalue())) as image:
        assert image.n_frames == 3
    assert read_verdict(copy.getvalue()) == VERDICT


def test_a_verdict_that_is_not_valid_is_refused_before_anything_is_written(blank):
    original = io.BytesIO()
    Image.new("RGB", (8, 8)).save(original, format="PNG")
    target = io.BytesIO()
    with pytest.raises(ValueError, match="level: 'extreme' is not one of"):
        save_censored(original.getvalue(), target, blank, {**VERDICT, "level": "extreme"})
    assert target.getvalue() == b""


def test_frames_that_cannot_be_checked_are_blanked_whatever_the_action(detector):
    """NaN pixels (a float TIFF): the verdict cannot stand, so the copy is blanked, not blurred or
    censored in regions (whose re-check would score the NaN-free version as clean)."""
    pixels = np.full((48, 64), 0.8, dtype=np.float32)
    pixels[10:14, 10:14] = np.nan
    original = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(original, "TIFF")
    for action in ("blur", "regions"):
        step = CheckStep(detector.scorer, action=action, threshold=0.0)
        saved = io.BytesIO()
        save_censored(original.getvalue(), saved, step, VERDICT)
        with Image.open(saved) as image:
            assert max(image.convert("L").getextrema()) == 0, action


def test_an_animation_is_censored_whole_frame_by_frame_with_regions(detector):
    """Regions cost some 50 forwards a frame: an animation's frames get the regions' own censor
    over the whole frame (a blur here), as the whole-frame step gives them."""
    frames = [Image.new("RGB", (48, 48), (40 * i, 200, 90)) for i in range(4)]
    for frame in frames:
        frame.paste((255, 255, 255), (8, 8, 24, 24))
    original = io.BytesIO()
    frames[0].save(original, "GIF", save_all=True, append_images=frames[1:])
    regions = CheckStep(detector.scorer, action="regions", threshold=0.0)
    blur = CheckStep(detector.scorer, action="blur", threshold=0.0)
    assert regions.whole_frames().censor_params == blur.censor_params
    by_regions, by_blur = io.BytesIO(), io.BytesIO()
    save_censored(original.getvalue(), by_regions, regions, VERDICT)
    save_censored(original.getvalue(), by_blur, blur, VERDICT)
    with Image.open(by_regions) as got, Image.open(by_blur) as expected:
        assert got.n_frames == expected.n_frames == 4
        for index in range(4):
            got.seek(index)
            expected.seek(index)
            assert np.array_equal(
                np.asarray(got.convert("RGB")), np.asarray(expected.convert("RGB"))
            )


# The manifest of copies -------------------------------------------------------------------------


def _manifest_lines(folder: CopyFolder) -> list[dict]:
    """The manifest's lines, each of which must be whole."""
    data = folder.manifest.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("room", [10, 0], ids=["cut-short", "not-written"])
def test_a_manifest_line_the_disk_has_no_room_for_fails_that_copy_alone(tmp_path, room):
    """The line is cut short (``room`` bytes fit) or not written at all: its copy fails and is
    not renamed in, the manifest is left as it was, the next copy's line is whole and the failed
    copy can be written again."""
    out = tmp_path / "out"
    folder = CopyFolder(out)
    folder.write_bytes(Path("old.png"), b"an earlier copy")
    before = folder.manifest.read_bytes()
    with file_size_limit(len(before) + room), pytest.raises(OSError) as failed:
        folder.write_bytes(Path("a.png"), b"a")
    assert folder.manifest.read_bytes() == before
    expected = f"only {room} of [0-9]+ bytes of a line could be appended" if room else "too large"
    assert re.search(expected, str(failed.value))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "old.png"]
    folder.write_bytes(Path("b.png"), b"b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unreadable line
        folder = CopyFolder(out)
    assert [line["path"] for line in _manifest_lines(folder)] == ["old.png", "b.png"]
    assert folder.kind(out / "b.png") == folder.kind(out / "old.png") == "clean"
    folder.write_bytes(Path("a.png"), b"a")  # tried again, with room
    assert CopyFolder(out).kind(out / "a.png") == "clean"


def test_a_line_cut_by_a_kill_never_swallows_the_next_one(tmp_path):
    out = tmp_path / "out"
    CopyFolder(out).write_bytes(Path("a.png"), b"a")
    with out.joinpath(MANIFEST_NAME).open("a") as manifest:
        manifest.write('{"path": "b.png", "si')  # a kill while b.png's line was appended
    with pytest.warns(UserWarning, match="1 unreadable line"):
        folder = CopyFolder(out)
    folder.write_bytes(Path("c.png"), b"c")
    lines = out.joinpath(MANIFEST_NAME).read_text().splitlines()
    assert lines[1] == '{"path": "b.png", "si' and json.loads(lines[2])["path"] == "c.png"
    with pytest.warns(UserWarning, match="1 unreadable line"):
        folder = CopyFolder(out)
    assert folder.kind(out / "a.png") == folder.kind(out / "c.png") == "clean"


def test_a_whole_line_appended_to_a_cut_one_is_still_read(tmp_path):
    """What nsfw-guard left before it ended cut lines: a line cut short by a full disk, the
    next copy's line appended to it."""
    out = tmp_path / "out"
    folder = CopyFolder(out)
    folder.write_bytes(Path("a.png"), b"a")
    folder.write_bytes(Path("b.png"), b"b")
    first, second = out.joinpath(MANIFEST_NAME).read_text().splitlines(keepends=True)
    out.joinpath(MANIFEST_NAME).write_text(first + '{"path": "' + second)
    with pytest.warns(UserWarning, match="1 unreadable line"):
        folder = CopyFolder(out)
    assert folder.kind(out / "a.png") == folder.kind(out / "b.png") == "clean"


def _scan(*args) -> int:
    """``nsfw-guard scan`` in this process, on the CPU; its exit code."""
    try:
        return main(["scan", "--device", "cpu", "--workers", "0", "--quiet", *map(str, args)])
    except SystemExit as exit_info:
        return exit_info.code


def test_resume_replaces_an_older_copy_after_a_kill_before_its_rename(level_checkpoints, tmp_path):
    """Killed after the manifest listed a censored version of a clean copy and before that
    version was renamed in: the clean copy is still nsfw-guard's, and --resume censors it."""
    photos, out, output = tmp_path / "photos", tmp_path / "out", tmp_path / "r.jsonl"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (200, 0, 0)).save(photos / name)
    args = [photos, "--output", output, "--censor-to", out]
    assert _scan(*args, "--model", level_checkpoints["neutral"], "--copy-clean") == 0
    clean = (out / "a.png").read_bytes()
    # The state a kill leaves: the new version written and listed, never renamed in.
    pending = out / ".nsfw-guard-killed.tmp"
    pending.write_bytes(b"the censored version")
    info = pending.stat()
    line = {"path": "a.png", "size": info.st_size, "mtime_ns": info.st_mtime_ns, "censored": True}
    with out.joinpath(MANIFEST_NAME).open("a") as manifest:
        manifest.write(json.dumps(line) + "\n")
    assert CopyFolder(out).kind(out / "a.png") == "clean"
    assert _scan(*args, "--model", level_checkpoints["high"], "--resume") == 0
    folder = CopyFolder(out)
    for name in ("a.png", "b.png"):
        assert folder.kind(out / name) == "censored"
        assert read_verdict((out / name).read_bytes())["level"] == "high"
    assert (out / "a.png").read_bytes() != clean
    assert pending.read_bytes() == b"the censored version"  # never read, never removed


def test_new_copies_and_record_files_get_the_usual_permissions(level_checkpoints, tmp_path):
    """Like any new file of the user's (0o666 less the umask), not a temporary file's 0o600: other
    users and programs can read the copies and the records, as they could the originals."""
    photos, out, output = tmp_path / "photos", tmp_path / "out", tmp_path / "r.jsonl"
    photos.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(photos / "a.png")
    previous = os.umask(0o022)
    try:
        args = [photos, "--output", output, "--censor-to", out, "--copy-clean"]
        assert _scan(*args, "--model", level_checkpoints["neutral"]) == 0
    finally:
        os.umask(previous)
    for path in (output, out / "a.png", out / MANIFEST_NAME):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
