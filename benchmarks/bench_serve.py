"""Serving benchmark: images/s and p50/p99 latency of ``nsfw-guard serve`` with 1, 8 and 32
concurrent clients, dynamic batching (``--max-batch-size 16``) against none (``1``).

    python benchmarks/bench_serve.py                       # tiny and full-size checkpoints
    python benchmarks/bench_serve.py --sizes tiny --device cuda

The server runs as its own process (``nsfw-guard serve``), as users run it; each client posts
one JPEG (256-640 px) per request to ``/v1/moderate`` with httpx, one request after another.
Latency is a request's round trip; images/s counts answered requests over the wall time of the
round, after a warm-up request per client.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import machine, print_table, write_json
from PIL import Image

from nsfw_guard.testing import make_checkpoint

PHOTOS = sorted((Path(__file__).parent.parent / "tests" / "data").glob("*.jpg"))


def jpegs(count: int) -> list[bytes]:
    photos = [Image.open(path).convert("RGB") for path in PHOTOS]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = 256 + (i * 37) % 385
        buffer = io.BytesIO()
        photo.resize((side, side * photo.height // photo.width)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def start(checkpoint: str, batch: int, device: str, dtype: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "nsfw_guard",
        "serve",
        "--model",
        checkpoint,
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        dtype,
        "--max-batch-size",
        str(batch),
        "--batch-timeout-ms",
        "10",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start")


async def round_trip(url: str, clients: int, per_client: int, images: list[bytes]) -> dict:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> float:
            started = time.perf_counter()
            response = await client.post(
                "/v1/moderate",
                content=images[i % len(images)],
                headers={"content-type": "image/jpeg"},
            )
            response.raise_for_status()
            return time.perf_counter() - started

        async def user(u: int) -> None:
            for k in range(per_client):
                latencies.append(await one(u * per_client + k))

        await asyncio.gather(*(one(u) for u in range(clients)))  # warm-up: connections open
        started = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(clients)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "images_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--requests", type=int, help="requests per client (default: by size)")
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    native_bf16 = machine()["cpu_native_bf16"] or args.device == "cuda"
    dtype = "bfloat16" if native_bf16 else "float32"
    images = jpegs(64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            checkpoint = str(make_checkpoint(Path(tmp) / size, size=size))
            for batch in (16, 1):
                process, url = start(checkpoint, batch, args.device, dtype)
                try:
                    for clients in args.clients:
                        slow = size == "full" and args.device == "cpu"
                        per_client = args.requests or (max(1, 8 // clients) if slow else 32)
                        result = asyncio.run(round_trip(url, clients, per_client, images))
                        rows.append(
                            {
                                "checkpoint": size,
                                "max_batch_size": batch,
                                "clients": clients,
                                **result,
                            }
                        )
                        print(rows[-1], flush=True)
                finally:
                    process.terminate()
                    process.wait(timeout=60)
    results = {"machine": machine(), "device": args.device, "dtype": dtype, "serve": rows}
    title = f"nsfw-guard serve, /v1/moderate, one JPEG per request, {args.device} {dtype}"
    print_table(title, rows)
    print(f"\nwrote {write_json('bench_serve', results, args.output)}")


if __name__ == "__main__":
    main()
