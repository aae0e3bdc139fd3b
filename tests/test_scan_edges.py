"""Edges an adversarial review of ``nsfw-guard scan`` and ``check`` found, each a regression test
through the command line where it is a command-line behaviour."""

import io
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from nsfw_guard.cli import (
    EXIT_FILE_ERRORS,
    EXIT_FLAGGED,
    EXIT_OK,
    EXIT_USAGE,
    _resume_command,
    main,
)
from nsfw_guard.copies import MANIFEST_NAME, CopyConflict, CopyFolder
from nsfw_guard.scan import ScanInput, decoding_workers, read_records

from .test_scan_promises import _photo, _scan, _tree


def _manifest_line(folder, relative: str, target) -> str:
    info = os.stat(target)
    line = {"path": relative, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "censored": False}
    return json.dumps(line) + "\n"


def test_files_named_like_part_files_are_never_touched(level_checkpoints, tmp_path, capsys):
    _photo(tmp_path / "photos" / "one.jpg")
    mine = {tmp_path / "r.part0.jsonl": "my notes\n", tmp_path / "r.part1.jsonl": '{"mine": 1}\n'}
    for path, text in mine.items():
        path.write_text(text)
    output = tmp_path / "r.jsonl"
    for resume in ([], ["--resume"]):
        args = ["--model", level_checkpoints["low"], "--output", output, *resume]
        assert _scan(capsys, tmp_path / "photos", *args)[0] == EXIT_OK
        assert {path: path.read_text() for path in mine} == mine


def test_links_in_the_copy_folder_are_never_written_through(level_checkpoints, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photo(photos / "img0.png", 0)
    _photo(photos / "sub" / "img1.png", 1)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "img1.png").write_text("the victim's file")
    model = level_checkpoints["high"]
    output = tmp_path / "r.jsonl"
    before = {**_tree(photos), **_tree(victim)}
    # The manifest a link to an original; a folder link out of the copy folder, even with a
    # forged manifest entry for the file it would replace.
    out = tmp_path / "out1"
    out.mkdir()
    (out / MANIFEST_NAME).symlink_to(photos / "img0.png")
    code, _, err = _scan(capsys, photos, "--model", model, "--output", output, "--censor-to", out)
    assert code == EXIT_USAGE and f"{MANIFEST_NAME} is a link" in err
    out = tmp_path / "out2"
    out.mkdir()
    (out / "sub").symlink_to(victim)
    (out / MANIFEST_NAME).write_text(_manifest_line(out, "sub/img1.png", victim / "img1.png"))
    code, _, err = _scan(capsys, photos, "--model", model, "--output", output, "--censor-to", out)
    assert code == EXIT_USAGE and "outside the folder (through a link in it)" in err
    # A forged entry naming a file outside the folder (here a scanned original) is not trusted.
    out = tmp_path / "out3"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(_manifest_line(out, "../photos/img0.png", photos / "img0.png"))
    code, _, err = _scan(capsys, photos, "--model", model, "--output", output, "--censor-to", out)
    assert code == EXIT_OK and "1 unreadable line(s) ignored" in err
    assert {r["path"] for r in read_records(output)} == {
        str(photos / "img0.png"),
        str(photos / "sub" / "img1.png"),
    }
    assert {**_tree(photos), **_tree(victim)} == before


def test_a_file_that_appears_at_a_copy_target_is_never_replaced(tmp_path):
    copies = CopyFolder(tmp_path / "out")
    item = ScanInput(tmp_path / "a.png", Path("a.png"), str(tmp_path / "a.png"), 1, 1.0)
    copies.check([item])  # nothing there yet
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_text("appeared during the scan")
    with pytest.raises(CopyConflict, match="appeared during the scan and nsfw-guard did not"):
        copies.write_bytes(Path("a.png"), b"the copy")
    assert (tmp_path / "out" / "a.png").read_text() == "appeared during the scan"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # no temporary


def test_errors_are_not_copied_so_an_unreadable_folder_is_no_conflict(tmp_path):
    (tmp_path / "out" / "locked").mkdir(parents=True)  # a folder of copies from a former run
    locked = ScanInput(
        tmp_path / "locked", Path("locked"), str(tmp_path / "locked"), -1, -1.0, "PermissionError"
    )
    CopyFolder(tmp_path / "out").check([locked])  # says nothing


def test_resume_with_a_stricter_level_censors_a_clean_copy(level_checkpoints, tmp_path, capsys):
    source = tmp_path / "photos"
    photo = _photo(source / "one.png")
    output, out = tmp_path / "r.jsonl", tmp_path / "out"
    model = level_checkpoints["medium"]
    args = ["--model", model, "--output", output, "--censor-to", out]
    _scan(capsys, source, *args, "--copy-clean", "--level", "high")
    assert (out / "one.png").read_bytes() == photo.read_bytes()  # clean at "high"
    code, _, _ = _scan(
        capsys, source, *args, "--resume", "--level", "medium", "--fail-on", "medium"
    )
    assert code == EXIT_FLAGGED and read_records(output)[0]["flagged"]
    assert (out / "one.png").read_bytes() != photo.read_bytes()  # censored now
    with Image.open(out / "one.png") as copy:
        assert json.loads(copy.text["nsfw-guard"])["flagged"] is True


def test_resume_with_another_model_scans_again(level_checkpoints, tmp_path, capsys):
    _photo(tmp_path / "photos" / "one.jpg")
    output = tmp_path / "r.jsonl"
    _scan(capsys, tmp_path / "photos", "--model", level_checkpoints["neutral"], "--output", output)
    code, _, err = _scan(
        capsys,
        tmp_path / "photos",
        "--model",
        level_checkpoints["high"],
        "--output",
        output,
        "--resume",
        "--fail-on",
        "medium",
        quiet=False,
    )
    assert code == EXIT_FLAGGED and "scanned 1 image(s)" in err
    [record] = read_records(output)
    assert record["level"] == "high" and record["model"] == os.path.realpath(
        level_checkpoints["high"]
    )


def test_folder_links_are_followed_once_and_a_file_by_two_paths_is_one_input(
    level_checkpoints, tmp_path, capsys
):
    photos = tmp_path / "photos"
    _photo(photos / "one.png", 0)
    _photo(tmp_path / "elsewhere" / "two.png", 1)
    (photos / "linked").symlink_to(tmp_path / "elsewhere")
    (photos / "loop").symlink_to(photos)  # back up: walked once only
    (photos / "again.png").symlink_to(photos / "one.png")
    output = tmp_path / "r.jsonl"
    for resume in ([], ["--resume"]):
        args = ["--model", level_checkpoints["low"], "--output", output, *resume]
        assert _scan(capsys, photos, *args)[0] == EXIT_OK
        names = sorted(os.path.relpath(r["path"], photos) for r in read_records(output))
        assert names == ["again.png", "linked/two.png"]  # one.png is again.png: one input


def test_an_own_copy_named_directly_is_scanned(level_checkpoints, tmp_path, capsys):
    _photo(tmp_path / "photos" / "one.png")
    out, output = tmp_path / "out", tmp_path / "r.jsonl"
    args = ["--model", level_checkpoints["high"], "--output", output, "--censor-to", out]
    _scan(capsys, tmp_path / "photos", *args)
    code, _, _ = _scan(
        capsys, out / "one.png", "--model", level_checkpoints["high"], "--output", output
    )
    assert code == EXIT_OK and [r["path"] for r in read_records(output)] == [str(out / "one.png")]


def test_long_names_multi_page_tiffs_and_unwritable_copies(level_checkpoints, tmp_path, capsys):
    photos = tmp_path / "photos"
    long = "x" * 240 + ".png"
    _photo(photos / long)
    pages = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(2)]
    pages[0].save(photos / "pages.tif", save_all=True, append_images=pages[1:])
    _photo(photos / "sub" / "in.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where a folder of copies would go")
    output = tmp_path / ("o" * 230 + ".jsonl")
    args = ["--model", level_checkpoints["high"], "--output", output, "--censor-to", out]
    code, _, err = _scan(capsys, photos, *args)
    assert code == EXIT_FILE_ERRORS, err
    records = {os.path.relpath(r["path"], photos): r for r in read_records(output)}
    assert records[long]["error"] is None and (out / long).is_file()
    assert records["pages.tif"]["error"] is None
    with Image.open(out / "pages.tif") as copy:
        assert copy.n_frames == 2
    assert records["sub/in.png"]["error"].startswith("copy not written: ")
    assert (out / "sub").read_text() == "a file where a folder of copies would go"


def test_the_resume_command_resumes_whatever_the_arguments(monkeypatch):
    argv = ["nsfw-guard", "scan", "--output", "r.jsonl", "--", "-odd.png", "ph\udcffotos"]
    monkeypatch.setattr(sys, "argv", argv)
    command = _resume_command()
    assert command == "nsfw-guard scan --resume --output r.jsonl -- -odd.png 'ph\udcffotos'"


def test_check_writes_one_line_per_image_in_the_names_own_bytes(
    level_checkpoints, tmp_path, monkeypatch
):
    folder = tmp_path / "odd"
    names = [os.fsdecode(b"caf\xe9.png"), "two\nlines.png", "tab\tbed.png"]
    for name in names:
        _photo(folder / name)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    code = main(
        [
            "check",
            "--device",
            "cpu",
            "--model",
            str(level_checkpoints["neutral"]),
            *(str(folder / n) for n in names),
        ]
    )
    stdout.flush()
    lines = stdout.buffer.getvalue().splitlines()
    assert code == EXIT_OK and len(lines) == 3
    assert lines[0].startswith(os.fsencode(folder / names[0]) + b"\tneutral\t")
    assert lines[1].startswith(os.fsencode(folder) + b"/two\\nlines.png\tneutral")
    assert lines[2].startswith(os.fsencode(folder) + b"/tab\\tbed.png\tneutral")


def test_output_that_is_not_a_regular_file_is_refused(level_checkpoints, tmp_path, capsys):
    _photo(tmp_path / "photos" / "one.jpg")
    fifo = tmp_path / "records.jsonl"
    os.mkfifo(fifo)
    code, _, err = _scan(
        capsys, tmp_path / "photos", "--model", level_checkpoints["low"], "--output", fifo
    )
    assert code == EXIT_USAGE and "is not a regular file" in err
    assert fifo.is_fifo()


def test_workers_decode_in_the_main_process_when_shared_memory_is_short(tmp_path):
    """Workers hand images over through /dev/shm; where it is too small (Docker's 64 MB
    default), they would stall or die, so the scan decodes in the main process and says why."""
    folder = os.statvfs(tmp_path)
    free = folder.f_bavail * folder.f_frsize
    size = (448, 448)
    if free > 2**30:  # 2 workers of batches of 16 need about 300 MB
        assert decoding_workers(2, 16, size, shared_memory=tmp_path) == 2
    # A batch so large that no disk holds it in flight: main process, with a warning.
    with pytest.warns(UserWarning, match=r"--shm-size=1g"):
        assert decoding_workers(2, 2**40, size, shared_memory=tmp_path) == 0
    assert decoding_workers(0, 2**40, size, shared_memory=tmp_path) == 0
