"""The ``nsfw-guard`` command line, run for real on files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsfw_guard import __version__
from nsfw_guard.cli import EXIT_FILE_ERRORS, EXIT_FLAGGED, EXIT_OK, EXIT_USAGE, main

from .conftest import PHOTO_PATHS


def _check(capsys, *args):
    code = main(["check", "--device", "cpu", *map(str, args)])
    return code, capsys.readouterr()


def test_check_prints_one_line_per_image(level_checkpoints, capsys):
    code, out = _check(capsys, "--model", level_checkpoints["neutral"], *PHOTO_PATHS[:3])
    lines = out.out.splitlines()
    assert code == EXIT_OK
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in PHOTO_PATHS[:3]]
    for line in lines:
        _, level, scores, verdict = line.split("\t")
        assert level == "neutral" and verdict == "ok"
        assert scores.startswith("neutral=1.0000 low=0.0000")


def test_check_flags_at_the_chosen_level(level_checkpoints, capsys):
    code, out = _check(capsys, "--model", level_checkpoints["medium"], PHOTO_PATHS[0])
    assert code == EXIT_FLAGGED
    assert out.out.split("\t")[1:2] == ["medium"] and out.out.rstrip().endswith("FLAGGED")
    code, out = _check(
        capsys, "--model", level_checkpoints["medium"], "--level", "high", PHOTO_PATHS[0]
    )
    assert code == EXIT_OK and out.out.rstrip().endswith("ok")


def test_check_reports_unreadable_files_and_goes_on(level_checkpoints, tmp_path, capsys):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    code, out = _check(capsys, "--model", level_checkpoints["neutral"], bad, PHOTO_PATHS[0])
    assert code == EXIT_FILE_ERRORS
    first, second = out.out.splitlines()
    assert first.startswith(f"{bad}\terror: ")
    assert second.endswith("ok")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "--threshold", "2", str(PHOTO_PATHS[0])], "--threshold 2.0: expected"),
        (["check", "--level", "neutral", str(PHOTO_PATHS[0])], "invalid choice: 'neutral'"),
        (["check", "--model", "./no/such/folder", str(PHOTO_PATHS[0])], "no model folder"),
        (["scan", "tests/data", "--output", "tests"], "--output tests is a folder"),
        (["scan", "tests/data", "--output", "no/dir/r.jsonl"], "the folder no/dir does not exist"),
        (["scan", "tests/data", "--censor-to", "README.md"], "a file, not a folder"),
        (
            ["scan", "tests/data", "--output", "tests/data/astronaut.jpg"],
            "is an image or shard name",
        ),
        (["scan", "tests/data", "--max-frames", "-1"], "--max-frames -1: expected 0"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_check_reports_images_over_the_pixel_limit_as_scan_does(
    level_checkpoints, tmp_path, capsys, monkeypatch
):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = tmp_path / "big.png"  # 1600 pixels: over the limit, under twice it (a warning)
    Image.new("RGB", (40, 40)).save(big)
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    code, out = _check(capsys, "--model", level_checkpoints["neutral"], big, small)
    assert code == EXIT_FILE_ERRORS
    first, second = out.out.splitlines()
    assert first.startswith(f"{big}\terror: DecompressionBombError: Image size (1600 pixels)")
    assert second.endswith("ok")


def test_uncached_model_offline_is_a_usage_error_saying_how_to_download(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "nsfw_guard", "check", "--device", "cpu", str(PHOTO_PATHS[0])],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == EXIT_USAGE
    assert "hf download Freepik/nsfw_image_detector" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_and_module_entry_points():
    script = str(Path(sys.executable).with_name("nsfw-guard"))
    for command in ([script, "--version"], [sys.executable, "-m", "nsfw_guard", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == f"nsfw-guard {__version__}"
    for command in ("check", "scan"):
        result = subprocess.run(
            [sys.executable, "-m", "nsfw_guard", command, "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "Examples:" in result.stdout


def test_warnings_are_lines_and_libraries_deprecations_are_not_shown(capsys):
    import warnings

    from nsfw_guard.cli import _warnings_as_lines

    with _warnings_as_lines():
        warnings.warn("`torch.jit.interface` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
        warnings.warn("2 record lines skipped", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "nsfw-guard: warning: 2 record lines skipped\n"
