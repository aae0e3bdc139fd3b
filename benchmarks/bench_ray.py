"""Ray benchmark: images/s of the local ``scan`` engine, of ``NSFWClassifier`` on Ray Data and
of ``scan``'s Ray engine (``nsfw-guard scan --engine ray``), on the same JPEGs, and Ray's actor
scaling (1 vs 2 actors).

    python benchmarks/bench_ray.py                     # 200 images, tiny and full-size checkpoints
    python benchmarks/bench_ray.py --sizes tiny --images 50
    python benchmarks/bench_ray.py --sizes full --runs engine

All read the files' bytes and run the same decode and check step. The Ray times run from
building the dataset to the last row (the engine's: to the last record written), so they include
starting the actors (each loads the model); the local time includes its DataLoader workers'
start. On a 2-core machine two actors
share the two cores with the model's own threads: the scaling row shows the overhead more than
any gain; on a machine with more cores (or GPUs, ``num_gpus=1`` per actor) it is where Ray earns
its place.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, print_table, write_json
from PIL import Image

from nsfw_guard import NSFWDetector
from nsfw_guard.scan import find_images, scan
from nsfw_guard.testing import make_checkpoint

PHOTOS = sorted((Path(__file__).parent.parent / "tests" / "data").glob("*.jpg"))


def make_images(folder: Path, count: int) -> Path:
    """``count`` JPEGs of 256-640 px cut from the test photos."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(path).convert("RGB") for path in PHOTOS]
    for i in range(count):
        photo = photos[i % len(photos)]
        side = 256 + (i * 37) % 385
        left, top = (i * 13) % max(1, photo.width // 4), (i * 7) % max(1, photo.height // 4)
        crop = photo.crop((left, top, photo.width - left // 2, photo.height - top // 2))
        crop.resize((side, side * crop.height // crop.width)).save(
            folder / f"{i:04d}.jpg", quality=90
        )
    return folder


def local(folder: Path, checkpoint: str, dtype: torch.dtype, workers: int) -> float:
    detector = NSFWDetector.from_pretrained(checkpoint, device="cpu", dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = find_images([folder])
        started = time.perf_counter()
        summary = scan(inputs, detector.scorer, Path(tmp) / "r.jsonl", workers=workers, quiet=True)
        seconds = time.perf_counter() - started
    assert summary.scanned == len(inputs) and not summary.errors
    return len(inputs) / seconds


def on_ray(folder: Path, checkpoint: str, dtype: torch.dtype, actors: int) -> float:
    import ray

    from nsfw_guard.ray import NSFWClassifier

    kwargs = {"model": checkpoint, "device": "cpu", "dtype": str(dtype).removeprefix("torch.")}
    started = time.perf_counter()
    dataset = ray.data.read_binary_files(str(folder)).map_batches(
        NSFWClassifier,
        fn_constructor_kwargs={**kwargs, "image_column": "bytes"},
        batch_size=16,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0.5,  # two actors holding both CPUs would leave the read tasks none: a hang
    )
    rows = dataset.select_columns(["nsfw_error"]).take_all()
    seconds = time.perf_counter() - started
    assert all(row["nsfw_error"] is None for row in rows)
    return len(rows) / seconds


def ray_engine(folder: Path, checkpoint: str, dtype: torch.dtype, actors: int) -> float:
    from nsfw_guard.ray import RayEngine

    engine = RayEngine(
        checkpoint, device="cpu", dtype=str(dtype).removeprefix("torch."), actors=actors
    )
    with tempfile.TemporaryDirectory() as tmp:
        inputs = find_images([folder])
        started = time.perf_counter()
        summary = scan(inputs, None, Path(tmp) / "r.jsonl", engine=engine, quiet=True)
        seconds = time.perf_counter() - started
    assert summary.scanned == len(inputs) and not summary.errors
    return len(inputs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["local", "classifier", "engine"],
        choices=["local", "classifier", "engine"],
    )
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    import ray

    dtype = torch.float32 if not machine()["cpu_native_bf16"] else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(Path(tmp) / "images", args.images)
        checkpoints = {
            size: str(make_checkpoint(Path(tmp) / size, size=size)) for size in args.sizes
        }
        # The local engine first: its DataLoader workers fork, and a process that runs Ray's
        # threads must not fork.
        rows = []
        for size, checkpoint in checkpoints.items():
            row = {"checkpoint": size, "dtype": str(dtype).removeprefix("torch.")}
            row["images"] = args.images
            if "local" in args.runs:
                row["local_images_per_s"] = local(folder, checkpoint, dtype, workers=1)
            rows.append(row)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for row, checkpoint in zip(rows, checkpoints.values(), strict=True):
            for actors in (1, 2):
                name = f"{actors}_actor{'s' if actors > 1 else ''}_images_per_s"
                if "classifier" in args.runs:
                    row[f"classifier_{name}"] = on_ray(folder, checkpoint, dtype, actors)
                if "engine" in args.runs:
                    row[f"engine_{name}"] = ray_engine(folder, checkpoint, dtype, actors)
        ray.shutdown()
    results = {"machine": machine(), "ray": rows}
    print_table("local scan vs Ray (NSFWClassifier, scan --engine ray), same JPEGs, images/s", rows)
    print(f"\nwrote {write_json('bench_ray', results, args.output)}")


if __name__ == "__main__":
    main()
