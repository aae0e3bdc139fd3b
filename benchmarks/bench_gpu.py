"""GPU benchmark: the full-size scorer on CUDA in bf16, batch 1/4/16, with and without
``torch.compile``, with peak VRAM. It does nothing without a CUDA device.

    python benchmarks/bench_gpu.py [--checker Freepik/nsfw_image_detector]

Input: decoded ``[-1, 1]`` 1024² tensors already on the GPU, as a text-to-image pipeline hands
them over; timed from those tensors to the scores (preprocessing, model, levels).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import machine, measure, print_table, write_json

from nsfw_guard import NSFWDetector
from nsfw_guard.testing import make_checkpoint


def bench(source: str, device: torch.device, batches: list[int], compile_modes: list[bool]):
    detector = NSFWDetector.from_pretrained(source, device=device, dtype=torch.bfloat16)
    rows = []
    for compiled in compile_modes:
        scorer = torch.compile(detector.scorer) if compiled else detector.scorer
        for batch in batches:
            images = torch.rand(batch, 3, 1024, 1024, device=device) * 2 - 1
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode():
                seconds, _ = measure(
                    lambda scorer=scorer, images=images: scorer(images, "-1,1"),
                    device,
                    repeats=20 if device.type == "cuda" else 2,
                    warmup=3 if compiled else 1,
                )
            row = {
                "compile": compiled,
                "batch": batch,
                "ms_per_batch": seconds * 1e3,
                "ms_per_image": seconds * 1e3 / batch,
                "images_per_s": batch / seconds,
            }
            if device.type == "cuda":
                row["peak_vram_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checker", help="full-size model: Hub id or folder (default: random)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke tests
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark is skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        size = "tiny" if args.tiny else "full"
        source = args.checker or str(make_checkpoint(tmp, size=size, dtype=torch.bfloat16))
        modes = [False] if args.no_compile else [False, True]
        rows = bench(source, device, args.batches, modes)
    results = {"machine": machine(), "device": str(device), "gpu": rows}
    print(f"\nMachine: {results['machine']}")
    print_table("Scorer on [-1, 1] 1024² tensors on the GPU, bf16", rows)
    print(f"\nwrote {write_json('bench_gpu', results, args.output)}")


if __name__ == "__main__":
    main()
