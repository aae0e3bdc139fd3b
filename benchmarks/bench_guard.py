"""Guard benchmark: the cost of the NSFW check per image, this guard's tensor-native
``run_safety_checker`` vs diffusers' stock path (tensor → PIL → CLIPImageProcessor → checker),
with the same full-size classifier, batch 1 and 4.

    python benchmarks/bench_guard.py                  # random full-size checker, offline
    python benchmarks/bench_guard.py --checker Freepik/nsfw_image_detector

Two views: the check step alone on decoded 512² tensors (Stable Diffusion 1.x's size), and whole
calls of a tiny Stable Diffusion pipeline (64² images) without a checker, guarded, and stock; each
with the full-size classifier and with a tiny one, which shows the cost of the path around it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import machine, measure, print_table, write_json
from transformers import CLIPImageProcessor

from nsfw_guard import guard
from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline


def bench(checker_name: str, checker_source: str, device: torch.device, repeats: int) -> dict:
    plain = make_tiny_pipeline("sd").to(device)
    guarded = make_tiny_pipeline("sd").to(device)
    attached = guard(guarded, model=checker_source, action="blur")
    stock = make_tiny_pipeline("sd").to(device)
    # diffusers' own path, driving the very same checker through PIL and a feature extractor.
    stock.register_modules(safety_checker=attached.checker, feature_extractor=CLIPImageProcessor())

    check_rows = []
    for batch in (1, 4):
        images = torch.rand(batch, 3, 512, 512, device=device) * 2 - 1
        row = {"checker": checker_name, "batch": batch, "size": "512²"}
        row["dtype"] = str(attached.checker.dtype).removeprefix("torch.")
        for name, pipe in (("guard", guarded), ("stock", stock)):
            seconds, _ = measure(
                lambda pipe=pipe, images=images: pipe.run_safety_checker(
                    images, device, torch.float32
                ),
                device,
                repeats,
            )
            row[f"{name}_ms_per_image"] = seconds * 1e3 / batch
        row["stock_overhead_ms_per_image"] = row["stock_ms_per_image"] - row["guard_ms_per_image"]
        row["speedup"] = row["stock_ms_per_image"] / row["guard_ms_per_image"]
        check_rows.append(row)

    call_rows = []
    for batch in (1, 4):
        row = {"checker": checker_name, "batch": batch, "image": "64²"}
        for name, pipe in (("no_checker", plain), ("guard", guarded), ("stock", stock)):
            seconds, _ = measure(
                lambda pipe=pipe, batch=batch: pipe(
                    "a photo", num_inference_steps=2, num_images_per_prompt=batch
                ),
                device,
                repeats,
            )
            row[f"{name}_ms_per_image"] = seconds * 1e3 / batch
        for name in ("guard", "stock"):
            row[f"{name}_check_ms_per_image"] = (
                row[f"{name}_ms_per_image"] - row["no_checker_ms_per_image"]
            )
        call_rows.append(row)
    attached.remove()
    return {"check_step": check_rows, "pipeline_call": call_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checker", help="full-size NSFW model: Hub id or folder (default: random)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 on CPU, 20 on GPU")
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    results = {"machine": machine(), "device": str(device), "check_step": [], "pipeline_call": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkers = {
            "tiny (1 block)": str(make_checkpoint(Path(tmp) / "tiny")),
            "full-size": args.checker
            or str(make_checkpoint(Path(tmp) / "full", size="full", dtype=torch.bfloat16)),
        }
        for name, source in checkers.items():
            for key, rows in bench(name, source, device, repeats).items():
                results[key] += rows
    results["checkers"] = {
        "full-size": args.checker or "random-weight full-size checkpoint (make_checkpoint)",
        "tiny (1 block)": "make_checkpoint(size='tiny'): isolates the path around the model",
    }
    print(f"\nMachine: {results['machine']}")
    print_table("Check step on decoded 512² tensors (ms per image)", results["check_step"])
    print_table("Tiny SD pipeline call, output_type='pil' (ms per image)", results["pipeline_call"])
    print(f"\nwrote {write_json('bench_guard', results, args.output)}")


if __name__ == "__main__":
    main()
