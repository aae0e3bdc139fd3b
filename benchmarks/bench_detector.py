"""Detector benchmark: in-graph preprocessing vs the model card's PIL path, full-size forward per
dtype and batch, and this detector's defaults vs ``nsfw-image-detector`` 0.1.2's defaults.

    python benchmarks/bench_detector.py            # random full-size checkpoint, offline
    python benchmarks/bench_detector.py --model Freepik/nsfw_image_detector

The seed comparison needs ``pip install --no-deps nsfw-image-detector==0.1.2`` in the same
environment; without it that section is skipped. Prints markdown tables and writes JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, measure, print_table, write_json
from PIL import Image
from timm.data import create_transform, resolve_data_config

from nsfw_guard import NSFWDetector
from nsfw_guard.model import default_dtype
from nsfw_guard.testing import make_checkpoint

PHOTO = Path(__file__).parent.parent / "tests" / "data" / "astronaut.jpg"


def bench_preprocess(device: torch.device, quick: bool) -> list[dict]:
    """ms per batch: [-1, 1] tensors → model input, in-graph vs tensor → PIL → timm transform."""
    detector = NSFWDetector.from_pretrained(
        make_checkpoint(tempfile.mkdtemp()), device=device, dtype=torch.float32
    )
    transform = create_transform(
        **resolve_data_config(pretrained_cfg=detector.model.pretrained_cfg)
    )

    def pil_path(images: torch.Tensor) -> torch.Tensor:
        # What diffusers' stock checker does (denormalize, to uint8, to PIL), then the card's
        # transform.
        unit = (images * 0.5 + 0.5).clamp(0, 1)
        arrays = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pils = [Image.fromarray(array) for array in arrays]
        return torch.stack([transform(pil) for pil in pils]).to(device)

    rows = []
    for size in (512, 1024):
        for batch in (1, 4, 16):
            images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
            repeats = 5 if quick else 30
            pil, _ = measure(lambda images=images: pil_path(images), device, repeats)
            ours, _ = measure(
                lambda images=images: detector.preprocess(images, value_range="-1,1"),
                device,
                repeats,
            )
            rows.append(
                {
                    "size": f"{size}²",
                    "batch": batch,
                    "pil_path_ms": pil * 1e3,
                    "in_graph_ms": ours * 1e3,
                    "in_graph_ms_per_image": ours * 1e3 / batch,
                    "speedup": pil / ours,
                }
            )
    return rows


def bench_forward(folder: str, device: torch.device, quick: bool) -> list[dict]:
    """Full-size forward (model only, preprocessed input) per dtype and batch."""
    if device.type == "cuda":
        plan = [
            (dtype, batch) for dtype in ("bfloat16", "float16", "float32") for batch in (1, 4, 16)
        ]
    elif default_dtype(device) == torch.bfloat16:
        plan = [(dtype, batch) for dtype in ("bfloat16", "float32") for batch in (1, 4)]
    else:
        # Emulated bf16 is several times slower: batch 4 would take over a minute.
        plan = [("float32", 1), ("float32", 4), ("bfloat16", 1)]
    rows = []
    for dtype_name, batch in plan:
        dtype = getattr(torch, dtype_name)
        detector = NSFWDetector.from_pretrained(folder, device=device, dtype=dtype)
        pixels = torch.randn(batch, 3, 448, 448, device=device, dtype=dtype)
        repeats = (
            1 if (quick or device.type == "cpu") and (batch > 1 or dtype_name != "float32") else 3
        )
        if device.type == "cuda":
            repeats = 20
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            median, _ = measure(
                lambda model=detector.model, pixels=pixels: model(pixels), device, repeats
            )
        row = {
            "dtype": dtype_name,
            "batch": batch,
            "ms_per_batch": median * 1e3,
            "ms_per_image": median * 1e3 / batch,
            "images_per_s": batch / median,
        }
        if device.type == "cuda":
            row["peak_vram_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        del detector
    return rows


def run_one(which: str, folder: str, repeats: int) -> dict:
    """In a fresh process: load one package's detector with its defaults, time one image."""
    image = Image.open(PHOTO).convert("RGB")
    start = time.perf_counter()
    if which == "seed":
        from nsfw_image_detector import NSFWDetector as SeedDetector

        detector = SeedDetector(model_name=folder)
        dtype = detector.dtype
    else:
        detector = NSFWDetector(folder)
        dtype = detector.dtype
    load_s = time.perf_counter() - start
    device = detector.device
    median, _ = measure(lambda: detector.predict_proba(image), device, repeats)
    scores = detector.predict_proba(image)[0]
    peak_rss = _peak_rss_mib()
    return {
        "package": "nsfw-image-detector 0.1.2" if which == "seed" else "nsfw-guard",
        "default_dtype": str(dtype).replace("torch.", ""),
        "load_s": load_s,
        "s_per_image": median,
        "peak_rss_mib": peak_rss,
        "score_medium": float(scores["medium"]),
    }


# CPUs without bf16 instructions (AVX2 only), emulated on this one by capping oneDNN and ATen.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _median_run(runs: list[dict]) -> dict:
    """One row for several runs of a package: median times, highest peak memory."""
    row = dict(runs[0])
    for key in ("load_s", "s_per_image"):
        row[key] = statistics.median(run[key] for run in runs)
    row["peak_rss_mib"] = max(run["peak_rss_mib"] or 0 for run in runs)
    row["runs"] = len(runs)
    return row


def bench_defaults(folder: str, device: torch.device, quick: bool) -> list[dict]:
    """This detector's defaults vs the seed package's, each in its own process, same image."""
    try:
        import nsfw_image_detector  # noqa: F401
    except ImportError:
        print(
            "\n(nsfw-image-detector is not installed: skipping the defaults comparison; "
            "`pip install --no-deps nsfw-image-detector==0.1.2` to run it)"
        )
        return []
    settings = [("native", {})]
    if device.type == "cpu":
        settings.append(("AVX2 only (emulated)", AVX2_ONLY))
    rows = []
    for isa, env in settings:
        # Alternate the two packages over several rounds: this machine's speed drifts by
        # several percent, and a fixed order would bias the comparison.
        runs: dict[str, list[dict]] = {"ours": [], "seed": []}
        for _ in range(1 if quick else 3):
            for which in runs:
                repeats = 1 if quick else 2 if (which == "seed" and env) else 3
                command = [sys.executable, __file__, "--_one", which, "--model", folder]
                result = subprocess.run(
                    [*command, "--repeats", str(repeats)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, **env},
                )
                runs[which].append(json.loads(result.stdout.strip().splitlines()[-1]))
        ours, seed = (_median_run(runs[which]) for which in ("ours", "seed"))
        ours["speedup_vs_seed"] = seed["s_per_image"] / ours["s_per_image"]
        seed["speedup_vs_seed"] = 1.0
        rows += [{"cpu_isa": isa, **ours}, {"cpu_isa": isa, **seed}]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="full-size checkpoint: Hub id or folder (default: random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--_one", choices=["ours", "seed"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._one:
        print(json.dumps(run_one(args._one, args.model, args.repeats)))
        return

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or str(make_checkpoint(tmp, size="full", dtype=torch.bfloat16))
        source = args.model or "random-weight full-size checkpoint (make_checkpoint, bf16 on disk)"
        results = {
            "machine": machine(),
            "device": str(device),
            "checkpoint": source,
            "preprocess": bench_preprocess(device, args.quick),
            "forward": bench_forward(folder, device, args.quick),
            "defaults_vs_seed": bench_defaults(folder, device, args.quick),
        }
    print(f"\nMachine: {results['machine']}")
    print_table("Preprocessing [-1, 1] tensors → model input (ms)", results["preprocess"])
    print_table("Full-size forward", results["forward"])
    print_table("Defaults, one photo (full-size model)", results["defaults_vs_seed"])
    print(f"\nwrote {write_json('bench_detector', results, args.output)}")


if __name__ == "__main__":
    main()
