"""`scan` and `check` on dataset shards with the local engine: webdataset tar shards (brace
patterns, truncated and damaged ones) and parquet files, one record per image inside, the same
verdicts as the same photos scanned as files; resume per shard; parquet records."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsfw_guard.cli import EXIT_FILE_ERRORS, EXIT_OK, EXIT_USAGE, main
from nsfw_guard.records import read_records
from nsfw_guard.sources import expand_paths, find_images

from .conftest import PHOTO_PATHS

SCORES = ("neutral", "low", "medium", "high")


def write_shard(path: Path, photos: list[Path], extra: dict[str, bytes] | None = None) -> Path:
    """A webdataset shard: ``NNNN.jpg`` and ``NNNN.txt`` (the photo's name) per photo."""
    with tarfile.open(path, "w") as tar:
        for i, photo in enumerate(photos):
            _add(tar, f"{i:04d}.jpg", photo.read_bytes())
            _add(tar, f"{i:04d}.txt", photo.name.encode())
        for name, data in (extra or {}).items():
            _add(tar, name, data)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def scan(capsys, *args) -> tuple[int, str]:
    code = main(["scan", "--device", "cpu", "--workers", "0", "--quiet", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def file_scores(sharp_checkpoint, tmp_path_factory) -> dict[str, list[float]]:
    """Each photo's scores, scanned as a file: what its copy in a shard must score."""
    output = tmp_path_factory.mktemp("files") / "files.jsonl"
    options = ["--device", "cpu", "--workers", "0", "--quiet", "--output", str(output)]
    assert main(["scan", *map(str, PHOTO_PATHS), "--model", str(sharp_checkpoint), *options]) == 0
    return {Path(r["path"]).name: [r[name] for name in SCORES] for r in read_records(output)}


def assert_scores(record: dict, expected: list[float]) -> None:
    got = [record[name] for name in SCORES]
    assert got == pytest.approx(expected, abs=1e-5), record


def records_by_member(output: Path) -> dict[tuple[str, str | None], dict]:
    """A scan's records by (file name, member), in the order they were written."""
    return {(Path(r["path"]).name, r["member"]): r for r in read_records(output)}


def assert_rows_score_as(
    records: dict, shard: str, photos: list[Path], file_scores: dict[str, list[float]]
) -> None:
    """Row ``i`` of the parquet ``shard`` scored as ``photos[i]`` does as a file."""
    for row, photo in enumerate(photos):
        assert_scores(records[(shard, str(row))], file_scores[photo.name])


def test_brace_patterns_expand_and_an_existing_name_is_kept(tmp_path):
    odd = tmp_path / "odd{1..2}.tar"
    odd.touch()
    paths = expand_paths([tmp_path / "s-{000..002}.tar", tmp_path / "{a,b}.parquet", odd])
    assert [p.name for p in paths] == [
        *("s-000.tar", "s-001.tar", "s-002.tar", "a.parquet", "b.parquet"),
        "odd{1..2}.tar",
    ]


def test_tar_shards_from_a_brace_pattern_score_as_their_files(
    sharp_checkpoint, file_scores, tmp_path, capsys
):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", PHOTO_PATHS[:4])
    write_shard(shards / "00001.tar", PHOTO_PATHS[4:], {"9999.jpg": b"\xff\xd8 not a jpeg"})
    output = tmp_path / "r.jsonl"
    pattern = str(shards / "{00000..00001}.tar")
    code, err = scan(capsys, pattern, "--model", sharp_checkpoint, "--output", output)
    assert code == EXIT_FILE_ERRORS, err  # the damaged member
    records = read_records(output)
    assert len(records) == len(PHOTO_PATHS) + 1  # the .txt members are not images
    by_member = {(Path(r["path"]).name, r["member"]): r for r in records}
    for i, photo in enumerate(PHOTO_PATHS):
        shard, index = ("00000.tar", i) if i < 4 else ("00001.tar", i - 4)
        record = by_member[(shard, f"{index:04d}.jpg")]
        assert_scores(record, file_scores[photo.name])
        assert record["error"] is None and record["bytes"] == (shards / shard).stat().st_size
    bad = by_member[("00001.tar", "9999.jpg")]
    assert bad["error"].startswith("UnidentifiedImageError") and bad["level"] is None


def test_a_truncated_shard_keeps_its_whole_members_and_records_the_rest_as_an_error(
    sharp_checkpoint, file_scores, tmp_path, capsys
):
    whole = write_shard(tmp_path / "whole.tar", PHOTO_PATHS[:3]).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        members = {info.name: info for info in tar}
    cut_in_data = members["0002.jpg"].offset_data + 100  # inside the last photo's data
    cut_in_header = members["0001.txt"].offset + 200  # inside a header
    (tmp_path / "cut-data.tar").write_bytes(whole[:cut_in_data])
    (tmp_path / "cut-header.tar").write_bytes(whole[:cut_in_header])
    (tmp_path / "not-a-tar.tar").write_bytes(b"hello")
    output = tmp_path / "r.jsonl"
    paths = [tmp_path / name for name in ("cut-data.tar", "cut-header.tar", "not-a-tar.tar")]
    code, err = scan(capsys, *paths, "--model", sharp_checkpoint, "--output", output)
    assert code == EXIT_FILE_ERRORS, err
    records = records_by_member(output)
    assert list(records) == [  # in shard order, a shard's error after its members
        ("cut-data.tar", "0000.jpg"),
        ("cut-data.tar", "0001.jpg"),
        ("cut-data.tar", None),
        ("cut-header.tar", "0000.jpg"),
        ("cut-header.tar", "0001.jpg"),  # whole: the cut is in the header after it
        ("cut-header.tar", None),
        ("not-a-tar.tar", None),
    ]
    for shard in ("cut-data.tar", "cut-header.tar"):
        assert_scores(records[(shard, "0000.jpg")], file_scores[PHOTO_PATHS[0].name])
        assert records[(shard, None)]["error"].startswith("ShardError: truncated")
    assert "members before it were read" in records[("cut-header.tar", None)]["error"]
    assert "not an uncompressed tar archive" in records[("not-a-tar.tar", None)]["error"]


def test_parquet_files_binary_struct_and_named_columns(
    sharp_checkpoint, file_scores, tmp_path, capsys
):
    photos = PHOTO_PATHS[:3]
    data = [p.read_bytes() for p in photos]
    pq.write_table(
        pa.table({"name": [p.name for p in photos] + ["none"], "jpg": [*data, None]}),
        tmp_path / "img2dataset.parquet",
        row_group_size=2,  # rows are read across row groups
    )
    structs = [{"bytes": d, "path": None} for d in data] + [{"bytes": None, "path": "x.jpg"}]
    pq.write_table(pa.table({"image": structs}), tmp_path / "hf.parquet")
    pq.write_table(pa.table({"pixels": data}), tmp_path / "named.parquet")
    pq.write_table(pa.table({"image": ["http://x/a.jpg"]}), tmp_path / "urls.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    output = tmp_path / "r.jsonl"
    code, err = scan(capsys, tmp_path, "--model", sharp_checkpoint, "--output", output)
    assert code == EXIT_FILE_ERRORS, err
    records = records_by_member(output)
    for shard in ("img2dataset.parquet", "hf.parquet"):
        assert_rows_score_as(records, shard, photos, file_scores)
    assert records[("img2dataset.parquet", "3")]["error"] == (
        "ShardError: nothing where the image's bytes were expected"
    )
    assert records[("hf.parquet", "3")]["error"] == (
        "ShardError: the image struct names a path ('x.jpg') but holds no bytes; nsfw-guard "
        "reads no paths or URLs from a column"
    )
    assert not any(name == "named.parquet" for name, _ in records)  # found in a folder: skipped
    assert (
        "column 'image' holds string, not image bytes" in records[("urls.parquet", None)]["error"]
    )
    assert "not a readable parquet file" in records[("broken.parquet", None)]["error"]

    named = tmp_path / "named.jsonl"
    parquet = tmp_path / "named.parquet"
    code, err = scan(capsys, parquet, "--model", sharp_checkpoint, "--output", named)
    assert code == EXIT_FILE_ERRORS, err  # given by name: it says why it has no images
    (record,) = read_records(named)
    assert "no image column among pixels; name it with --image-column" in record["error"]
    named.unlink()
    code, err = scan(
        capsys, parquet, "--image-column", "pixels", "--model", sharp_checkpoint, "--output", named
    )
    assert code == EXIT_OK, err
    assert [r["member"] for r in read_records(named)] == ["0", "1", "2"]


def test_censor_to_is_refused_for_shards_and_check_names_members(
    sharp_checkpoint, tmp_path, capsys
):
    shard = write_shard(tmp_path / "s.tar", PHOTO_PATHS[:2])
    with pytest.raises(SystemExit) as exit_:
        scan(capsys, shard, "--censor-to", tmp_path / "copies")
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_USAGE
    assert "s.tar is a shard, whose images are not copied: scan shards without --censor-to" in err
    assert not (tmp_path / "copies").exists()

    code = main(["check", str(shard), "--model", str(sharp_checkpoint), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert code in (0, 1) and [line.split("\t")[0] for line in lines] == [
        f"{shard}:0000.jpg",
        f"{shard}:0001.jpg",
    ]


def test_resume_works_per_shard_member(sharp_checkpoint, tmp_path, capsys):
    """A scan cut off mid-shard resumes with the members not yet recorded; a shard rewritten
    since is scanned again, whole; the other shards' records are kept as they were."""
    write_shard(tmp_path / "a.tar", PHOTO_PATHS[:4])
    write_shard(tmp_path / "b.tar", PHOTO_PATHS[4:])
    output = tmp_path / "r.jsonl"
    options = ["--model", sharp_checkpoint, "--output", output, "--batch-size", "2"]
    assert scan(capsys, tmp_path, *options)[0] == EXIT_OK
    lines = output.read_text().splitlines(keepends=True)
    assert len(lines) == len(PHOTO_PATHS)
    output.write_text("".join(lines[:3]))  # killed after 3 of a.tar's 4 members

    assert scan(capsys, tmp_path, *options, "--resume")[0] == EXIT_OK
    records = read_records(output)
    assert records[:3] == [json.loads(line) for line in lines[:3]]  # kept, not redone
    assert sorted((Path(r["path"]).name, r["member"]) for r in records) == sorted(
        (Path(json.loads(line)["path"]).name, json.loads(line)["member"]) for line in lines
    )

    write_shard(tmp_path / "b.tar", PHOTO_PATHS[4:5])  # rewritten: one member now
    stat = (tmp_path / "b.tar").stat()
    os.utime(tmp_path / "b.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    code, _ = scan(capsys, tmp_path, *options, "--resume")
    records = read_records(output)
    assert code == EXIT_OK and len(records) == 5  # a.tar's 4, b.tar's 1: old records dropped
    assert [r for r in records if r["path"].endswith("a.tar")] == [
        json.loads(line) for line in lines[:4]
    ]


def test_parquet_records_equal_json_lines_and_resume(sharp_checkpoint, tmp_path, capsys):
    write_shard(tmp_path / "a.tar", PHOTO_PATHS[:3])
    jsonl, parquet = tmp_path / "r.jsonl", tmp_path / "out" / "r.parquet"
    parquet.parent.mkdir()
    for output in (jsonl, parquet):
        assert (
            scan(capsys, tmp_path / "a.tar", "--model", sharp_checkpoint, "--output", output)[0]
            == 0
        )
    assert read_records(parquet) == read_records(jsonl)
    assert pq.read_table(parquet).column("member").to_pylist() == [
        "0000.jpg",
        "0001.jpg",
        "0002.jpg",
    ]
    assert sorted(p.name for p in parquet.parent.iterdir()) == ["r.parquet"]  # nothing left

    options = ["--model", str(sharp_checkpoint), "--output", str(parquet), "--resume"]
    code = main(["scan", str(tmp_path / "a.tar"), "--device", "cpu", "--workers", "0", *options])
    assert code == EXIT_OK and "3 already done" in capsys.readouterr().err
    assert read_records(parquet) == read_records(jsonl)


def test_find_images_lists_members_in_shard_order(tmp_path):
    write_shard(tmp_path / "s.tar", PHOTO_PATHS[:3], {"x/deep.PNG": PHOTO_PATHS[3].read_bytes()})
    items = find_images([tmp_path])
    assert [item.shown[len(str(tmp_path)) + 1 :] for item in items] == [
        "s.tar:0000.jpg",
        "s.tar:0001.jpg",
        "s.tar:0002.jpg",
        "s.tar:x/deep.PNG",
    ]
    assert all(
        item.error is None and item.bytes == (tmp_path / "s.tar").stat().st_size for item in items
    )


def test_link_members_are_read_from_their_targets_and_entries_without_data_are_errors(
    sharp_checkpoint, file_scores, tmp_path, capsys
):
    """Every image-named member gets a record: a hard or symbolic link to a file member is
    scored as that file (what ``tar -x`` would give), a link to nothing in the archive and a
    FIFO entry are error records, not silently skipped."""
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a/0000.jpg", PHOTO_PATHS[0].read_bytes())
        _add(tar, "a/0001.jpg", PHOTO_PATHS[1].read_bytes())
        for name, kind, target in [
            ("b/hard.jpg", tarfile.LNKTYPE, "a/0001.jpg"),
            ("b/soft.jpg", tarfile.SYMTYPE, "../a/0000.jpg"),
            ("b/outside.jpg", tarfile.SYMTYPE, "/etc/hostname"),
            ("b/dangling.png", tarfile.LNKTYPE, "a/none.jpg"),
            ("b/fifo.jpg", tarfile.FIFOTYPE, ""),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    output = tmp_path / "r.jsonl"
    code, err = scan(capsys, shard, "--model", sharp_checkpoint, "--output", output)
    assert code == EXIT_FILE_ERRORS, err
    records = {r["member"]: r for r in read_records(output)}
    assert list(records) == [  # shard order
        "a/0000.jpg",
        "a/0001.jpg",
        "b/hard.jpg",
        "b/soft.jpg",
        "b/outside.jpg",
        "b/dangling.png",
        "b/fifo.jpg",
    ]
    assert_scores(records["b/hard.jpg"], file_scores[PHOTO_PATHS[1].name])
    assert_scores(records["b/soft.jpg"], file_scores[PHOTO_PATHS[0].name])
    assert "symbolic link to '/etc/hostname'" in records["b/outside.jpg"]["error"]
    assert "hard link to 'a/none.jpg'" in records["b/dangling.png"]["error"]
    assert records["b/fifo.jpg"]["error"].startswith("NotARegularFile: a FIFO entry")
    unchecked = [records[name] for name in ("b/outside.jpg", "b/dangling.png", "b/fifo.jpg")]
    assert all(r["flagged"] and r["level"] is None for r in unchecked)


def test_an_img2dataset_folder_scans_its_images_and_skips_its_metadata(
    sharp_checkpoint, file_scores, tmp_path, capsys
):
    """img2dataset writes, beside each tar shard, a parquet file of metadata (urls, captions,
    no images) and a stats file: a scan of the folder reads the shards' images, and the files
    without images are skipped as any other file that is not an image. Given by name, such a
    file is an error: it was expected to hold images."""
    write_shard(tmp_path / "00000.tar", PHOTO_PATHS[:2])
    metadata = {"key": ["000000000", "000000001"], "url": ["http://x/a", "http://x/b"]}
    pq.write_table(pa.table(metadata), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    with tarfile.open(tmp_path / "captions.tar", "w") as tar:
        _add(tar, "0000.txt", b"a caption")
    output = tmp_path / "r.jsonl"
    code, err = scan(capsys, tmp_path, "--model", sharp_checkpoint, "--output", output)
    assert code == EXIT_OK, err
    records = read_records(output)
    assert [(Path(r["path"]).name, r["member"]) for r in records] == [
        ("00000.tar", "0000.jpg"),
        ("00000.tar", "0001.jpg"),
    ]
    assert_scores(records[1], file_scores[PHOTO_PATHS[1].name])

    given = tmp_path / "given.jsonl"
    names = [tmp_path / "00000.parquet", tmp_path / "captions.tar"]
    code, err = scan(capsys, *names, "--model", sharp_checkpoint, "--output", given)
    assert code == EXIT_FILE_ERRORS, err
    errors = [r["error"] for r in read_records(given)]
    assert "no image column among key, url" in errors[0]
    assert "no image members" in errors[1]


def test_a_hugging_face_image_column_of_any_name_is_found(
    sharp_checkpoint, file_scores, tmp_path, capsys
):
    """A Hugging Face dataset's image column need not be named ``image`` (CIFAR-10's is
    ``img``): the ``Image`` feature its parquet metadata declares, or else its one image struct,
    is read; two are a question for --image-column."""
    photos = PHOTO_PATHS[:2]
    structs = [{"bytes": p.read_bytes(), "path": p.name} for p in photos]

    def write(name: str, columns: dict, images: list[str] | None) -> None:
        table = pa.table({**columns, "label": [0] * len(photos)})
        if images is not None:
            features = {name: {"_type": "Image"} for name in images}
            features["label"] = {"dtype": "int64", "_type": "Value"}
            info = json.dumps({"info": {"features": features}}).encode()
            table = table.replace_schema_metadata({b"huggingface": info})
        pq.write_table(table, tmp_path / name)

    write("cifar.parquet", {"img": structs}, images=["img"])
    write("no-metadata.parquet", {"picture": structs}, images=None)
    write("two.parquet", {"photo": structs, "mask": structs}, images=["photo", "mask"])
    output = tmp_path / "r.jsonl"
    code, err = scan(capsys, tmp_path, "--model", sharp_checkpoint, "--output", output)
    assert code == EXIT_FILE_ERRORS, err
    records = records_by_member(output)
    for shard in ("cifar.parquet", "no-metadata.parquet"):
        assert_rows_score_as(records, shard, photos, file_scores)
    assert records[("two.parquet", None)]["error"] == (
        "ShardError: several image columns (photo, mask); name one with --image-column"
    )
