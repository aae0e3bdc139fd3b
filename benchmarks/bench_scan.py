"""Scan benchmark: end-to-end ``scan`` throughput on a folder of JPEGs vs the model's own
throughput on the same images already decoded and preprocessed, tiny and full-size checkpoints.

    python benchmarks/bench_scan.py [--images 64] [--workers N] [--rounds 3] [--checker ID_OR_DIR]

Goal: with the full-size model, the scan reaches >= 0.9x the model-only throughput (decoding in
worker processes overlaps inference). The two are timed in alternating rounds and compared by
their medians, so drifts in the machine's speed do not favour either.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, print_table, sync, write_json
from PIL import Image

from nsfw_guard import NSFWDetector
from nsfw_guard.scan import find_images, scan
from nsfw_guard.testing import make_checkpoint

PHOTOS = sorted((Path(__file__).parent.parent / "tests" / "data").glob("*.jpg"))


def make_folder(folder: Path, count: int) -> None:
    """``count`` JPEGs of 512-1024 px made from the test photos (crops, flips, resizes)."""
    rng = np.random.default_rng(0)
    sources = [Image.open(p).convert("RGB") for p in PHOTOS]
    for i in range(count):
        image = sources[i % len(sources)]
        width, height = (int(v) for v in rng.integers(512, 1025, size=2))
        image = image.resize((width, height), Image.BICUBIC)
        if i % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(folder / f"{i:04d}.jpg", quality=90)


def bench(name: str, source: str, folder: Path, device: torch.device, args) -> dict:
    detector = NSFWDetector.from_pretrained(source, device=device, batch_size=args.batch_size)
    scorer = detector.scorer
    inputs = find_images([folder])

    # Model only: the same images decoded and preprocessed up front, then timed forward passes.
    images = [Image.open(item.path) for item in inputs]
    prepared = [scorer.preprocess(_tensor(image)) for image in images]
    pixels = torch.cat([p for p, _ in prepared])
    verifiable = torch.cat([v for _, v in prepared])

    def model_only() -> float:
        with torch.inference_mode():
            sync(device)
            start = time.perf_counter()
            for i in range(0, len(inputs), args.batch_size):
                chunk = slice(i, i + args.batch_size)
                scorer.classify(pixels[chunk].to(device), verifiable[chunk].to(device))
            sync(device)
            return time.perf_counter() - start

    def end_to_end() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = scan(
                inputs,
                scorer,
                Path(tmp) / "r.jsonl",
                batch_size=args.batch_size,
                workers=args.workers,
                quiet=True,
            )
            seconds = time.perf_counter() - start
        assert summary.errors == 0 and summary.scanned == len(inputs)
        return seconds

    with torch.inference_mode():  # warm-up
        scorer.classify(
            pixels[: args.batch_size].to(device), verifiable[: args.batch_size].to(device)
        )
    rounds = [(model_only(), end_to_end()) for _ in range(args.rounds)]
    model_s = statistics.median(m for m, _ in rounds)
    scan_s = statistics.median(s for _, s in rounds)
    return {
        "checkpoint": name,
        "dtype": str(detector.dtype).removeprefix("torch."),
        "images": len(inputs),
        "workers": args.workers,
        "rounds": args.rounds,
        "model_only_images_per_s": len(inputs) / model_s,
        "scan_images_per_s": len(inputs) / scan_s,
        "ratio": model_s / scan_s,
    }


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--checker", help="full-size model: Hub id or folder (default: random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_folder(folder, args.images)
        tiny = str(make_checkpoint(Path(tmp) / "tiny"))
        full = args.checker or str(make_checkpoint(Path(tmp) / "full", size="full"))
        for name, source in (("tiny (1 block)", tiny), ("full-size", full)):
            rows.append(bench(name, source, folder, device, args))
    results = {"machine": machine(), "device": str(device), "scan": rows}
    print(f"\nMachine: {results['machine']}")
    print_table(f"Scan vs model-only throughput, {args.images} JPEGs of 512-1024 px", rows)
    print(f"\nwrote {write_json('bench_scan', results, args.output)}")


if __name__ == "__main__":
    main()
