"""Run every benchmark, write ``benchmarks/results/<machine>.json`` and ``<machine>.md``, and put
the markdown tables into README.md (between the ``benchmarks`` markers).

    python benchmarks/run_all.py                      # offline: random-weight checkpoints
    python benchmarks/run_all.py --checker Freepik/nsfw_image_detector

The GPU section runs only where CUDA is available (bf16, batch 1/4/16, with and without
``torch.compile``, peak VRAM), so the same command gives the GPU figures on a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, machine, machine_slug, markdown_table

HERE = Path(__file__).parent
README = HERE.parent / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"

# (section, script, option naming the checkpoint)
BENCHMARKS = [
    ("detector", "bench_detector.py", "--model"),
    ("guard", "bench_guard.py", "--checker"),
    ("scan", "bench_scan.py", "--checker"),
    ("gpu", "bench_gpu.py", "--checker"),
]


def run(checker: str | None, skip_gpu: bool) -> dict:
    results = {"machine": machine(), "date": datetime.date.today().isoformat()}
    results["checkpoint"] = checker or "random-weight full-size checkpoint (make_checkpoint)"
    with tempfile.TemporaryDirectory() as tmp:
        for section, script, option in BENCHMARKS:
            if section == "gpu" and (skip_gpu or not torch.cuda.is_available()):
                continue
            output = Path(tmp) / f"{section}.json"
            command = [sys.executable, str(HERE / script), "--output", str(output)]
            if checker:
                command += [option, checker]
            print(f"$ {' '.join(command)}", flush=True)
            subprocess.run(command, check=True)
            data = json.loads(output.read_text())
            results[section] = {k: v for k, v in data.items() if k != "machine"}
    return results


def render(results: dict) -> str:
    """The markdown that README.md includes."""
    info = results["machine"]
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(info.get("cpu_native_bf16"), "")
    where = f"{info['cpu']} ({info['cpu_cores']} cores{bf16})" + (
        f", {info['gpu']}" if info["gpu"] else ", no GPU"
    )
    parts = [
        f"Measured {results['date']} on {where}, torch {info['torch']}, "
        f"{results['checkpoint']}; medians. Rerun: `python benchmarks/run_all.py`.",
    ]

    def table(title: str, rows: list[dict], columns: list[str]) -> None:
        if rows:
            columns = [c for c in columns if c in rows[0]]
            parts.append(f"**{title}**\n\n{markdown_table(rows, columns)}")

    detector = results.get("detector", {})
    table(
        "Preprocessing `[-1, 1]` tensors to model input: in-graph vs the card's PIL path (ms)",
        detector.get("preprocess", []),
        ["size", "batch", "pil_path_ms", "in_graph_ms", "speedup"],
    )
    table(
        "Full-size forward, model only",
        detector.get("forward", []),
        ["dtype", "batch", "ms_per_image", "images_per_s", "peak_vram_mib"],
    )
    table(
        "Defaults, one photo: nsfw-guard vs nsfw-image-detector 0.1.2 (each in its own process)",
        detector.get("defaults_vs_seed", []),
        ["cpu_isa", "package", "default_dtype", "s_per_image", "peak_rss_mib", "speedup_vs_seed"],
    )
    guard = results.get("guard", {})
    table(
        "Guard check per image on decoded 512² tensors: tensor-native vs diffusers' stock path",
        guard.get("check_step", []),
        [
            "checker",
            "batch",
            "dtype",
            "guard_ms_per_image",
            "stock_ms_per_image",
            "stock_overhead_ms_per_image",
        ],
    )
    table(
        "Scan throughput vs model-only throughput on the same JPEGs (images/s)",
        results.get("scan", {}).get("scan", []),
        [
            "checkpoint",
            "dtype",
            "images",
            "workers",
            "model_only_images_per_s",
            "scan_images_per_s",
            "ratio",
        ],
    )
    if "gpu" in results:
        table(
            "GPU: scorer on `[-1, 1]` 1024² tensors, bf16",
            results["gpu"].get("gpu", []),
            ["compile", "batch", "ms_per_image", "images_per_s", "peak_vram_mib"],
        )
    else:
        parts.append("**GPU**: no CUDA device on this machine; `run_all.py` on a GPU adds it.")
    return "\n\n".join(parts) + "\n"


def update_readme(markdown: str) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block to update")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{markdown}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checker", help="full-size model: Hub id or folder (default: random)")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    args = parser.parse_args()
    results = run(args.checker, args.skip_gpu)
    slug = machine_slug(results["machine"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{slug}.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render(results)
    (RESULTS / f"{slug}.md").write_text(markdown)
    if not args.no_readme:
        update_readme(markdown)
    print(f"\nwrote {RESULTS / slug}.json and .md" + ("" if args.no_readme else ", README.md"))


if __name__ == "__main__":
    main()
