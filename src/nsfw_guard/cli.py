"""The ``nsfw-guard`` command line.

Examples:
    nsfw-guard scan photos/ --output results.jsonl
    nsfw-guard scan uploads/ --censor-to censored/ --action blur --fail-on high
    nsfw-guard check photo.jpg other.png
    nsfw-guard serve --port 8000
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import DEFAULT_MODEL, __version__

if TYPE_CHECKING:
    from .detector import NSFWDetector

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_FILE_ERRORS = 0, 1, 2, 3
EXIT_ERROR = 4  # could not finish: the records or copies could not be written
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

_LEVELS = ("low", "medium", "high")
_SCORES = ("neutral", "low", "medium", "high")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code.

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        nsfw-guard ...
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"nsfw-guard {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with _warnings_as_lines(), _stop_on_signals() as args.stop:
            return args.run(args, args.command_parser)
    except KeyboardInterrupt:  # a second Ctrl-C
        _say("nsfw-guard: interrupted")
        return EXIT_INTERRUPTED
    except Exception as error:  # one line, never a traceback, never exit 1 ("flagged")
        if os.environ.get("NSFW_GUARD_DEBUG"):
            raise
        _say(f"nsfw-guard: error: {type(error).__name__}: {_shown(str(error))}")
        return EXIT_ERROR


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (with where to look), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nsfw-guard",
        description="Check images with the 4-level NSFW classifier (neutral, low, medium, high).",
        epilog="Examples:\n  nsfw-guard scan photos/ --output results.jsonl\n"
        "  nsfw-guard check photo.jpg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    scan = commands.add_parser(
        "scan",
        help="scan files and folders, write one record per image",
        description="Scan images (recursively by default) and write one record per input: "
        "path, level, the four scores, flagged, width, height, frames, error. Bad files, "
        "missing paths and unreadable folders get an error record and never stop the scan. "
        "Ctrl-C or SIGTERM stops after the batch in flight; --resume continues. Exit code: 0 "
        "done, 1 an image at or above --fail-on, 2 usage error, 3 done with file errors, 130 "
        "stopped. Besides image files it reads the images in webdataset tar shards (brace "
        "patterns such as 'shards/{00000..00099}.tar') and parquet files, one record each. "
        "Several processes: accelerate launch --multi_gpu --num_processes N -m nsfw_guard scan "
        "..., or torchrun; a Ray cluster: --engine ray.",
        epilog="Examples:\n"
        "  nsfw-guard scan photos/ --output results.jsonl\n"
        "  nsfw-guard scan a.png b/ --output results.csv --level high --threshold 0.7\n"
        "  nsfw-guard scan uploads/ --resume                  # continue an interrupted scan\n"
        "  nsfw-guard scan uploads/ --censor-to censored/ --action pixelate\n"
        "  nsfw-guard scan dataset/ --fail-on medium --quiet  # a CI gate\n"
        "  nsfw-guard scan 'shards/{00000..00099}.tar' --output results.parquet\n"
        "  nsfw-guard scan data/*.parquet --image-column jpg --engine ray --address auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    _add_model_options(scan)
    scan.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) - 1)),
        help="decoding processes (0: decode in the main process; default: cores - 1, at most 8)",
    )
    scan.add_argument(
        "--recursive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="look into sub-folders (default: yes)",
    )
    scan.add_argument(
        "--output",
        type=Path,
        default=Path("results.jsonl"),
        help="records: JSON lines, CSV for a .csv name, parquet for a .parquet name "
        "(default: results.jsonl)",
    )
    scan.add_argument(
        "--image-column",
        metavar="NAME",
        help="parquet files' image column: bytes, or {'bytes': ...} structs "
        "(default: image, else jpg, png, webp, ..., else the one column declared an Image "
        "by a Hugging Face dataset)",
    )
    scan.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (default); ray: actors on a Ray cluster, which reads the "
        "inputs at the same paths (a shared file system)",
    )
    scan.add_argument(
        "--address",
        help="with --engine ray: the cluster to join (auto, ray://HOST:10001); default: a "
        "local cluster started for the scan",
    )
    scan.add_argument(
        "--actors",
        type=int,
        help="with --engine ray: model replicas (default: one per GPU, or 1 on CPUs)",
    )
    scan.add_argument(
        "--resume", action="store_true", help="skip inputs already in --output, then append"
    )
    scan.add_argument("--censor-to", type=Path, metavar="DIR", help="write censored copies here")
    scan.add_argument(
        "--action",
        default="blur",
        choices=("blur", "pixelate", "blank", "regions"),
        help="how --censor-to censors flagged images (default: blur; regions: only the regions "
        "that made it flagged, the whole image where that does not clear the flag)",
    )
    _add_region_options(scan)
    scan.add_argument(
        "--copy-clean", action="store_true", help="with --censor-to, also copy clean images"
    )
    scan.add_argument(
        "--fail-on",
        choices=_LEVELS,
        metavar="LEVEL",
        help="exit 1 if any image reaches LEVEL, or is an animation checked only in part "
        "(--max-frames: its other frames were never looked at)",
    )
    scan.add_argument("--quiet", action="store_true", help="no progress bar and summary")
    scan.set_defaults(run=_run_scan, command_parser=scan)

    check = commands.add_parser(
        "check",
        help="print each image's level and scores",
        description="Print one line per image: its level, its four scores and whether it is "
        "flagged at --level, the same verdict scan gives (an animation: its worst checked "
        "frame), then, when the file's metadata holds a verdict nsfw-guard wrote (a censored "
        "copy's, a generated image's), what it says ('recorded: level=high FLAGGED "
        "censored=blur at=medium/0.5 model=...'), never in place of the fresh verdict. A "
        "missing, unreadable or non-image path gets an error line. Exit code 1 if any image "
        "is flagged, 3 if a path could not be checked, 130 if stopped.",
        epilog="Examples:\n  nsfw-guard check photo.jpg\n"
        "  nsfw-guard check --level high --threshold 0.7 *.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    _add_model_options(check)
    check.set_defaults(run=_run_check, command_parser=check)

    serve = commands.add_parser(
        "serve",
        help="an HTTP moderation API with dynamic batching, and a page to check images",
        description="Serve the model over HTTP (LitServe): POST /v1/moderate (images as "
        "multipart files or JSON base64, or one raw image) returns each image's level, scores "
        "and flag; POST /v1/censor returns the image, censored if flagged, with the verdict "
        "in X-NSFW-* headers. Requests arriving within --batch-timeout-ms are checked as one "
        "batch. GET / is a page to drop images on, GET /healthz and GET /metrics (Prometheus) "
        "the rest. Bad requests get a 4xx with a JSON error. With --api-key (or "
        "NSFW_GUARD_API_KEY) every route but /healthz and the page needs 'Authorization: "
        "Bearer KEY'. Ctrl-C or SIGTERM stops it.",
        epilog="Examples:\n  nsfw-guard serve\n"
        '  nsfw-guard serve --host 0.0.0.0 --port 8080 --api-key "$KEY" --device cuda\n'
        "  curl -F image=@photo.jpg http://127.0.0.1:8000/v1/moderate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        choices=("127.0.0.1", "0.0.0.0", "::"),
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    _add_allowed_hosts(serve)
    serve.add_argument(
        "--level", default="medium", choices=_LEVELS, help="default level (default: medium)"
    )
    serve.add_argument("--threshold", type=float, default=0.5, help="default threshold (0.5)")
    serve.add_argument(
        "--action",
        default="blur",
        choices=("blur", "pixelate", "blank", "regions"),
        help="default: blur",
    )
    _add_region_options(serve)
    _add_checkpoint(serve)
    serve.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto"
    )
    serve.add_argument("--dtype", default="auto", choices=_DTYPES, help="default: auto")
    _add_backend(serve)
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="requests per model batch (default: 16)"
    )
    serve.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=10.0,
        help="how long a batch waits for more requests (default: 10)",
    )
    serve.add_argument(
        "--max-bytes",
        type=int,
        default=20 * 2**20,
        help="largest request body in bytes (default: 20 MiB)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds a request's body may take to arrive; a slower one gets 408 (default: 5)",
    )
    serve.add_argument(
        "--max-images", type=int, default=32, help="images per request (default: 32)"
    )
    serve.add_argument(
        "--max-frames",
        type=int,
        default=0,
        help="0: check every frame of an animation (default); N: only N, spread evenly, and "
        "such an animation is flagged (sampled)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("NSFW_GUARD_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $NSFW_GUARD_API_KEY, else none)",
    )
    serve.set_defaults(run=_run_serve, command_parser=serve)

    review = commands.add_parser(
        "review",
        help="a page to review a scan's records and approve or reject each image",
        description="Serve a review page over a scan's records (JSON lines, CSV or parquet): a "
        "grid of thumbnails (flagged ones blurred until hovered or clicked), filtered by level, "
        "sorted by score, a page at a time. Keys: arrows move, a approves, r rejects, space "
        "shows. Each decision is appended at once to RESULTS.decisions.jsonl (for CSV or "
        "parquet records RESULTS.csv.decisions.jsonl...) beside the records, naming the "
        "version of the file decided on; reloading the page resumes; /decisions.csv exports "
        "them. Only the images the records name are read. The page needs a key (made up for "
        "each run unless --api-key gives one): open the address this prints, which holds it. "
        "With --model, m (or a card's map button) shows the image's region map over its "
        "thumbnail.",
        epilog="Examples:\n  nsfw-guard review results.jsonl\n"
        "  nsfw-guard review results.parquet --port 8081",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    review.add_argument("results", type=Path, metavar="RESULTS", help="a scan's record file")
    review.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    review.add_argument("--port", type=int, default=8001, help="default: 8001")
    _add_allowed_hosts(review)
    review.add_argument(
        "--api-key",
        default=os.environ.get("NSFW_GUARD_API_KEY"),
        help="the key the page needs (default: $NSFW_GUARD_API_KEY, else a new one each run)",
    )
    review.add_argument(
        "--model",
        default=None,
        help="Hub id or local folder of the model for region maps (default: none, no maps)",
    )
    review.add_argument(
        "--device", default="auto", help="the maps' device: auto, cpu, cuda... (default: auto)"
    )
    _add_region_options(review, ("map", "cells"), "with --model: the maps'")
    review.set_defaults(run=_run_review, command_parser=review)

    export = commands.add_parser(
        "export",
        help="write the scoring graph as an ONNX file or a TensorRT engine",
        description="Export the whole scoring graph (RGB pixels of any size → the four level "
        "scores, resize and normalize included) with torch.export: --format onnx writes an "
        "ONNX file with a dynamic batch, height and width (input 'images' [B, 3, H, W], output "
        "'scores' [B, 4]), checked against PyTorch before it is kept; --format tensorrt also "
        "builds a TensorRT engine from it (needs a CUDA GPU and the tensorrt package). Run the "
        "ONNX file with --backend onnxruntime, or NSFWDetector(path, backend='onnxruntime').",
        epilog="Examples:\n  nsfw-guard export --format onnx nsfw.onnx\n"
        "  nsfw-guard export --format onnx --pixels uint8 nsfw-uint8.onnx\n"
        "  nsfw-guard export --format tensorrt nsfw.engine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("out", type=Path, metavar="OUT", help="the file to write")
    export.add_argument("--format", required=True, choices=("onnx", "tensorrt"))
    export.add_argument(
        "--pixels",
        default="-1,1",
        choices=("-1,1", "0,1", "0,255", "uint8"),
        help="what the graph takes: float32 in this range (-1,1: what diffusers' VAE decodes) "
        "or uint8 (default: -1,1)",
    )
    _add_checkpoint(export)
    export.add_argument(
        "--precision",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="the TensorRT engine's precision (default: float16)",
    )
    export.set_defaults(run=_run_export, command_parser=export)
    return parser


def _run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .export import ExportError, build_tensorrt_engine, export_onnx
    from .model import load_model
    from .scoring import NSFWScorer

    out = args.out
    if out.is_dir() or not out.parent.is_dir():
        parser.error(f"{out}: expected a file name in an existing folder")
    onnx_path = out if args.format == "onnx" else out.with_suffix(".onnx")
    if args.format == "tensorrt" and onnx_path == out:
        parser.error(f"{out}: name the engine with another suffix, such as .engine")
    try:
        loaded = load_model(args.model, revision=args.revision, device="cpu", dtype=torch.float32)
        scorer = NSFWScorer(loaded.model, loaded.data_config)
        export_onnx(scorer, onnx_path, pixels=args.pixels, source=_model_name(args))
        _say(f"wrote {onnx_path}")
        if args.format == "tensorrt":
            build_tensorrt_engine(onnx_path, out, dtype=getattr(torch, args.precision))
            _say(f"wrote {out}")
    except (OSError, ValueError, ExportError) as error:
        _say(f"nsfw-guard: error: {_shown(str(error))}")
        return EXIT_ERROR
    return EXIT_OK


def _run_review(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import secrets
    import signal
    import socket
    import urllib.parse

    import uvicorn

    from .access import allowed_hosts
    from .review import create_app

    if not args.results.is_file():
        parser.error(f"{args.results}: no such record file")
    region_params = _region_params(args, parser)
    if region_params and args.model is None:
        parser.error("--region-map and --region-cells are for the maps of --model")
    key = args.api_key or secrets.token_urlsafe(24)
    scorer = None
    if args.model is not None:
        from .detector import NSFWDetector

        device = None if args.device == "auto" else args.device
        try:
            scorer = NSFWDetector.from_pretrained(args.model, device=device).scorer
        except (OSError, ValueError) as error:  # the model could not be loaded: say why
            parser.error(str(error))
    try:
        hosts = allowed_hosts(args.host, args.allowed_hosts)
        app = create_app(
            args.results, key=key, hosts=hosts, scorer=scorer, region_params=region_params
        )
    except ValueError as error:
        parser.error(str(error))
    host = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
    host = f"[{host}]" if ":" in host else host
    address = f"http://{host}:{args.port}/?{urllib.parse.urlencode({'key': key})}"
    _say(f"nsfw-guard: reviewing {_shown(str(args.results))}: open {address}")
    # uvicorn stops on Ctrl-C or SIGTERM, then raises the signal again for the handler it found:
    # each decision is saved as it is made, so there is nothing left to do.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    _say("nsfw-guard: review stopped; every decision is saved")
    return EXIT_OK


def _run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import signal
    import tempfile

    for name in ("max_batch_size", "max_bytes", "max_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected 1 or more")
    if args.batch_timeout_ms < 0 or args.max_frames < 0:
        parser.error("--batch-timeout-ms and --max-frames: expected 0 or more")
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: expected a number in [0, 1]")
    if not 0.0 < args.request_timeout < math.inf:
        timeout = args.request_timeout
        parser.error(f"--request-timeout {timeout}: expected a number of seconds above 0")
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected 1024 to 65535")
    _check_backend_options(args, parser)
    region_params = _region_params(args, parser)
    from .export import read_metadata
    from .model import resolve_folder

    try:  # here, once: the worker then loads from the folder (or the Hub's cache)
        if args.backend == "onnxruntime":
            read_metadata(args.model)
            model = os.path.abspath(args.model)
        else:
            model = str(resolve_folder(args.model, revision=args.revision))
    except (OSError, ValueError) as error:
        _say(f"nsfw-guard: error: {_shown(str(error))}")
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="nsfw-guard-metrics-") as metrics:
        # Every process of the server (they inherit this) writes its metrics there.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics)
        from .access import allowed_hosts
        from .serve import ServeSettings, build_server

        settings = ServeSettings(
            model=model,
            dtype=None if args.dtype == "auto" else args.dtype,
            backend=args.backend,
            compile=_compile_option(args),
            level=args.level,
            threshold=args.threshold,
            action=args.action,
            region_params=region_params,
            max_batch_size=args.max_batch_size,
            batch_timeout_ms=args.batch_timeout_ms,
            max_bytes=args.max_bytes,
            request_timeout=args.request_timeout,
            max_images=args.max_images,
            max_frames=args.max_frames,
            api_key=args.api_key or None,
            model_name=_model_name(args),
            hosts=allowed_hosts(args.host, args.allowed_hosts),
        )
        server = build_server(settings, accelerator=args.device)

        server_pid = os.getpid()

        def stop(signum: int, frame: Any) -> None:
            if os.getpid() == server_pid:
                raise KeyboardInterrupt  # LitServe shuts its processes down on it
            # A process LitServe forked (its HTTP server), told to end by it: end as usual.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        # LitServe handles Ctrl-C itself: no "after the batch in flight" here.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, stop)
        _say(f"nsfw-guard: serving {settings.model_name} on http://{args.host}:{args.port}/")
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")
    return EXIT_OK


_REGION_OPTIONS = {
    "margin": (
        {"type": float, "metavar": "FRACTION"},
        "grow each region by this fraction of the longer side (default: 0.05)",
    ),
    "censor": ({"choices": ("blur", "pixelate")}, "how the regions are censored (default: blur)"),
    "map": ({"choices": ("occlusion", "cam")}, "how the regions are found (default: occlusion)"),
    "cells": (
        {"type": int, "metavar": "N"},
        "the occlusion map's N x N grid of cells, 1-16 (default: 4; it scores 2 N² + (N - 1)² "
        "+ 2 variants of each image)",
    ),
    "shape": ({"choices": ("rect", "ellipse")}, "how a region grows by its margin (default: rect)"),
    "feather": (
        {"type": float, "metavar": "FRACTION"},
        "a soft edge outside each region, a Gaussian whose sigma is this fraction of the longer "
        "side (default: 0, a hard edge)",
    ),
}
"""``--region-NAME``: ``action="regions"``'s parameter NAME (see :data:`censor.REGION_DEFAULTS`)."""


def _add_region_options(
    parser: argparse.ArgumentParser,
    names: Sequence[str] = tuple(_REGION_OPTIONS),
    prefix: str = "with --action regions:",
) -> None:
    for name in names:
        kind, text = _REGION_OPTIONS[name]
        parser.add_argument(f"--region-{name}", **kind, help=f"{prefix} {text}")


def _region_params(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``action="regions"``'s settings from the command line, checked."""
    from . import censor

    given = {name: getattr(args, f"region_{name}", None) for name in _REGION_OPTIONS}
    params = {name: value for name, value in given.items() if value is not None}
    try:
        return censor.check_params("regions", params)
    except ValueError as error:
        message = str(error)
        for name in ("margin", "feather"):
            message = message.replace(f"region {name}=", f"--region-{name} ")
        parser.error(message.replace("region_cells=", "--region-cells "))


def _add_allowed_hosts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="host names requests may give besides 127.0.0.1, localhost and ::1, comma-separated "
        "(a reverse proxy's public name), or * for any (default: any when listening on all "
        "addresses; on 127.0.0.1 none, against DNS rebinding)",
    )


def _add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--level",
        default="medium",
        choices=_LEVELS,
        help="flag images at or above this level (default: medium)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="score needed to reach a level (default: 0.5)"
    )
    _add_checkpoint(parser)
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1, … (default: auto)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=_DTYPES,
        help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32 (default: auto)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    _add_backend(parser)
    parser.add_argument(
        "--max-frames",
        type=int,
        default=0,
        help="0: check every frame of an animation, a chunk at a time (default). N: check only "
        "N frames, spread evenly; the others are never looked at, so such an animation is "
        "flagged and its record says sampled. An animation is as bad as its worst frame.",
    )


def _add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnxruntime"),
        help="torch: --model is a checkpoint (default). onnxruntime: --model is a file written "
        "by `nsfw-guard export --format onnx`, run by ONNX Runtime (--dtype and --revision do "
        "not apply)",
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="run the classifier through torch.compile, once per batch-size bucket (the "
        "first batches wait for it); auto: on CUDA only (default: auto)",
    )


def _check_backend_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.backend == "onnxruntime":
        given = [
            option
            for option, value in (
                ("--dtype", args.dtype != "auto"),
                ("--revision", args.revision is not None),
                ("--compile", args.compile != "auto"),
            )
            if value
        ]
        if given:
            parser.error(f"{' and '.join(given)}: for the torch backend, not onnxruntime")


def _compile_option(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.compile]


def _check_model_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    _check_backend_options(args, parser)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: expected a number in [0, 1]")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected a positive integer")


def _load_detector(
    args: argparse.Namespace, parser: argparse.ArgumentParser, device: Any = None
) -> NSFWDetector:
    import torch  # heavy imports wait until a command needs the model

    from .detector import NSFWDetector

    _check_model_options(args, parser)
    try:
        return NSFWDetector.from_pretrained(
            args.model,
            revision=args.revision,
            device=device or (None if args.device == "auto" else args.device),
            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            batch_size=args.batch_size,
            level=args.level,
            backend=args.backend,
            compile=_compile_option(args),
        )
    except (OSError, ValueError) as error:  # the model could not be loaded: say why, no usage
        _say(f"nsfw-guard: error: {_shown(str(error))}")
        raise SystemExit(EXIT_USAGE) from None


def _run_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .records import record_key
    from .scan import find_images, scan

    _check_frames(args, parser)
    inputs = find_images(args.images, recursive=False, folders=False)
    order = {str(path): i for i, path in enumerate(args.images)}
    inputs.sort(key=lambda item: order.get(str(item.path), len(order)))  # as given
    by_key = {item.key: item for item in inputs}

    def show(records: list[dict[str, Any]]) -> None:
        for record in records:
            where = _shown(record["path"] + (f":{record['member']}" if record["member"] else ""))
            if record["error"]:
                _say(f"{where}\terror: {_shown(record['error'])}", sys.stdout)
                continue
            scores = " ".join(f"{name}={record[name]:.4f}" for name in _SCORES)
            verdict = "FLAGGED" if record["flagged"] else "ok"
            if record["sampled"]:
                verdict += f" (sampled: {record['frames_checked']} of {record['frames']} frames)"
            line = f"{where}\t{record['level']}\t{scores}\t{verdict}"
            item = by_key.get(record_key(record))
            recorded = _recorded_verdict(item) if item is not None else None
            _say(line + (f"\t{recorded}" if recorded else ""), sys.stdout)

    detector = _load_detector(args, parser)
    summary = scan(
        inputs, detector.scorer, None, quiet=True, on_records=show, **_check_options(args)
    )
    if summary.interrupted:
        _say(f"nsfw-guard: stopped after {summary.scanned} of {summary.total} images")
        return EXIT_INTERRUPTED
    if summary.errors:
        return EXIT_FILE_ERRORS
    return EXIT_FLAGGED if summary.flagged else EXIT_OK


def _recorded_verdict(item: Any) -> str | None:
    """What the verdict in ``item``'s metadata says, for `check` to show beside its own (never
    instead: anyone can write any verdict into a file); ``None`` when it has none."""
    from .sources import read_input
    from .verdict_metadata import read_verdict

    try:
        verdict = read_verdict(read_input(item))
    except (OSError, ValueError) as error:  # VerdictMetadataError: forged or damaged
        return f"recorded: unreadable ({_shown(str(error))})"
    if verdict is None:
        return None
    said = [f"level={verdict['level']}"]
    if not verdict["flagged"]:
        said.append("ok")
    elif verdict["action"] in (None, "none"):
        said.append("FLAGGED not-censored")
    else:
        said.append(f"FLAGGED censored={verdict['action']}")
    said.append(f"at={verdict['check_level']}/{verdict['threshold']:g}")
    if verdict["model"] is not None:
        said.append(f"model={_shown(verdict['model'])}")
    return "recorded: " + " ".join(said)


def _check_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `check` and `scan` share, as `scan()` keywords."""
    return {
        "level": args.level,
        "threshold": args.threshold,
        "batch_size": args.batch_size,
        "max_frames": args.max_frames,
        "should_stop": args.stop.is_set,
    }


def _run_scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .copies import CopyConflict, CopyFolder
    from .records import RecordFileBusy
    from .scan import IMAGE_EXTENSIONS, find_images, scan
    from .sources import is_shard

    _check_frames(args, parser)
    region_params = _region_params(args, parser)
    if region_params and args.action != "regions":
        parser.error("the --region-* options are for --action regions")
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: expected 0 or more")
    ray_engine = args.engine == "ray"
    for name in ("address", "actors"):
        if getattr(args, name) is not None and not ray_engine:
            parser.error(f"--{name} is for --engine ray")
    if args.actors is not None and args.actors < 1:
        parser.error(f"--actors {args.actors}: expected 1 or more")
    if ray_engine and args.censor_to is not None:
        parser.error("--censor-to writes copies on this machine: use it with --engine local")
    if ray_engine and (args.backend != "torch" or args.compile != "auto"):
        parser.error("--backend and --compile are for --engine local (Ray compiles on CUDA)")
    output = args.output
    if output.is_dir():
        parser.error(f"--output {output} is a folder; give a file name such as results.jsonl")
    if not output.parent.is_dir():
        parser.error(f"--output {output}: the folder {output.parent} does not exist")
    if output.suffix.lower() in IMAGE_EXTENSIONS or output.suffix.lower() == ".tar":
        parser.error(
            f"--output {output} is an image or shard name; records go to a .jsonl, .csv or "
            ".parquet file"
        )
    if output.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            parser.error("--output .parquet needs pyarrow: pip install 'nsfw-guard[parquet]'")
    if output.exists() and not output.is_file():
        parser.error(f"--output {output} is not a regular file (a device, a FIFO, ...)")
    try:
        copies = CopyFolder(args.censor_to) if args.censor_to is not None else None
        inputs = find_images(
            args.paths, recursive=args.recursive, copies=copies, image_column=args.image_column
        )
        written = os.path.realpath(output)
        if any(item.realpath == written for item in inputs):
            parser.error(f"--output {output} is one of the inputs; records go to another file")
        shard = next((item for item in inputs if is_shard(item)), None)
        if copies is not None and shard is not None:
            parser.error(
                f"--censor-to copies image files; {_shown(str(shard.path))} is a shard, whose "
                "images are not copied: scan shards without --censor-to"
            )
        if copies is not None:
            if _inside(written, copies.folder):
                parser.error(f"--output {output} is inside the --censor-to folder {copies.folder}")
            copies.check(inputs)
    except CopyConflict as error:
        parser.error(str(error))

    if ray_engine:
        from .ray import RayEngine

        _check_model_options(args, parser)
        state, scorer = None, None
        engine = RayEngine(
            args.model,
            revision=args.revision,
            device=None if args.device == "auto" else args.device,
            dtype=None if args.dtype == "auto" else args.dtype,
            address=args.address,
            actors=args.actors,
        )
    else:
        state, engine = _process_state(args.device), None
        device = state.device if args.device == "auto" else None
        scorer = _load_detector(args, parser, device=device).scorer
    if args.stop.is_set():  # Ctrl-C or SIGTERM while the model loaded
        _say("nsfw-guard: stopped before any image was scanned")
        return EXIT_INTERRUPTED
    try:
        summary = scan(
            inputs,
            scorer,
            output,
            workers=args.workers,
            resume=args.resume,
            censor_to=copies,
            action=args.action,
            censor_params=region_params if args.action == "regions" else None,
            copy_clean=args.copy_clean,
            quiet=args.quiet,
            state=state,
            model=_model_name(args),
            engine=engine,
            **_check_options(args),
        )
    except (RecordFileBusy, CopyConflict) as error:  # another scan came first
        _say(f"nsfw-guard: error: {_shown(str(error))}")
        return EXIT_USAGE
    except OSError as error:  # the records or copies could not be written
        _say(f"nsfw-guard: error: could not write the records: {_shown(str(error))}")
        return EXIT_ERROR
    if state is not None and not state.is_main_process:
        return EXIT_OK
    if summary.interrupted:
        done = summary.skipped + summary.scanned
        _say(
            f"nsfw-guard: stopped after {done} of {summary.total} images, records in "
            f"{_shown(str(output))}; continue with: {_resume_command()}"
        )
        return EXIT_INTERRUPTED
    if not args.quiet:
        for line in [*summary.lines(), f"records: {_shown(str(output))}"]:
            _say(line)
    if args.fail_on and (summary.worst >= args.fail_on or summary.sampled):
        return EXIT_FLAGGED
    return EXIT_FILE_ERRORS if summary.errors else EXIT_OK


def _model_name(args: argparse.Namespace) -> str:
    """What the records name the model by: its folder's real path, or its Hub id and revision."""
    if Path(args.model).exists():  # a folder, or an exported file
        return os.path.realpath(args.model)
    return f"{args.model}@{args.revision}" if args.revision else args.model


def _shown(text: str) -> str:
    """``text`` on one line: control characters (line breaks, tabs) as escapes; bytes that are
    not UTF-8 (lone surrogates) stay, and are written back as the bytes they were."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) == "Cc" or c in "\u2028\u2029"
        else c
        for c in text
    )


def _say(text: str, stream: Any = None) -> None:
    """Write a line to ``stream`` (stderr), file names in their own bytes, whatever the locale."""
    stream = stream or sys.stderr
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        data = (text + "\n").encode(encoding, "surrogateescape")
    except UnicodeEncodeError:  # a character the locale's encoding lacks
        data = (text + "\n").encode(encoding, "backslashreplace")
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a text-only stream (tests capture this way)
        stream.write(data.decode(encoding, "surrogateescape"))
    else:
        buffer.write(data)
        buffer.flush()


def _check_frames(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.max_frames < 0:
        parser.error(f"--max-frames {args.max_frames}: expected 0 (every frame) or more")


def _inside(path: str, folder: Path) -> bool:
    folder_path = os.path.realpath(folder)
    return os.path.commonpath([path, folder_path]) == folder_path


def _resume_command() -> str:
    """The command line that was run, with ``--resume`` (after the command's name, where it
    is an option whatever follows, even ``--``)."""
    import shlex

    command, *rest = sys.argv[1:]
    resume = [] if "--resume" in rest else ["--resume"]
    return shlex.join(["nsfw-guard", command, *resume, *rest])


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Warnings (skipped record lines, ...) as one line each on stderr, each time."""
    import warnings

    def show(message: Any, category: type, filename: str, lineno: int, *rest: Any) -> None:
        _say(f"nsfw-guard: warning: {_shown(str(message))}")

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        # Libraries' notes to their developers (torch, timm, ...), not to a user of the command.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.showwarning = show
        yield


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """While inside, Ctrl-C (SIGINT) and SIGTERM ask the scan to stop after the batch in flight;
    a second Ctrl-C stops at once."""
    import signal

    stop = threading.Event()

    def ask_to_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        _say("nsfw-guard: stopping after the batch in flight (Ctrl-C again to stop now)")

    if threading.current_thread() is not threading.main_thread():  # signals are the main's
        yield stop
        return
    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _process_state(device: str) -> Any:
    """accelerate's view of the processes (one, or several under accelerate launch/torchrun)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


if __name__ == "__main__":
    sys.exit(main())
