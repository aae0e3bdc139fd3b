"""What ``nsfw-guard scan`` and ``check`` promise, each through the real command line: no file
that existed before a run is modified or lost, every input gets a record, resumes keep every
record, and scan and check give the same verdicts."""

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from nsfw_guard.cli import (
    EXIT_FILE_ERRORS,
    EXIT_FLAGGED,
    EXIT_OK,
    EXIT_USAGE,
    main,
)
from nsfw_guard.copies import MANIFEST_NAME, CopyFolder
from nsfw_guard.decode import decode_image
from nsfw_guard.records import part_path, part_paths
from nsfw_guard.scan import read_records

from .conftest import PHOTO_PATHS, jpeg_with_exif_thumbnail, make_brightness_checkpoint
from .processes import kill_tree


def _cli(capsys, *args):
    """Run the command line; ``(exit code, stdout, stderr)``, usage errors included."""
    try:
        code = main([*map(str, args)])
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _scan(capsys, *args, quiet=True):
    """``nsfw-guard scan`` in this process, on the CPU; with its summary if not ``quiet``."""
    options = ["--device", "cpu", "--workers", "0", *(["--quiet"] if quiet else [])]
    return _cli(capsys, "scan", *options, *args)


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _photo(path: Path, index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(PHOTO_PATHS[index]).convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def bright(tmp_path_factory) -> Path:
    """A checkpoint that flags bright images (high) and passes dark ones."""
    return make_brightness_checkpoint(tmp_path_factory.mktemp("bright"), 0.0)


# 1. Originals are never replaced ----------------------------------------------------------------


def test_a_copy_folder_inside_the_album_never_replaces_a_photo(level_checkpoints, tmp_path, capsys):
    album = tmp_path / "album"
    _photo(album / "horse.png", 0)
    _photo(album / "2024" / "horse.png", 1)  # the user's own photo, same name
    _photo(album / "2024" / "beach.png", 2)
    before = _tree(album)
    model = level_checkpoints["high"]
    output = tmp_path / "r.jsonl"
    for args in ([album, "--censor-to", album / "2024"], [album / "2024", "--censor-to", album]):
        code, _, err = _scan(capsys, *args, "--model", model, "--output", output)
        assert code == EXIT_USAGE and f"--censor-to {args[2]} would replace" in err, err
        assert len(err.strip().splitlines()) == 1
        assert _tree(album) == before and not output.exists()  # refused before any work

    # Without a name clash the copies go there, and the user's photos there are scanned too.
    (album / "2024" / "horse.png").unlink()
    before = _tree(album)
    code, _, _ = _scan(
        capsys, album, "--censor-to", album / "2024", "--model", model, "--output", output
    )
    assert code == EXIT_OK
    scanned = {Path(r["path"]).relative_to(album).as_posix() for r in read_records(output)}
    assert scanned == {"horse.png", "2024/beach.png"}
    after = _tree(album)
    assert {k: v for k, v in after.items() if k in before} == before  # originals unchanged
    assert set(after) - set(before) == {
        "2024/2024/beach.png",
        "2024/horse.png",
        f"2024/{MANIFEST_NAME}",
    }
    # The next run neither scans its own copies nor refuses to replace them.
    code, _, _ = _scan(
        capsys, album, "--censor-to", album / "2024", "--model", model, "--output", output
    )
    assert code == EXIT_OK
    assert {Path(r["path"]).relative_to(album).as_posix() for r in read_records(output)} == scanned


def test_output_that_names_an_image_an_input_or_the_copies_is_refused(
    level_checkpoints, tmp_path, capsys
):
    photos = tmp_path / "p"
    a, b = _photo(photos / "a.jpg", 0), _photo(photos / "b.jpg", 1)
    listing = photos / "list.csv"
    listing.write_text("not records\n")
    before = _tree(photos)
    model = level_checkpoints["neutral"]
    cases = [
        (["--output", a, b], "is an image or shard name"),  # a shell-glob slip
        (["--output", listing, listing], "is one of the inputs"),
        (["--output", tmp_path / "copies" / "r.jsonl", a, "--censor-to", tmp_path / "copies"], ""),
    ]
    (tmp_path / "copies").mkdir()
    for args, message in cases:
        code, _, err = _scan(capsys, "--model", model, *args)
        assert code == EXIT_USAGE and message in err and "Traceback" not in err
    assert _tree(photos) == before


# 3. What is copied is what was checked ---------------------------------------------------------


def _animation(path: Path, bright_frames: set[int], count: int) -> Path:
    frames = [
        Image.new("RGB", (48, 32), (250, 250, 250) if i in bright_frames else (i, 0, 0))
        for i in range(count)
    ]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40)
    return path


def test_check_and_scan_see_every_frame_by_default_and_agree(bright, tmp_path, capsys):
    """The reproducer: one bright frame, the 25th of 40 (past the first chunk of frames), in an
    animation, with the default options."""
    folder = tmp_path / "gifs"
    folder.mkdir()
    late = _animation(folder / "late.gif", {25}, 40)
    dark = _animation(folder / "dark.gif", set(), 3)
    output = tmp_path / "r.jsonl"
    code, _, _ = _scan(capsys, folder, "--model", bright, "--output", output)
    assert code == EXIT_OK
    scanned = {Path(r["path"]).name: r for r in read_records(output)}
    assert scanned["late.gif"]["flagged"] and scanned["late.gif"]["frames_checked"] == 40
    assert not scanned["late.gif"]["sampled"] and scanned["late.gif"]["level"] != "neutral"
    assert not scanned["dark.gif"]["flagged"]
    code, out, _ = _cli(capsys, "check", "--device", "cpu", "--model", bright, late, dark)
    assert code == EXIT_FLAGGED
    lines = dict(line.split("\t", 1) for line in out.splitlines())
    assert lines[str(late)].endswith("FLAGGED") and lines[str(dark)].endswith("ok")
    for path, record in ((late, scanned["late.gif"]), (dark, scanned["dark.gif"])):
        _, level, scores, _ = f"{path}\t{lines[str(path)]}".split("\t")
        assert level == record["level"]
        assert scores == " ".join(
            f"{k}={record[k]:.4f}" for k in ("neutral", "low", "medium", "high")
        )


def _without(record: dict, name: str) -> dict:
    return {key: value for key, value in record.items() if key != name}


def test_a_sampled_animation_is_flagged_and_never_copied_as_clean(bright, tmp_path, capsys):
    folder = tmp_path / "gifs"
    folder.mkdir()
    _animation(folder / "long.gif", set(), 40)  # clean, but only 16 of its 40 frames checked
    _animation(folder / "short.gif", set(), 3)
    copies = tmp_path / "copies"
    output = tmp_path / "r.jsonl"
    args = ["--model", bright, "--output", output, "--censor-to", copies, "--copy-clean"]
    code, _, _ = _scan(capsys, folder, *args, "--max-frames", "16")
    assert code == EXIT_OK
    records = {Path(r["path"]).name: r for r in read_records(output)}
    long, short = records["long.gif"], records["short.gif"]
    assert (long["frames"], long["frames_checked"], long["sampled"]) == (40, 16, True)
    assert long["level"] == "neutral" and long["flagged"]  # never looked at: not cleared
    assert (short["frames_checked"], short["sampled"], short["flagged"]) == (3, False, False)
    assert (copies / "short.gif").read_bytes() == (folder / "short.gif").read_bytes()
    assert CopyFolder(copies).kind(copies / "long.gif") == "censored"
    # Kept on resume with the same sample, and decided again at another level: still flagged.
    code, _, _ = _scan(capsys, folder, *args, "--max-frames", "16", "--resume", "--level", "high")
    assert code == EXIT_OK
    assert {Path(r["path"]).name: r["flagged"] for r in read_records(output)} == {
        "long.gif": True,
        "short.gif": False,
    }
    code, out, _ = _cli(
        capsys, "check", "--device", "cpu", "--model", bright, "--max-frames", "16",
        "--level", "high", folder / "long.gif",
    )  # fmt: skip
    assert code == EXIT_FLAGGED and out.rstrip().endswith("FLAGGED (sampled: 16 of 40 frames)")
    # A CI gate: an animation checked in part fails it, whatever its checked frames' level.
    code, _, _ = _scan(capsys, folder, *args, "--max-frames", "16", "--resume", "--fail-on", "high")
    assert code == EXIT_FLAGGED
    # So does one whose record predates "sampled" (its frame counts say so).
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    output.write_text("".join(json.dumps(_without(r, "sampled")) + "\n" for r in lines))
    code, _, _ = _scan(capsys, folder, *args, "--max-frames", "16", "--resume", "--fail-on", "high")
    assert code == EXIT_FLAGGED
    # Every frame checked (the default) on resume: copied clean, byte for byte.
    code, _, _ = _scan(capsys, folder, *args, "--resume", "--fail-on", "high")
    assert code == EXIT_OK
    assert (copies / "long.gif").read_bytes() == (folder / "long.gif").read_bytes()
    records = {Path(r["path"]).name: r for r in read_records(output)}
    assert not records["long.gif"]["sampled"] and not records["long.gif"]["flagged"]


def test_an_exif_thumbnail_is_never_copied_unchecked(bright, tmp_path, capsys):
    """A dark photo whose EXIF thumbnail is a bright picture of its own is flagged (and copied
    censored, without it); one with a camera's thumbnail is copied clean, byte for byte."""
    folder = tmp_path / "photos"
    folder.mkdir()
    dark = Image.new("RGB", (640, 480), (20, 20, 20))
    (folder / "camera.jpg").write_bytes(jpeg_with_exif_thumbnail(dark, dark.resize((160, 120))))
    (folder / "other.jpg").write_bytes(
        jpeg_with_exif_thumbnail(dark, Image.new("RGB", (160, 120), (250, 250, 250)))
    )
    copies, output = tmp_path / "copies", tmp_path / "r.jsonl"
    args = ["--model", bright, "--output", output, "--censor-to", copies, "--copy-clean"]
    assert _scan(capsys, folder, *args)[0] == EXIT_OK
    records = {Path(r["path"]).name: r for r in read_records(output)}
    assert not records["camera.jpg"]["flagged"] and records["other.jpg"]["level"] == "high"
    assert records["other.jpg"]["frames"] == 1  # a still photo, with its thumbnail checked
    assert (copies / "camera.jpg").read_bytes() == (folder / "camera.jpg").read_bytes()
    assert CopyFolder(copies).kind(copies / "other.jpg") == "censored"
    with Image.open(copies / "other.jpg") as copy:
        assert copy.getexif().get_ifd(ExifTags.IFD.IFD1) == {}  # no thumbnail left


def test_an_animation_damaged_past_its_first_frames_is_an_error_record(bright, tmp_path, capsys):
    """Its first chunk of frames decodes, a later frame does not: an error record for it alone
    (flagged, so no filter keeps it), the other files' records as usual, exit 3."""
    folder = tmp_path / "gifs"
    folder.mkdir()
    whole = _animation(tmp_path / "whole.gif", {30}, 40).read_bytes()
    (folder / "cut.gif").write_bytes(whole[: len(whole) * 3 // 4])  # frame 30 on: cut off
    first = decode_image((folder / "cut.gif").read_bytes(), frame_limit=16)
    assert len(first.frames) == 16 and first.later  # the first chunk decodes
    _animation(folder / "late.gif", {30}, 40)
    output = tmp_path / "r.jsonl"
    code, _, _ = _scan(capsys, folder, "--model", bright, "--output", output, "--workers", "0")
    assert code == EXIT_FILE_ERRORS
    records = {Path(r["path"]).name: r for r in read_records(output)}
    assert records["cut.gif"]["error"] and records["cut.gif"]["flagged"]
    assert records["cut.gif"]["level"] is None
    assert records["late.gif"]["level"] == "high" and not records["late.gif"]["error"]


def test_copies_are_made_from_the_bytes_that_were_checked(level_checkpoints, tmp_path):
    """A file replaced between its check and its copy: the copy is still what was checked."""
    from nsfw_guard import NSFWDetector
    from nsfw_guard.check import CheckStep
    from nsfw_guard.copies import CopyFolder
    from nsfw_guard.levels import NSFWLevel
    from nsfw_guard.scan import ScanSettings, _DecodedImages, _write_copy, find_images

    photo = _photo(tmp_path / "src" / "one.png", 0)
    checked = photo.read_bytes()
    detector = NSFWDetector(str(level_checkpoints["neutral"]), device="cpu")
    inputs = find_images([photo.parent])
    dataset = _DecodedImages(inputs, detector.data_config, (1.0, 1.0, 1.0), None, keep_data=True)
    item = dataset[0]
    _photo(photo, 3)  # replaced after it was read and checked
    copies = CopyFolder(tmp_path / "copies")
    settings = ScanSettings(NSFWLevel.MEDIUM, 0.5, 1, 0, None, copies, copy_clean=True)
    record = {"flagged": False, "error": None, "frames": 1, "frames_checked": 1}
    _write_copy(inputs[0], record, item, CheckStep(detector.scorer), settings)
    assert (tmp_path / "copies" / "one.png").read_bytes() == checked != photo.read_bytes()


# 4. Every input gets a record; nothing hangs ---------------------------------------------------


def test_fifos_and_odd_modes_get_records_and_nothing_hangs(level_checkpoints, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    os.mkfifo(folder / "pipe.jpg")  # reading it would wait forever
    big = Image.open(PHOTO_PATHS[0]).convert("RGB").resize((2000, 2000))
    big.convert("P").save(folder / "palette.png")
    big.convert("1").save(folder / "bilevel.png")
    Image.fromarray(np.asarray(big.convert("L"), dtype=np.uint16) * 257).save(folder / "deep.tif")
    output = tmp_path / "r.jsonl"
    signal.alarm(120)  # a hang fails the test instead of stalling the run
    try:
        code, _, err = _scan(
            capsys, folder, "--model", level_checkpoints["low"], "--output", output
        )
    finally:
        signal.alarm(0)
    assert code == EXIT_FILE_ERRORS, err
    records = {Path(r["path"]).name: r for r in read_records(output)}
    assert records["pipe.jpg"]["error"] == "NotARegularFile: a FIFO, not a regular file: skipped"
    for name in ("palette.png", "bilevel.png", "deep.tif"):
        assert records[name]["error"] is None and records[name]["level"] == "low", name
        assert (records[name]["width"], records[name]["height"]) == (2000, 2000)


def _without_root_read_access() -> None:
    """In the child, before it runs: drop root's power to read any folder (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from the capabilities it will run with, so permissions apply."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_an_unreadable_folder_gets_a_record(level_checkpoints, tmp_path):
    _photo(tmp_path / "photos" / "ok.jpg")
    _photo(tmp_path / "photos" / "locked" / "hidden.jpg")
    os.chmod(tmp_path / "photos" / "locked", 0o000)
    output = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "nsfw_guard", "scan", str(tmp_path / "photos"), "--quiet"]
    command += ["--device", "cpu", "--workers", "0", "--model", str(level_checkpoints["low"])]
    command += ["--output", str(output)]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, preexec_fn=_without_root_read_access
        )
    finally:
        os.chmod(tmp_path / "photos" / "locked", 0o755)
    assert result.returncode == EXIT_FILE_ERRORS, result.stderr
    records = {Path(r["path"]).name: r for r in read_records(output)}
    assert records["ok.jpg"]["error"] is None and "hidden.jpg" not in records
    assert records["locked"]["error"] == "PermissionError: Permission denied"


# 5. Records are kept, locked and resumed ---------------------------------------------------------


def test_resume_keeps_the_records_of_other_scans(level_checkpoints, tmp_path, capsys):
    a, b = _photo(tmp_path / "a" / "one.jpg", 0), _photo(tmp_path / "b" / "two.jpg", 1)
    output = tmp_path / "r.jsonl"
    model = level_checkpoints["neutral"]
    _scan(capsys, a.parent, "--model", model, "--output", output)
    code, _, _ = _scan(capsys, b.parent, "--model", model, "--output", output, "--resume")
    assert code == EXIT_OK
    assert [Path(r["path"]).name for r in read_records(output)] == ["one.jpg", "two.jpg"]


def test_resume_from_another_folder_rescans_nothing(
    level_checkpoints, tmp_path, capsys, monkeypatch
):
    _photo(tmp_path / "photos" / "one.jpg")
    output = tmp_path / "r.jsonl"
    model = level_checkpoints["neutral"]
    monkeypatch.chdir(tmp_path)
    _scan(capsys, "photos", "--model", model, "--output", output)
    first = read_records(output)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = _scan(
        capsys, "../photos", "--model", model, "--output", output, "--resume", quiet=False
    )
    assert code == EXIT_OK and "scanned 0 image(s)" in err and "1 already done" in err
    assert read_records(output) == first


def test_resume_applies_new_settings_to_recorded_files(level_checkpoints, tmp_path, capsys):
    source = tmp_path / "src"
    _photo(source / "one.jpg")
    output = tmp_path / "r.jsonl"
    model = level_checkpoints["medium"]
    _scan(capsys, source, "--model", model, "--output", output)
    assert read_records(output)[0]["flagged"] is True
    code, _, err = _scan(
        capsys,
        source,
        "--model",
        model,
        "--output",
        output,
        "--resume",
        "--level",
        "high",
        quiet=False,
    )
    assert "1 already done" in err and read_records(output)[0]["flagged"] is False
    copies = tmp_path / "copies"
    args = ["--model", model, "--output", output, "--resume", "--censor-to", copies]
    code, _, _ = _scan(capsys, source, *args)
    assert code == EXIT_OK and (copies / "one.jpg").is_file()  # the missing copy is written


def test_a_second_writer_of_one_output_is_refused(level_checkpoints, tmp_path, capsys):
    _photo(tmp_path / "src" / "one.jpg")
    output = tmp_path / "r.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from nsfw_guard.records import RecordFile\n"
            f"with RecordFile({str(output)!r}):\n    print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _scan(
            capsys, tmp_path / "src", "--model", level_checkpoints["low"], "--output", output
        )
        assert code == EXIT_USAGE
        assert f"being written by another nsfw-guard scan (pid {holder.pid})" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        holder.communicate("")
    assert read_records(output) == []  # the holder's run, which wrote nothing, is intact


def test_a_resume_started_while_another_scan_writes_is_refused(level_checkpoints, tmp_path):
    """Scan B (``--resume``) starts while scan A writes the output. If B read the records before
    taking the lock, A could end before B locks, and B would rewrite the output without A's
    later records; B must be refused at once instead, and A's records all kept."""
    from nsfw_guard import NSFWDetector
    from nsfw_guard.records import RecordFileBusy
    from nsfw_guard.scan import find_images, scan

    for i in range(2):
        _photo(tmp_path / "a" / f"{i}.jpg", i)
    _photo(tmp_path / "b" / "b.jpg", 2)
    output = tmp_path / "r.jsonl"
    scorer = NSFWDetector(str(level_checkpoints["low"]), device="cpu").scorer
    b_planned, a_done = threading.Event(), threading.Event()
    b_outcome: list[BaseException | None] = []

    class PlannedInputs(list):
        """B's inputs: B plans its scan by going through them; A then ends before B goes on."""

        def __iter__(self):
            b_planned.set()
            a_done.wait(timeout=60)
            return super().__iter__()

    def scan_b() -> None:
        try:
            scan(
                PlannedInputs(find_images([tmp_path / "b"])),
                scorer,
                output,
                resume=True,
                quiet=True,
            )
            b_outcome.append(None)
        except RecordFileBusy as error:
            b_outcome.append(error)
        finally:
            b_planned.set()  # also when refused before planning

    b = threading.Thread(target=scan_b)

    def start_b_after_the_first_record(records: list[dict]) -> None:
        if b.ident is None:  # not started yet
            b.start()
            b_planned.wait(timeout=60)

    a = scan(
        find_images([tmp_path / "a"]),
        scorer,
        output,
        batch_size=1,
        quiet=True,
        on_records=start_b_after_the_first_record,
    )
    a_done.set()
    b.join(timeout=60)
    assert a.scanned == 2 and len(b_outcome) == 1
    assert isinstance(b_outcome[0], RecordFileBusy), "B wrote the output from a stale read"
    assert sorted(Path(r["path"]).name for r in read_records(output)) == ["0.jpg", "1.jpg"]


@pytest.mark.processes
def test_a_killed_torchrun_scan_resumes_from_its_part_files(level_checkpoints, tmp_path, capsys):
    source = tmp_path / "many"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(source / f"{i:02d}.png")
    output = tmp_path / "r.jsonl"
    options = ["--device", "cpu", "--workers", "0", "--batch-size", "1", "--quiet"]
    options += ["--model", str(level_checkpoints["low"]), "--output", str(output)]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone"]
    command = [*torchrun, "--nproc_per_node", "2", "-m", "nsfw_guard", "scan", str(source)]
    process = subprocess.Popen([*command, *options], stderr=subprocess.DEVNULL)
    parts = [part_path(output, rank) for rank in range(2)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if all(p.is_file() and p.read_text().count("\n") >= 3 for p in parts):
            break
        time.sleep(0.01)
    kill_tree(process)  # torchrun and both of its processes (in sessions of their own)
    done = sum(len(read_records(p)) for p in parts)
    assert 6 <= done < 60, "the scan was not killed mid-way"

    code, _, err = _scan(capsys, source, *options[7:], "--resume", quiet=False)
    assert code == EXIT_OK and f"{done} already done" in err, err
    records = read_records(output)
    assert sorted(Path(r["path"]).name for r in records) == [f"{i:02d}.png" for i in range(60)]
    assert not any(p.exists() for p in parts)


@pytest.mark.processes
def test_a_killed_multi_process_scan_resumes_from_its_part_files(
    level_checkpoints, tmp_path, capsys
):
    source = tmp_path / "src"
    for i in range(4):
        _photo(source / f"{i}.jpg", i)
    model = level_checkpoints["low"]
    full = tmp_path / "full.jsonl"
    _scan(capsys, source, "--model", model, "--output", full)
    records = read_records(full)
    # What two killed processes leave: the output (empty) and a part file each, mid-way.
    output = tmp_path / "r.jsonl"
    output.write_text("")
    for rank, part in enumerate((records[:1], records[2:3])):
        lines = "".join(json.dumps(r) + "\n" for r in part)
        part_path(output, rank).write_text(lines)
    code, _, err = _scan(
        capsys, source, "--model", model, "--output", output, "--resume", quiet=False
    )
    assert code == EXIT_OK and "2 already done" in err and "scanned 2 image(s)" in err
    assert sorted(r["path"] for r in read_records(output)) == sorted(r["path"] for r in records)
    assert part_paths(output) == []


# 6. No crash, one line --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_any_file_name_round_trips(level_checkpoints, tmp_path, capsys, suffix):
    folder = tmp_path / "names"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9 \xff.jpg")  # not UTF-8
    _photo(folder / name)
    output = tmp_path / f"r{suffix}"
    code, _, err = _scan(
        capsys, folder, "--model", level_checkpoints["neutral"], "--output", output
    )
    assert code == EXIT_OK, err
    [record] = read_records(output)
    assert os.fsencode(record["path"]).endswith(b"caf\xe9 \xff.jpg")


def test_a_corrupted_record_file_resumes_with_one_warning(level_checkpoints, tmp_path, capsys):
    _photo(tmp_path / "src" / "one.jpg")
    output = tmp_path / "r.jsonl"
    output.write_bytes(b'{"path": 1}\n\xff\xfe garbage\n[1, 2]\n')
    code, _, err = _scan(
        capsys,
        tmp_path / "src",
        "--model",
        level_checkpoints["low"],
        "--output",
        output,
        "--resume",
    )
    assert code == EXIT_OK and "Traceback" not in err
    assert "skipped 3 lines that are not records" in err
    assert [Path(r["path"]).name for r in read_records(output)] == ["one.jpg"]


def test_an_unusable_device_is_one_short_line(capsys):
    code, _, err = _cli(capsys, "check", "--device", "mps", str(PHOTO_PATHS[0]))
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1 and len(err) < 300


def test_check_reports_a_folder_a_missing_and_an_unreadable_path_like_scan(
    level_checkpoints, tmp_path, capsys
):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    paths = [tmp_path, tmp_path / "missing.jpg", bad, PHOTO_PATHS[0]]
    code, out, _ = _cli(
        capsys, "check", "--device", "cpu", "--model", level_checkpoints["neutral"], *paths
    )
    assert code == EXIT_FILE_ERRORS
    lines = out.splitlines()
    folder_error = "IsADirectoryError: a folder, not an image (scan it with nsfw-guard scan)"
    assert lines[0] == f"{tmp_path}\terror: {folder_error}"
    assert (
        lines[1] == f"{tmp_path / 'missing.jpg'}\terror: FileNotFoundError: no such file or folder"
    )
    assert lines[2].startswith(f"{bad}\terror: UnidentifiedImageError")
    assert lines[3].endswith("\tok")
