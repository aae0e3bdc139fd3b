"""NSFWClassifier in ``map_batches`` on a real local Ray cluster (2 CPUs), over the test photos
read three ways: ``read_images``, ``read_webdataset`` on a shard written here, ``read_parquet``.
Its scores equal NSFWDetector's on the same images; a corrupt row becomes an error row.

``nsfw-guard scan --engine ray`` gives the local engine's records on the same inputs (files, tar
shards, a truncated one, parquet), and a killed one resumes."""

import io
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from nsfw_guard import NSFWDetector
from nsfw_guard.cli import EXIT_FILE_ERRORS, EXIT_OK, main
from nsfw_guard.ray import OUTPUT_COLUMNS, NSFWClassifier
from nsfw_guard.records import read_records

from .conftest import PHOTO_PATHS
from .processes import descendants, kill_tree, wait_gone
from .test_shards import write_shard


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def expected(sharp_checkpoint) -> dict[str, np.ndarray]:
    """NSFWDetector's scores of each photo, by file name."""
    detector = NSFWDetector.from_pretrained(sharp_checkpoint, device="cpu", dtype=torch.float32)
    scores = {}
    for path in PHOTO_PATHS:
        with Image.open(path) as image:
            scores[path.name] = detector.scores([image]).numpy()[0]
    return scores


def _classify(dataset, checkpoint, **kwargs):
    kwargs = {"model": str(checkpoint), "device": "cpu", "dtype": "float32", **kwargs}
    checked = dataset.map_batches(
        NSFWClassifier,
        fn_constructor_kwargs=kwargs,
        batch_size=3,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    return checked.take_all()


def _scores(row) -> np.ndarray:
    return np.array([row[name] for name in OUTPUT_COLUMNS[:4]], dtype=np.float32)


def test_read_images(cluster, sharp_checkpoint, expected):
    folder = PHOTO_PATHS[0].parent
    rows = _classify(ray.data.read_images(str(folder), include_paths=True), sharp_checkpoint)
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in rows) == sorted(expected)
    for row in rows:
        name = row["path"].rsplit("/", 1)[-1]
        assert np.allclose(_scores(row), expected[name], atol=1e-4), name
        assert row["nsfw_error"] is None and row["image"].ndim in (2, 3)  # kept
        assert row["nsfw_level"] in ("neutral", "low", "medium", "high")
        assert row["nsfw_flagged"] == (row["nsfw_medium"] >= 0.5)


def test_read_webdataset_with_a_corrupt_row(cluster, sharp_checkpoint, expected, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate(PHOTO_PATHS):
            _add(tar, f"{i:04d}.jpg", path.read_bytes())
            _add(tar, f"{i:04d}.txt", path.name.encode())
        _add(tar, "9999.jpg", b"\xff\xd8 not really a jpeg")
        _add(tar, "9999.txt", b"corrupt")
    rows = _classify(ray.data.read_webdataset(str(shard), decoder=None), sharp_checkpoint)
    assert len(rows) == len(PHOTO_PATHS) + 1
    for row in rows:
        name = row["txt"].decode()
        if name == "corrupt":
            assert row["nsfw_error"].startswith("UnidentifiedImageError")
            assert row["nsfw_flagged"] and row["nsfw_level"] == "high"
            assert _scores(row).tolist() == [0.0, 1.0, 1.0, 1.0]
        else:
            assert row["nsfw_error"] is None
            assert np.allclose(_scores(row), expected[name], atol=1e-4), name


def test_read_parquet_binary_and_struct_columns(cluster, sharp_checkpoint, expected, tmp_path):
    table = pa.table(
        {
            "name": [path.name for path in PHOTO_PATHS] + ["missing"],
            "data": [path.read_bytes() for path in PHOTO_PATHS] + [None],
        }
    )
    pq.write_table(table, tmp_path / "images.parquet")
    dataset = ray.data.read_parquet(str(tmp_path / "images.parquet"))
    rows = _classify(dataset, sharp_checkpoint, image_column="data")
    assert len(rows) == len(PHOTO_PATHS) + 1
    for row in rows:
        if row["name"] == "missing":
            assert (
                row["nsfw_error"]
                == "TypeError: nothing where an image (bytes or an array) was expected"
            )
            assert row["nsfw_flagged"]
        else:
            assert np.allclose(_scores(row), expected[row["name"]], atol=1e-4), row["name"]


def test_a_wrong_column_is_a_clear_error(sharp_checkpoint):
    classifier = NSFWClassifier(str(sharp_checkpoint), device="cpu", image_column="img")
    with pytest.raises(KeyError, match=r"no column 'img' in the batch; it has 'image'"):
        classifier({"image": np.zeros((1, 8, 8, 3), np.uint8)})
    with pytest.raises(KeyError, match=r"no image column in the batch \('caption'\)"):
        NSFWClassifier(str(sharp_checkpoint), device="cpu")({"caption": np.array(["a"])})


def test_the_classifier_on_a_plain_batch_keeps_every_column(sharp_checkpoint, expected):
    """Without Ray: a dict of numpy arrays in, the same dict plus the verdict columns out; a
    Hugging Face image struct, an RGBA array and a float array are images too."""
    photo = PHOTO_PATHS[0]
    rgba = np.zeros((20, 30, 4), np.uint8)
    batch = {
        "image": np.array(
            [{"bytes": photo.read_bytes()}, rgba, np.ones((20, 30, 3), np.float32), "a path"],
            dtype=object,
        ),
        "id": np.arange(4),
    }
    out = NSFWClassifier(str(sharp_checkpoint), device="cpu", dtype=torch.float32)(batch)
    assert list(out) == ["image", "id", *OUTPUT_COLUMNS]
    assert out["id"].tolist() == [0, 1, 2, 3]
    assert np.allclose(
        _scores({k: out[k][0] for k in OUTPUT_COLUMNS}), expected[photo.name], atol=1e-4
    )
    assert out["nsfw_error"][:3].tolist() == [None, None, None]
    assert (
        out["nsfw_error"][3] == "TypeError: a str where an image (bytes or an array) was expected"
    )
    assert out["nsfw_neutral"].dtype == np.float32 and out["nsfw_flagged"].dtype == bool


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# nsfw-guard scan --engine ray ---------------------------------------------------------------------


def _scan(*args) -> int:
    return main(["scan", "--device", "cpu", "--workers", "0", "--quiet", *map(str, args)])


def _by_input(records: list[dict]) -> dict[tuple, dict]:
    return {(r["path"], r["member"]): r for r in records}


def test_scan_engine_ray_gives_the_local_records(cluster, sharp_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for photo in PHOTO_PATHS[:2]:
        (inputs / photo.name).write_bytes(photo.read_bytes())
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    write_shard(inputs / "a.tar", PHOTO_PATHS[2:5], {"9999.jpg": b"\xff\xd8 damaged"})
    whole = write_shard(tmp_path / "b.tar", PHOTO_PATHS[5:]).read_bytes()
    (inputs / "cut.tar").write_bytes(whole[: len(whole) // 2])  # a truncated download
    data = [photo.read_bytes() for photo in PHOTO_PATHS[:3]]
    pq.write_table(pa.table({"jpg": [*data, None]}), inputs / "c.parquet")
    options = ["--model", sharp_checkpoint, "--batch-size", 2]

    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert _scan(inputs, *options, "--output", local) == EXIT_FILE_ERRORS
    assert _scan(inputs, *options, "--output", on_ray, "--engine", "ray") == EXIT_FILE_ERRORS
    expected, got = _by_input(read_records(local)), _by_input(read_records(on_ray))
    assert len(got) == len(read_records(on_ray)) == len(expected) >= 12
    assert got.keys() == expected.keys()
    for key, record in expected.items():
        for name in ("neutral", "low", "medium", "high"):
            if record[name] is not None:
                assert got[key][name] == pytest.approx(record[name], abs=1e-4), key
        assert {**got[key], **{n: record[n] for n in ("neutral", "low", "medium", "high")}} == (
            record
        )
    assert got[(str(inputs / "cut.tar"), None)]["error"].startswith("ShardError: truncated")
    assert got[(str(inputs / "a.tar"), "9999.jpg")]["error"].startswith("UnidentifiedImage")


@pytest.mark.processes
def test_a_killed_ray_scan_resumes(cluster, sharp_checkpoint, tmp_path, capsys):
    """A scan on its own local cluster, killed (SIGKILL, with its Ray processes) mid-way: the
    records written are kept, and --resume scans exactly the rest."""
    shard, images = _many_images(tmp_path)
    output = tmp_path / "r.jsonl"
    options = ["--model", sharp_checkpoint, "--batch-size", 1, "--output", output]
    process = _start_ray_scan(shard, options, output, stderr=subprocess.DEVNULL)
    kill_tree(process)
    done = len(read_records(output))
    assert 5 <= done < len(images), "the scan was not killed mid-way"

    code = main(
        ["scan", str(shard), "--engine", "ray", "--device", "cpu", "--resume", *map(str, options)]
    )
    assert code == EXIT_OK
    assert f"{done} already done" in capsys.readouterr().err
    records = read_records(output)
    assert sorted(r["member"] for r in records) == [name for name, _ in images]


@pytest.mark.processes
def test_a_ray_scan_stops_on_sigterm_after_the_batch_in_flight(sharp_checkpoint, tmp_path):
    """SIGTERM (or Ctrl-C) stops a Ray scan as it stops a local one: records kept, exit 130, the
    command that continues, and the local cluster it started shut down."""
    shard, images = _many_images(tmp_path)
    output = tmp_path / "r.jsonl"
    options = ["--model", sharp_checkpoint, "--batch-size", 1, "--output", output]
    process = _start_ray_scan(shard, options, output, stderr=subprocess.PIPE)
    ray_processes = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()[-2000:]
    done = len(read_records(output))
    assert 5 <= done < len(images)
    assert f"stopped after {done} of {len(images)} images" in err.decode()
    assert "continue with: nsfw-guard scan --resume" in err.decode()
    assert wait_gone(ray_processes, 60), "Ray's processes outlived the scan"


def _many_images(folder: Path) -> tuple[Path, list[tuple[str, bytes]]]:
    """A tar shard of 120 small random PNGs."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(120):
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append((f"{i:04d}.png", buffer.getvalue()))
    shard = folder / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in images:
            _add(tar, name, data)
    return shard, images


def _start_ray_scan(shard: Path, options: list, output: Path, stderr: int) -> subprocess.Popen:
    """``scan --engine ray`` in a process of its own (its own local cluster), once it has
    written 5 records."""
    command = [sys.executable, "-m", "nsfw_guard", "scan", shard, "--engine", "ray"]
    command += ["--device", "cpu", "--quiet", *options]
    process = subprocess.Popen(list(map(str, command)), stderr=stderr)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_file() and output.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    return process


def test_the_classifier_checks_every_frame_and_flags_a_sample(tmp_path):
    """Without Ray: one bright frame, the 25th of 40, is found; a sample that misses it is
    flagged anyway and says so."""
    from .conftest import make_brightness_checkpoint
    from .test_check import _gif

    checkpoint = make_brightness_checkpoint(tmp_path, 0.0)
    batch = {"gif": np.array([_gif({25}, 40), _gif(set(), 40)], dtype=object)}
    every = NSFWClassifier(str(checkpoint), device="cpu", image_column="gif")(batch)
    assert every["nsfw_level"].tolist() == ["high", "neutral"]
    assert every["nsfw_flagged"].tolist() == [True, False]
    assert every["nsfw_sampled"].tolist() == [False, False]
    sample = NSFWClassifier(str(checkpoint), device="cpu", image_column="gif", max_frames=16)
    sampled = sample(batch)
    assert sampled["nsfw_level"].tolist() == ["neutral", "neutral"]  # frame 25: not in the sample
    assert sampled["nsfw_flagged"].tolist() == [True, True]
    assert sampled["nsfw_sampled"].tolist() == [True, True]
