"""nsfw-guard scan on a real folder of good and bad files, run for real (in and out of process)."""

import csv
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsfw_guard.cli import (
    EXIT_FILE_ERRORS,
    EXIT_FLAGGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    main,
)
from nsfw_guard.copies import MANIFEST_NAME
from nsfw_guard.scan import RECORD_FIELDS, find_images, read_records
from nsfw_guard.verdict_metadata import read_verdict

from .conftest import PHOTO_PATHS

BAD = ("empty.jpg", "truncated.jpg", "notes.jpg", "loop.jpg", "bomb.png")
COUNT = 100  # images of the kill-and-resume test


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Real photos in nested folders, odd modes, an animation, and every kind of bad file."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "b").mkdir(parents=True)
    photos = [Image.open(p).convert("RGB") for p in PHOTO_PATHS[:4]]
    photos[0].save(root / "photo.jpg")
    photos[1].save(root / "a" / "nested.png")
    photos[2].save(root / "a" / "b" / "deep.webp")
    photos[3].convert("L").save(root / "a" / "gray.png")
    rgba = photos[0].convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    photos[1].convert("P").save(root / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° when shown
    photos[2].save(root / "a" / "rotated.jpg", exif=exif)
    frames = [photos[i].resize((96, 64)).convert("P") for i in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    (root / "empty.jpg").write_bytes(b"")
    data = (root / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.jpg").write_text("not an image")
    (root / "readme.txt").write_text("ignored: not an image extension")
    os.symlink("loop.jpg", root / "loop.jpg")  # a link to itself
    os.symlink("..", root / "a" / "b" / "up")  # a folder loop, never followed
    # 100 megapixels in a few kB: over Pillow's decompression-bomb limit.
    Image.new("1", (10_000, 10_000)).save(root / "bomb.png")
    return root


def _scan(capsys, *args):
    code = main(["scan", "--device", "cpu", "--workers", "0", "--quiet", *map(str, args)])
    return code, capsys.readouterr()


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_find_images_walks_sorted_by_extension_without_following_links(folder):
    names = [str(item.relative) for item in find_images([folder])]
    assert names == sorted(names, key=lambda n: str(folder / n))
    assert "readme.txt" not in names and not any(n.startswith("a/b/up") for n in names)
    assert {"a/b/deep.webp", "a/gray.png", "animated.gif", *BAD} <= set(names)
    shallow = [str(i.relative) for i in find_images([folder], recursive=False)]
    assert "a/nested.png" not in shallow and "photo.jpg" in shallow
    single = find_images([folder / "notes.jpg"])
    assert [i.relative.name for i in single] == ["notes.jpg"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_scan_writes_one_record_per_input(folder, level_checkpoints, tmp_path, capsys, suffix):
    output = tmp_path / f"results{suffix}"
    code, _ = _scan(capsys, folder, "--model", level_checkpoints["low"], "--output", output)
    assert code == EXIT_FILE_ERRORS  # done, with file errors
    records = read_records(output)
    inputs = find_images([folder])
    assert [r["path"] for r in records] == [str(i.path) for i in inputs]
    by_name = {Path(r["path"]).name: r for r in records}
    for name in BAD:
        assert by_name[name]["error"] and by_name[name]["level"] is None, name
    assert "DecompressionBomb" in by_name["bomb.png"]["error"]
    good = [r for r in records if not r["error"]]
    assert len(good) == len(records) - len(BAD)
    for record in good:
        assert record["level"] == "low" and record["flagged"] is False
        assert record["low"] > 0.99 and record["width"] > 0 and record["height"] > 0
    assert by_name["animated.gif"]["frames"] == 3
    assert (by_name["photo.jpg"]["width"], by_name["photo.jpg"]["height"]) == (512, 512)
    stored = Image.open(folder / "a" / "rotated.jpg").size
    assert (by_name["rotated.jpg"]["width"], by_name["rotated.jpg"]["height"]) == stored[::-1]
    if suffix == ".csv":
        with output.open() as file:
            assert next(csv.reader(file)) == list(RECORD_FIELDS)


def test_exit_codes(folder, level_checkpoints, tmp_path, capsys):
    clean = tmp_path / "clean"
    clean.mkdir()
    Image.open(PHOTO_PATHS[0]).save(clean / "one.jpg")
    model = level_checkpoints["medium"]
    out = tmp_path / "r.jsonl"
    assert _scan(capsys, clean, "--model", model, "--output", out)[0] == EXIT_OK
    assert _scan(capsys, clean, "--model", model, "--output", out, "--fail-on", "high")[0] == 0
    code, _ = _scan(capsys, clean, "--model", model, "--output", out, "--fail-on", "medium")
    assert code == EXIT_FLAGGED
    assert _scan(capsys, folder, "--model", model, "--output", out)[0] == EXIT_FILE_ERRORS
    # A missing path is a record with its error, like any file that cannot be read.
    missing = tmp_path / "missing"
    code, _ = _scan(capsys, missing, clean, "--model", model, "--output", out)
    assert code == EXIT_FILE_ERRORS
    assert [r["error"] for r in read_records(out)] == [
        None,
        "FileNotFoundError: no such file or folder",
    ]


def test_summary_on_stderr(folder, level_checkpoints, tmp_path, capsys):
    model = str(level_checkpoints["high"])
    output = str(tmp_path / "r.jsonl")
    code = main(["scan", str(folder), "--model", model, "--device", "cpu", "--output", output])
    err = capsys.readouterr().err
    assert code == EXIT_FILE_ERRORS
    good = len(find_images([folder])) - len(BAD)
    assert f"levels: neutral 0, low 0, medium 0, high {good}" in err
    assert f"flagged: {good}, errors: {len(BAD)}" in err and "images/s" in err
    # An input that could not be checked is flagged: a filter on the flag never keeps it.
    errors = [r for r in read_records(output) if r["error"]]
    assert len(errors) == len(BAD) and all(r["flagged"] and r["level"] is None for r in errors)


def test_censor_to_writes_copies_and_never_touches_originals(
    folder, level_checkpoints, tmp_path, capsys
):
    before = _digest(folder)
    target = tmp_path / "censored"
    model = level_checkpoints["high"]
    options = ["--output", tmp_path / "r.jsonl", "--censor-to", target, "--action", "blank"]
    _scan(capsys, folder, "--model", model, *options)
    assert _digest(folder) == before
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    good = sorted(str(i.relative) for i in find_images([folder]) if i.relative.name not in BAD)
    # Same relative paths, nothing for bad files, no temporary files left; the manifest of the
    # copies this tool wrote.
    assert written == sorted([*good, MANIFEST_NAME])
    with Image.open(target / "a" / "nested.png") as image:
        assert image.format == "PNG" and image.size == (512, 512)
        assert json.loads(image.text["nsfw-guard"])["level"] == "high"
        assert image.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))
    with Image.open(target / "photo.jpg") as image:
        assert image.format == "JPEG"
    # Each copy's metadata: its verdict, the model that made it, the action that censored it.
    for name in ("a/nested.png", "photo.jpg", "animated.gif"):
        verdict = read_verdict(target / name)
        assert (verdict["level"], verdict["flagged"], verdict["action"]) == ("high", True, "blank")
        assert verdict["model"] == os.path.realpath(model)
        assert (verdict["check_level"], verdict["threshold"]) == ("medium", 0.5)
    assert read_verdict(target / "animated.gif")["frames"] > 1
    with Image.open(target / "animated.gif") as image:  # identical blank frames merge
        assert image.format == "GIF" and image.convert("RGB").getextrema()[0] == (0, 0)


def test_censor_to_copies_clean_images_only_when_asked(level_checkpoints, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    Image.open(PHOTO_PATHS[0]).save(source / "one.jpg")
    model = level_checkpoints["neutral"]
    for extra, expected in (([], []), (["--copy-clean"], ["one.jpg"])):
        target = tmp_path / f"out{len(extra)}"
        options = ["--output", tmp_path / "r.jsonl", "--censor-to", target, *extra]
        _scan(capsys, source, "--model", model, *options)
        copies = sorted(p.name for p in target.rglob("*") if p.is_file())
        assert copies == sorted([*expected, MANIFEST_NAME] if expected else [])
    assert (target / "one.jpg").read_bytes() == (source / "one.jpg").read_bytes()
    with pytest.raises(SystemExit):
        _scan(capsys, source, "--model", model, "--censor-to", source, "--output", tmp_path / "x")
    assert "would replace" in capsys.readouterr().err


@pytest.mark.processes
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_resume_after_a_killed_scan_gives_one_record_per_input(level_checkpoints, tmp_path, kill):
    """SIGKILL loses at most the batch in flight; Ctrl-C and SIGTERM stop after it, say how many
    images are done and the exact command that resumes, and exit 130."""
    source = tmp_path / "many"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(COUNT):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
            source / f"{i:03d}.png"
        )
    output = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "nsfw_guard", "scan", str(source), "--quiet"]
    command += ["--device", "cpu", "--model", str(level_checkpoints["low"]), "--workers", "0"]
    copies = tmp_path / "copies"
    command += ["--output", str(output), "--batch-size", "1", "--censor-to", str(copies)]
    command += ["--copy-clean"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_file() and output.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    process.send_signal(kill)
    _, err = process.communicate(timeout=60)
    partial = read_records(output)
    assert 5 <= len(partial) < COUNT, "the scan was not interrupted mid-way"
    if kill != signal.SIGKILL:
        assert process.returncode == EXIT_INTERRUPTED and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"nsfw-guard: stopped after {len(partial)} of {COUNT} images")
        assert last.endswith(shlex.join(["nsfw-guard", "scan", "--resume", *command[4:]]))
    with output.open("a") as file:  # as if killed in the middle of writing a line
        file.write('{"path": "cut sho')

    assert main(["scan", "--resume", *command[4:]]) == EXIT_OK  # in this process: faster
    records = read_records(output)
    paths = [r["path"] for r in records]
    assert sorted(paths) == [str(i.path) for i in find_images([source])]
    assert len(set(paths)) == COUNT
    assert [r["path"] for r in records[: len(partial)]] == [r["path"] for r in partial]
    # Every input has its copy: a record is written only after its copy.
    assert sorted(p.name for p in copies.glob("*.png")) == sorted(Path(p).name for p in paths)


def test_resume_rescans_changed_files(level_checkpoints, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(3):
        Image.open(PHOTO_PATHS[i]).save(source / f"{i}.jpg")
    output = tmp_path / "r.csv"
    model = level_checkpoints["neutral"]
    _scan(capsys, source, "--model", model, "--output", output)
    first = read_records(output)
    Image.open(PHOTO_PATHS[4]).save(source / "1.jpg")  # a new version of one file
    os.utime(source / "1.jpg", (1, 1))
    code, _ = _scan(capsys, source, "--model", model, "--output", output, "--resume")
    assert code == EXIT_OK
    records = read_records(output)
    assert sorted(r["path"] for r in records) == sorted(r["path"] for r in first)
    changed = next(r for r in records if r["path"].endswith("1.jpg"))
    assert changed["mtime"] == 1 and changed["bytes"] == (source / "1.jpg").stat().st_size


@pytest.mark.processes
def test_two_processes_give_the_same_records_as_one(folder, level_checkpoints, tmp_path):
    model = str(level_checkpoints["low"])
    single = tmp_path / "single.jsonl"
    common = ["scan", str(folder), "--device", "cpu", "--model", model, "--workers", "1"]
    one = subprocess.run(
        [sys.executable, "-m", "nsfw_guard", *common, "--quiet", "--output", str(single)],
        capture_output=True,
        text=True,
    )
    assert one.returncode == EXIT_FILE_ERRORS, one.stderr
    double = tmp_path / "double.jsonl"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2"]  # a free port
    command += ["-m", "nsfw_guard", *common, "--output", str(double)]
    two = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "2 processes" in two.stderr, two.stderr[-3000:]
    assert not list(tmp_path.glob(".double.jsonl.part*"))
    a, b = read_records(single), read_records(double)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for left, right in zip(a, b, strict=True):
        assert left.keys() == right.keys()
        for key in RECORD_FIELDS:
            if isinstance(left[key], float):
                assert left[key] == pytest.approx(right[key], abs=1e-5), key
            else:
                assert left[key] == right[key], key


def test_censor_to_never_replaces_a_scanned_file_nor_scans_its_own_copies(
    level_checkpoints, tmp_path, capsys
):
    model = level_checkpoints["high"]
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    for name in ("one.jpg", "sub/one.jpg"):
        Image.open(PHOTO_PATHS[0]).save(source / name)
    before = _digest(source)
    # A single file into its own folder, or a folder into itself: both would replace a scanned
    # file.
    for args in ([source / "one.jpg", "--censor-to", source], [source, "--censor-to", source]):
        with pytest.raises(SystemExit) as exit_info:
            _scan(capsys, *args, "--model", model, "--output", tmp_path / "r.jsonl")
        assert exit_info.value.code == EXIT_USAGE
        assert "would replace" in capsys.readouterr().err
    assert _digest(source) == before
    # A copy folder inside the scanned one is never scanned itself, on this run or the next.
    target = source / "censored"
    for _ in range(2):
        _scan(
            capsys,
            source,
            "--model",
            model,
            "--output",
            tmp_path / "r.jsonl",
            "--censor-to",
            target,
        )
        assert [
            Path(r["path"]).relative_to(source).as_posix()
            for r in read_records(tmp_path / "r.jsonl")
        ] == ["one.jpg", "sub/one.jpg"]
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.jpg")) == [
        "one.jpg",
        "sub/one.jpg",
    ]
    assert _digest(source / "sub") == {"one.jpg": before["sub/one.jpg"]}


def test_censor_to_keeps_inputs_from_several_paths_apart(level_checkpoints, tmp_path, capsys):
    for root in ("r1", "r2"):
        (tmp_path / root).mkdir()
        Image.open(PHOTO_PATHS[0]).save(tmp_path / root / "x.jpg")
    target = tmp_path / "copies"
    options = ["--output", tmp_path / "r.jsonl", "--censor-to", target]
    _scan(capsys, tmp_path / "r1", tmp_path / "r2", "--model", level_checkpoints["high"], *options)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.jpg")) == [
        "r1/x.jpg",
        "r2/x.jpg",
    ]
