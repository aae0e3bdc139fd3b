"""Backends side by side, timm's style: the whole check step (decoded ``[-1, 1]`` pixels → the
four scores, resize and normalize included) in img/s and ms/img per batch, and peak memory, for
PyTorch eager (float32, bfloat16 and the fast dtype), ``torch.compile``, ONNX Runtime (the
package's backend: CPU, and CUDA where ``onnxruntime-gpu`` is installed) and TensorRT (ONNX
Runtime's TensorRT provider, where present).

    python benchmarks/bench_backends.py                 # full-size random checkpoint, this machine
    python benchmarks/bench_backends.py --tiny --batches 1 2 --repeats 1   # the code path, quickly

Each backend runs in a process of its own, so its peak memory (CUDA: the device's; CPU: the
process's resident set) is its own. Scores are compared with eager float32 on the same images.
Prints a markdown table and writes JSON to ``benchmarks/results/standalone/``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, machine, machine_slug, measure, print_table, write_json

from nsfw_guard.model import default_dtype, load_model
from nsfw_guard.onnx_backend import OnnxScorer
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import make_checkpoint

BACKENDS = (
    "eager-fp32",
    "eager-bf16",
    "eager",
    "compiled",
    "onnxruntime",
    "onnxruntime-cuda",
    "tensorrt",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--size", type=int, default=512, help="decoded image side (default 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny checkpoint: the code path")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the compiled rows (default: the package's, max-autotune-no-"
        "cudagraphs); 'default' compiles far faster on CPUs",
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--only", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_backend(args.only, args)))
        return

    with tempfile.TemporaryDirectory() as workdir:
        folder = make_checkpoint(Path(workdir) / "checkpoint", size="tiny" if args.tiny else "full")
        export(folder, Path(workdir) / "nsfw.onnx")
        rows = []
        for backend in args.backends:
            command = [sys.executable, __file__, "--only", backend, "--workdir", workdir]
            command += ["--device", args.device, "--size", str(args.size)]
            command += ["--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
            command += ["--compile-mode", args.compile_mode] if args.compile_mode else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{backend} failed:\n{done.stderr[-3000:]}")
            rows += json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(rows), file=sys.stderr)  # so far, in case a later backend fails
    info = machine()
    title = f"Backends, the whole check step, {args.size}² inputs ({info['gpu'] or info['cpu']})"
    print_table(title, rows)
    payload = {"machine": info, "tiny": args.tiny, "size": args.size, "backends": rows}
    payload["compile_mode"] = args.compile_mode or "max-autotune-no-cudagraphs"
    output = args.output or RESULTS / "standalone" / f"backends-{machine_slug(info)}.json"
    print(f"\nwrote {write_json('backends', payload, output)}")


def export(folder: Path, path: Path) -> None:
    from nsfw_guard.export import export_onnx

    loaded = load_model(folder, device="cpu", dtype=torch.float32)
    start = time.perf_counter()
    export_onnx(NSFWScorer(loaded.model, loaded.data_config), path)
    print(f"exported in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def run_backend(backend: str, args: argparse.Namespace) -> list[dict]:
    """Rows for one backend, or none where it cannot run on this machine."""
    device = torch.device(args.device)
    if backend in ("onnxruntime-cuda", "tensorrt") and device.type != "cuda":
        return []
    folder, onnx_path = args.workdir / "checkpoint", args.workdir / "nsfw.onnx"
    reference = load_model(folder, device=device, dtype=torch.float32)
    reference = NSFWScorer(reference.model, reference.data_config)
    score, dtype, compile_s = make_backend(backend, folder, onnx_path, device, args.compile_mode)
    if score is None:
        return []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for batch in args.batches:
        images = torch.rand(batch, 3, args.size, args.size, device=device) * 2 - 1
        with torch.inference_mode():
            expected = reference(images, "-1,1")
            start = time.perf_counter()
            got = score(images)  # the first call at this batch: compiles, where it compiles
            first_s = time.perf_counter() - start
            median, _ = measure(lambda images=images: score(images), device, args.repeats)
        rows.append(
            {
                "backend": backend,
                "dtype": dtype,
                "batch": batch,
                "img_per_s": batch / median,
                "ms_per_img": 1000 * median / batch,
                "first_call_s": first_s,
                "max_abs_diff_vs_fp32": (got.float().cpu() - expected.cpu()).abs().max().item(),
            }
        )
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    for row in rows:
        row["peak_mib"] = peak
        row["compile_s"] = compile_s
    return rows


def make_backend(
    backend: str, folder: Path, onnx_path: Path, device: torch.device, compile_mode: str | None
):
    """``(score(images) -> scores, dtype name, seconds spent compiling up front)``."""
    fast = default_dtype(device)
    if backend in ("eager-fp32", "eager-bf16", "eager", "compiled"):
        dtype = {"eager-fp32": torch.float32, "eager-bf16": torch.bfloat16}.get(backend, fast)
        loaded = load_model(folder, device=device, dtype=dtype)
        compile = {"mode": compile_mode} if compile_mode else True
        scorer = NSFWScorer(
            loaded.model, loaded.data_config, compile=backend == "compiled" and compile
        )
        return (lambda images: scorer(images, "-1,1")), str(dtype).removeprefix("torch."), 0.0
    import onnxruntime

    provider = {
        "onnxruntime": "CPUExecutionProvider",
        "onnxruntime-cuda": "CUDAExecutionProvider",
        "tensorrt": "TensorrtExecutionProvider",
    }[backend]
    if provider not in onnxruntime.get_available_providers():
        return None, None, None
    start = time.perf_counter()
    if backend != "tensorrt":  # the package's own backend: pixels bound in place on the device
        scorer = OnnxScorer(onnx_path, device="cuda" if backend == "onnxruntime-cuda" else "cpu")
        build_s = time.perf_counter() - start
        return (lambda images: scorer(images, "-1,1")), "float32", build_s
    options = {"trt_fp16_enable": True}
    session = onnxruntime.InferenceSession(str(onnx_path), providers=[(provider, options)])
    build_s = time.perf_counter() - start

    def score(images: torch.Tensor) -> torch.Tensor:
        (scores,) = session.run(None, {"images": images.cpu().numpy()})
        return torch.from_numpy(scores)

    return score, "float16" if backend == "tensorrt" else "float32", build_s


if __name__ == "__main__":
    main()
