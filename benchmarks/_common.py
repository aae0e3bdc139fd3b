"""Shared helpers for the benchmarks: timing, machine description, table printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nsfw_guard.model import default_dtype

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int = 1):
    """Median and minimum wall time of ``fn`` in seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_native_bf16": default_dtype("cpu") == torch.bfloat16,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    import timm
    import transformers

    info.update(timm=timm.__version__, transformers=transformers.__version__)
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name for the machine, e.g. ``cpu-2-cores`` or ``nvidia-h100-80gb-hbm3``."""
    name = info["gpu"] or f"cpu-{info['cpu_cores']}-cores"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """``rows`` (dicts with the same keys) as a markdown table, optionally only ``columns``."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print ``rows`` as a markdown table under ``title``."""
    if rows:
        print(f"\n### {title}\n\n{markdown_table(rows)}")


def write_json(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``payload`` to ``results/<name>-<machine>.json`` (or ``path``) and return the path."""
    path = path or RESULTS / f"{name}-{machine_slug(payload['machine'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)
