"""The record file: round trips for any name, tolerant reading, locking, atomic keep + append."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nsfw_guard.levels import NSFWLevel
from nsfw_guard.records import (
    RECORD_FIELDS,
    RecordFile,
    RecordFileBusy,
    RecordWarning,
    part_path,
    part_paths,
    read_records,
    record_key,
)

FORMATS = pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
OLD_FIELDS = (
    "path",
    "level",
    "neutral",
    "low",
    "medium",
    "high",
    "flagged",
    "width",
    "height",
    "frames",
    "error",
    "bytes",
    "mtime",
)  # the fields of record files written before realpath


def make_record(path: str, **values) -> dict:
    """A complete record, as a scan writes it."""
    record = {
        "path": path,
        "level": "medium",
        "neutral": 0.125,
        "low": 0.1 + 0.2,  # not exactly 0.3: only an exact round trip keeps it
        "medium": 1 / 3,
        "high": 5e-324,
        "flagged": True,
        "width": 640,
        "height": 480,
        "frames": 1,
        "error": None,
        "bytes": 2**40 + 1,
        "mtime": 1712345678.1234567,
        "realpath": os.path.realpath(path),
        "frames_checked": 1,
        "model": "Freepik/nsfw_image_detector",
        "member": None,
        "sampled": False,
    }
    record.update(values)
    return record


def failed_record(path: str) -> dict:
    return make_record(
        path,
        level=None,
        neutral=None,
        low=None,
        medium=None,
        high=None,
        flagged=False,
        width=None,
        height=None,
        frames=None,
        error='UnidentifiedImageError: cannot identify image file, "x"\nsecond line',
        bytes=0,
        mtime=0.0,
    )


def batch(prefix: str, count: int = 3) -> list[dict]:
    return [make_record(f"/photos/{prefix}{i}.jpg", bytes=i) for i in range(count)]


def read_quietly(path: Path, **options) -> list[dict]:
    """read_records, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_records(path, **options)


def read_warned(path: Path) -> tuple[list[dict], str]:
    """read_records and the one RecordWarning it must give."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_records(path)
    assert [w.category for w in caught] == [RecordWarning], [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "\n" not in message
    return records, message


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def write_file(path: Path, records: list[dict]) -> None:
    with RecordFile(path) as file:
        file.write(records)


# Fields and types ---------------------------------------------------------------------------------


def test_new_fields_are_appended_to_the_fields_of_old_record_files():
    new_fields = ("realpath", "frames_checked", "model", "member", "sampled")
    assert (*OLD_FIELDS, *new_fields) == RECORD_FIELDS


@FORMATS
def test_every_field_round_trips_with_its_type(tmp_path, suffix):
    names = [
        "plain.jpg",
        "comma, \"quote\" and 'apostrophe'.png",
        "line\nbreak and\r\nreturn.gif",
        " leading space and tab\t.webp",
        "ünïcödé 写真 😀.jpg",
        "=SUM(A1).jpg",
    ]
    records = [make_record(str(tmp_path / name)) for name in names]
    records += [failed_record(str(tmp_path / "broken.jpg"))]
    records += [make_record("relative/p.jpg", level="neutral", flagged=False, mtime=-1.0)]
    records += [make_record(str(tmp_path / "shard.tar"), member="0001.jpg")]
    records += [
        make_record(str(tmp_path / f"{level.value}.jpg"), level=level) for level in NSFWLevel
    ]
    output = tmp_path / f"results{suffix}"
    write_file(output, records)

    back = read_quietly(output)
    levels = [None if r["level"] is None else NSFWLevel(r["level"]).value for r in records]
    assert back == [{**r, "level": level} for r, level in zip(records, levels, strict=True)]
    for record in back:
        assert list(record) == list(RECORD_FIELDS)
        assert type(record["flagged"]) is bool and type(record["bytes"]) is int
        assert type(record["mtime"]) is float and type(record["level"]) in (str, type(None))
        for name in ("neutral", "low", "medium", "high"):
            assert type(record[name]) in (float, type(None))
    assert back[0]["low"] == 0.1 + 0.2 and back[0]["high"] == 5e-324
    assert back[0]["mtime"] == 1712345678.1234567
    if suffix == ".csv":
        assert output.read_bytes().startswith(",".join(RECORD_FIELDS).encode() + b"\r\n")


def test_numpy_numbers_are_written_as_plain_numbers(tmp_path):
    output = tmp_path / "results.csv"
    write_file(output, [make_record("/a.jpg", neutral=np.float64(0.5), width=640)])
    assert "np." not in output.read_text()
    assert read_quietly(output)[0]["neutral"] == 0.5


def test_write_checks_every_record_before_writing_any(tmp_path):
    output = tmp_path / "results.jsonl"
    with RecordFile(output) as file:
        file.write(batch("a"))
        before = output.read_bytes()
        bad = [
            {**make_record("/b.jpg"), "bytes": "12"},
            {**make_record("/b.jpg"), "flagged": 1},
            {**make_record("/b.jpg"), "level": "extreme"},
            {**make_record("/b.jpg"), "frames_shown": 3},
            {k: v for k, v in make_record("/b.jpg").items() if k != "realpath"},
        ]
        for record in bad:
            with pytest.raises(ValueError, match=r"record for '/b.jpg': "):
                file.write([make_record("/ok.jpg"), record])
        assert output.read_bytes() == before


# Names that are not UTF-8 -------------------------------------------------------------------------


@FORMATS
def test_a_name_that_is_not_utf8_round_trips(tmp_path, suffix):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    try:
        with open(raw, "wb") as file:
            file.write(b"not really a jpeg")
    except OSError:
        pytest.skip("this file system only takes UTF-8 names")
    path = os.fsdecode(raw)
    assert path.endswith("caf\udce9.jpg")
    info = os.stat(raw)
    record = make_record(path, bytes=info.st_size, mtime=info.st_mtime)
    output = tmp_path / f"results{suffix}"
    write_file(output, [record, failed_record(path)])

    back = read_quietly(output)
    assert back == [record, failed_record(path)]
    assert os.fsencode(back[0]["path"]) == raw and os.fsencode(back[0]["realpath"]) == raw
    assert Path(back[0]["path"]).is_file()
    assert record_key(back[0]) == (os.path.realpath(path), info.st_size, info.st_mtime, None)
    if suffix == ".csv":  # the name's own bytes, as a shell or a file manager shows it
        assert b"caf\xe9.jpg" in output.read_bytes()
    else:
        output.read_bytes().decode("ascii")
        assert "caf\\udce9.jpg" in output.read_text()


# Reading damaged files ----------------------------------------------------------------------------


@FORMATS
def test_a_last_line_cut_short_by_a_kill_is_skipped_silently(tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    # The last one's name has quotes and a line break, so the cut can fall inside quotes.
    records = [*batch("a", 2), make_record('/photos/"odd"\nname.jpg', error="a, b")]
    write_file(output, records)
    whole = output.read_bytes()
    write_file(output, records[:2])
    start = len(output.read_bytes())
    assert whole[:start] == output.read_bytes()
    # Every cut, down to the line break (a CSV row cut in its last field, member, could look
    # whole: a row without its line break is never a record).
    for end in range(start + 1, len(whole) - 1):
        output.write_bytes(whole[:end])
        assert read_quietly(output) == records[:2], whole[start:end]
    output.write_bytes(whole)
    assert read_quietly(output) == records


@FORMATS
def test_empty_files_and_missing_files_have_no_records(tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    assert read_quietly(output) == []
    output.write_bytes(b"")
    assert read_quietly(output) == []
    write_file(output, [])
    assert read_quietly(output) == []
    output.write_bytes(output.read_bytes()[:-3])  # a header cut short
    assert read_quietly(output) == []


def test_invalid_utf8_in_the_middle_of_json_lines_is_skipped_with_one_warning(tmp_path):
    output = tmp_path / "results.jsonl"
    good = batch("a", 3)
    write_file(output, good)
    lines = output.read_bytes().splitlines(keepends=True)
    raw_latin1 = json.dumps(make_record("/photos/café.jpg"), ensure_ascii=False).encode("latin-1")
    output.write_bytes(
        lines[0] + b"\xff\xfe\x00garbage\n" + lines[1] + raw_latin1 + b"\n" + b"\n" + lines[2]
    )
    records, message = read_warned(output)
    assert records == good
    assert message.startswith(f"{output}: skipped 2 lines that are not records: ")
    assert "line 2 (invalid UTF-8), line 4 (invalid UTF-8)" in message
    assert all(isinstance(record_key(r), tuple) for r in records)


def test_json_lines_of_the_wrong_shape_are_skipped_with_one_warning(tmp_path):
    output = tmp_path / "results.jsonl"
    good = batch("a", 2)
    record = make_record("/photos/b.jpg")
    wrong = [
        [1, 2],
        42,
        "a string",
        None,
        {},
        {**record, "bytes": "x"},
        {**record, "bytes": None},
        {**record, "bytes": True},
        {**record, "mtime": "1.5"},
        {**record, "flagged": "yes"},
        {**record, "flagged": 1},
        {**record, "level": "extreme"},
        {**record, "neutral": "0.5"},
        {**record, "width": 1.5},
        {**record, "path": ""},
        {**record, "path": None},
        {**record, "error": 3},
        {**record, "realpath": ["/a"]},
        {k: v for k, v in record.items() if k != "mtime"},
    ]
    not_json = ["{not json}", "[" * 100_000]  # the second, too deep for json.loads
    lines = [json.dumps(good[0]), *map(json.dumps, wrong), *not_json, json.dumps(good[1])]
    output.write_text("\n".join(lines) + "\n")

    records, message = read_warned(output)
    assert records == good
    count = len(wrong) + len(not_json)
    assert message.startswith(f"{output}: skipped {count} lines that are not records: line 2 ")
    assert "line 2 (not a JSON object), line 3 (not a JSON object)" in message
    assert "line 6 (no 'path')" in message and f"and {count - 5} more" in message
    for record in records:  # what --resume does with them
        record_key(record)


def test_each_wrong_value_is_named(tmp_path):
    output = tmp_path / "results.jsonl"
    output.write_text(json.dumps({**make_record("/a.jpg"), "bytes": "x"}) + "\n")
    assert read_warned(output) == (
        [],
        f"{output}: skipped 1 line that is not a record: line 1 ('bytes': expected an "
        "integer, got 'x')",
    )
    assert read_quietly(output, warn=False) == []


def test_csv_rows_with_missing_columns_or_bad_values_are_skipped_with_one_warning(tmp_path):
    output = tmp_path / "results.csv"
    good = batch("a", 3)
    write_file(output, good)
    header, *rows = output.read_bytes().splitlines(keepends=True)
    fields = rows[0].decode().rstrip("\r\n").split(",")

    def row(**values) -> bytes:
        pairs = zip(RECORD_FIELDS, fields, strict=True)
        changed = [values.get(name, value) for name, value in pairs]
        return (",".join(changed) + "\r\n").encode("utf-8", "surrogateescape")

    output.write_bytes(
        header
        + rows[0]
        + b"/photos/short.jpg,low,0.5\r\n"  # line 3: missing columns
        + rows[0].rstrip(b"\r\n")
        + b",extra\r\n"  # line 4
        + row(bytes="12\udcff")  # 5: not a number, not UTF-8 either
        + b"\xff\xfe\x00\r\n"  # 6: garbage
        + row(flagged="maybe")  # 7
        + row(level="extreme")  # 8
        + row(mtime="")  # 9
        + b"\r\n"  # a blank line is no record and no damage
        + rows[1]
        + rows[2]
    )
    records, message = read_warned(output)
    assert records == good
    assert message.startswith(f"{output}: skipped 7 lines that are not records: ")
    assert "line 3 (3 columns, the header has 18), line 4 (19 columns," in message
    assert "line 5 ('bytes': cannot read '12\\udcff')" in message
    assert "line 6 (1 columns, the header has 18), line 7 ('flagged': cannot read" in message
    assert message.endswith(", and 2 more")


def test_csv_from_a_spreadsheet_reads(tmp_path):
    """A byte order mark, TRUE/FALSE, a missing trailing line break on a complete file."""
    output = tmp_path / "results.csv"
    record = make_record("/a.jpg", realpath=None, frames_checked=None, model=None, sampled=None)
    values = ["" if record[k] is None else str(record[k]) for k in OLD_FIELDS]
    values[OLD_FIELDS.index("flagged")] = "TRUE"
    text = "\ufeff" + ",".join(OLD_FIELDS) + "\r\n" + ",".join(values) + "\r\n"
    output.write_text(text, encoding="utf-8")
    assert read_quietly(output) == [record]


# Resuming: which file a record is about -----------------------------------------------------------


def test_record_key_is_the_same_from_another_working_folder(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"image")
    (tmp_path / "link").symlink_to(photos)  # the same file by another way
    (tmp_path / "elsewhere").mkdir()
    info = (photos / "a.jpg").stat()
    output = tmp_path / "results.jsonl"

    monkeypatch.chdir(tmp_path)
    relative = os.path.join("photos", "a.jpg")
    write_file(output, [make_record(relative, bytes=info.st_size, mtime=info.st_mtime)])

    monkeypatch.chdir(tmp_path / "elsewhere")
    [record] = read_quietly(output)
    assert record["path"] == relative  # as the user gave it, for display
    expected = (str(photos.resolve() / "a.jpg"), info.st_size, info.st_mtime, None)
    assert record_key(record) == expected
    given = make_record(str(tmp_path / "link" / "a.jpg"), bytes=info.st_size, mtime=info.st_mtime)
    assert record_key(given) == expected


@FORMATS
def test_records_written_before_realpath_resume_from_the_same_folder(tmp_path, monkeypatch, suffix):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"image")
    old = [{k: v for k, v in make_record(p).items() if k in OLD_FIELDS} for p in ("photos/a.jpg",)]
    output = tmp_path / f"old{suffix}"
    if suffix == ".csv":
        values = ["" if old[0][k] is None else str(old[0][k]) for k in OLD_FIELDS]
        output.write_text(",".join(OLD_FIELDS) + "\r\n" + ",".join(values) + "\r\n")
    else:
        output.write_text(json.dumps(old[0]) + "\n")

    monkeypatch.chdir(tmp_path)
    [record] = read_quietly(output)
    new_fields = dict.fromkeys(("realpath", "frames_checked", "model", "member", "sampled"))
    assert record == {**old[0], **new_fields}
    real = str(tmp_path.resolve() / "photos" / "a.jpg")
    key = (real, old[0]["bytes"], old[0]["mtime"], None)
    assert record_key(record) == key
    # Kept as they were when the file is rewritten (with realpath null).
    with RecordFile(output, keep=read_quietly(output)):
        pass
    assert read_quietly(output) == [record]


# Writing: keep, append, atomic, nothing else touched ----------------------------------------------


@FORMATS
def test_resume_keeps_every_record_and_appends(tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    others = {
        f"results.part0{suffix}": b"a part of another scan\n",
        f".results{suffix}.lock": b"someone else's lock\n",
        f".results{suffix}.tmp": b"someone else's temporary file\n",
        f"results{suffix}.bak": b"a backup\n",
        "photo.jpg": b"\xff\xd8 an image",
    }
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)

    with RecordFile(output) as file:  # scan a
        file.write(batch("a", 2))
        file.write(batch("a", 3)[2:])
    with RecordFile(output, keep=read_quietly(output)) as file:  # scan b --resume
        file.write(batch("b"))
    assert read_quietly(output) == batch("a") + batch("b")
    assert snapshot(tmp_path) == {**others, output.name: output.read_bytes()}

    with RecordFile(output) as file:  # a scan without --resume starts afresh
        file.write(batch("c"))
    assert read_quietly(output) == batch("c")
    assert snapshot(tmp_path) == {**others, output.name: output.read_bytes()}


@FORMATS
def test_records_are_on_disk_after_each_write(tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    with RecordFile(output, keep=batch("a")) as file:
        assert read_quietly(output) == batch("a")
        file.write(batch("b"))
        assert read_quietly(output) == batch("a") + batch("b")
    with pytest.raises(ValueError, match="closed"):
        file.write(batch("c"))
    file.close()  # again: nothing


def test_a_failed_rewrite_leaves_the_file_as_it_was(tmp_path):
    output = tmp_path / "results.jsonl"
    write_file(output, batch("a"))
    prefix = hashlib.sha256(b"results.jsonl").hexdigest()[:16]
    stale = tmp_path / f".nsfw-guard-{prefix}-x1y2z3.tmp"  # from a killed writer of this output
    stale.write_text("half a file")
    (tmp_path / "user.tmp").write_text("not ours")
    output.chmod(0o600)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="'bytes'"):
        RecordFile(output, keep=[*batch("a"), {**make_record("/b.jpg"), "bytes": "x"}])
    assert snapshot(tmp_path) == before
    with RecordFile(output, keep=read_quietly(output)):  # not locked any more
        pass
    stale_gone = {name: data for name, data in before.items() if name != stale.name}
    assert snapshot(tmp_path) == stale_gone  # the stale one is gone, nothing else
    assert output.stat().st_mode & 0o777 == 0o600


def test_part_paths_are_hidden_beside_the_output_in_its_format(tmp_path):
    assert part_path(Path("out/results.jsonl"), 0) == Path(
        "out/.results.jsonl.part0.nsfw-guard.jsonl"
    )
    assert part_path("out/results.csv", 12) == Path("out/.results.csv.part12.nsfw-guard.csv")
    long = "x" * 250 + ".jsonl"  # too long to take a suffix: named by its hash
    assert len(part_path(long, 3).name) < 60 and part_path(long, 3).name.endswith(".jsonl")
    output = tmp_path / "results.jsonl"
    for path in (part_path(output, 0), part_path(output, 1), tmp_path / "results.part0.jsonl"):
        path.write_text("")  # the last one could be a user's file: never taken for a part
    assert part_paths(output) == [part_path(output, 0), part_path(output, 1)]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        RecordFile(tmp_path / "missing" / "results.jsonl")


# Locking ------------------------------------------------------------------------------------------


def busy_message(output: Path, pid: int) -> str:
    return (
        f"{output} is being written by another nsfw-guard scan (pid {pid}); "
        "wait for it or choose another --output"
    )


@FORMATS
def test_a_second_writer_in_the_same_process_is_refused(tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    with RecordFile(output) as file:
        file.write(batch("a"))
        before = snapshot(tmp_path)
        for keep in ([], batch("b")):
            with pytest.raises(RecordFileBusy) as busy:
                RecordFile(output, keep=keep)
            assert isinstance(busy.value, OSError) and busy.value.pid == os.getpid()
            assert str(busy.value) == busy_message(output, os.getpid())
            assert str(pickle.loads(pickle.dumps(busy.value))) == str(busy.value)
        assert snapshot(tmp_path) == before  # the refused writer changed nothing
        file.write(batch("c"))
    assert read_quietly(output) == batch("a") + batch("c")
    assert os.listdir(tmp_path) == [output.name]  # no lock file left
    with RecordFile(output, keep=read_quietly(output)):
        pass


WRITER = textwrap.dedent(
    """
    import json, multiprocessing, os, sys, time
    from nsfw_guard.records import RecordFile

    def worker_running():  # runs after the fork handlers did
        print(os.getpid(), flush=True)
        time.sleep(60)

    output, how, first, then = sys.argv[1:]
    with RecordFile(output) as file:
        file.write(json.loads(first))
        print("written", flush=True)
        if how == "wait":
            sys.stdin.readline()
        else:
            if how == "fork":  # a DataLoader worker, say, that outlives the scan a while
                worker = multiprocessing.get_context("fork").Process(target=worker_running)
                worker.start()
            time.sleep(60)
        file.write(json.loads(then))
    print("closed", flush=True)
    """
)


@contextlib.contextmanager
def writer_process(output: Path, how: str) -> Iterator[subprocess.Popen]:
    """A scan in another process: it has written batch("a") when this yields, and writes
    batch("b") and closes after a line on its stdin ("wait") or a minute ("sleep")."""
    first, then = json.dumps(batch("a")), json.dumps(batch("b"))
    command = [sys.executable, "-c", WRITER, str(output), how, first, then]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout.readline() == "written\n"
            yield process
        finally:
            process.kill()  # if it still runs


@FORMATS
def test_a_second_writer_is_refused_while_another_process_writes(tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    with writer_process(output, "wait") as writer:
        assert read_quietly(output) == batch("a")  # flushed
        with pytest.raises(RecordFileBusy) as busy:
            RecordFile(output, keep=read_quietly(output))
        assert str(busy.value) == busy_message(output, writer.pid)
        assert read_quietly(output) == batch("a")
        out, _ = writer.communicate("\n", timeout=30)
    assert writer.returncode == 0 and out == "closed\n"
    assert read_quietly(output) == batch("a") + batch("b")
    with RecordFile(output, keep=read_quietly(output)) as file:
        file.write(batch("c"))
    assert read_quietly(output) == batch("a") + batch("b") + batch("c")


def test_the_lock_dies_with_its_process(tmp_path):
    output = tmp_path / "results.jsonl"
    with writer_process(output, "sleep") as writer:
        with pytest.raises(RecordFileBusy, match=f"pid {writer.pid}"):
            RecordFile(output)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert len(os.listdir(tmp_path)) == 2  # its lock file stays, but not its lock
    with RecordFile(output, keep=read_quietly(output)) as file:  # a resumed scan
        file.write(batch("b"))
    assert read_quietly(output) == batch("a") + batch("b")
    assert os.listdir(tmp_path) == [output.name]


def test_a_killed_parquet_scan_leaves_its_records_for_resume(tmp_path):
    """A parquet output is written at the end: killed before, its records are in the working
    file, which read_records reads and a resumed scan turns into the parquet file."""
    output = tmp_path / "results.parquet"
    with writer_process(output, "sleep") as writer:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert not output.exists() and read_quietly(output) == batch("a")
    with RecordFile(output, keep=read_quietly(output)) as file:  # a resumed scan
        file.write(batch("b"))
    assert read_quietly(output) == batch("a") + batch("b")
    assert sorted(os.listdir(tmp_path)) == [output.name]  # no working file left


def test_the_lock_is_not_held_by_forked_children(tmp_path):
    output = tmp_path / "results.jsonl"
    with writer_process(output, "fork") as writer:
        worker = int(writer.stdout.readline())
        try:
            with pytest.raises(RecordFileBusy, match=f"pid {writer.pid}"):
                RecordFile(output)
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            os.kill(worker, 0)  # still alive, forked while the lock was held
            with RecordFile(output, keep=read_quietly(output)) as file:
                file.write(batch("b"))
        finally:
            os.kill(worker, signal.SIGKILL)
    assert read_quietly(output) == batch("a") + batch("b")


def test_a_link_at_the_lock_file_is_never_written_through(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    output = tmp_path / "results.jsonl"
    (tmp_path / ".results.jsonl.nsfw-guard.lock").symlink_to(precious)
    with pytest.raises(OSError, match="is a link; nsfw-guard does not write through it"):
        RecordFile(output)
    assert precious.read_text() == "keep me" and not output.exists()
