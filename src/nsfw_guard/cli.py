"""The ``nsfw-guard`` command line.

Examples:
    nsfw-guard scan photos/ --output results.jsonl
    nsfw-guard scan uploads/ --censor-to censored/ --action blur --fail-on high
    nsfw-guard check photo.jpg other.png
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import DEFAULT_MODEL, __version__

if TYPE_CHECKING:
    from .detector import NSFWDetector

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_FILE_ERRORS = 0, 1, 2, 3

_LEVELS = ("low", "medium", "high")
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
    return args.run(args, args.command_parser)


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
        "path, level, the four scores, flagged, width, height, error. Bad files get an error "
        "record and never stop the scan. Exit code: 0 done, 1 an image at or above --fail-on, "
        "2 usage error, 3 done with file errors. Several processes: "
        "accelerate launch --multi_gpu --num_processes N -m nsfw_guard scan ..., or torchrun.",
        epilog="Examples:\n"
        "  nsfw-guard scan photos/ --output results.jsonl\n"
        "  nsfw-guard scan a.png b/ --output results.csv --level high --threshold 0.7\n"
        "  nsfw-guard scan uploads/ --resume                  # continue an interrupted scan\n"
        "  nsfw-guard scan uploads/ --censor-to censored/ --action pixelate\n"
        "  nsfw-guard scan dataset/ --fail-on medium --quiet  # a CI gate",
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
        help="records: JSON lines, or CSV for a .csv name (default: results.jsonl)",
    )
    scan.add_argument(
        "--resume", action="store_true", help="skip inputs already in --output, then append"
    )
    scan.add_argument("--censor-to", type=Path, metavar="DIR", help="write censored copies here")
    scan.add_argument(
        "--action",
        default="blur",
        choices=("blur", "pixelate", "blank"),
        help="how --censor-to censors flagged images (default: blur)",
    )
    scan.add_argument(
        "--copy-clean", action="store_true", help="with --censor-to, also copy clean images"
    )
    scan.add_argument(
        "--fail-on", choices=_LEVELS, metavar="LEVEL", help="exit 1 if any image reaches LEVEL"
    )
    scan.add_argument("--max-frames", type=int, default=16, help="frames checked per animation")
    scan.add_argument("--quiet", action="store_true", help="no progress bar and summary")
    scan.set_defaults(run=_run_scan, command_parser=scan)

    check = commands.add_parser(
        "check",
        help="print each image's level and scores",
        description="Print one line per image: its level, its four scores and whether it is "
        "flagged at --level. Exit code 1 if any image is flagged, 3 if a file could not be read.",
        epilog="Examples:\n  nsfw-guard check photo.jpg\n"
        "  nsfw-guard check --level high --threshold 0.7 *.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    _add_model_options(check)
    check.set_defaults(run=_run_check, command_parser=check)
    return parser


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
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
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


def _load_detector(
    args: argparse.Namespace, parser: argparse.ArgumentParser, device: Any = None
) -> NSFWDetector:
    import torch  # heavy imports wait until a command needs the model

    from .detector import NSFWDetector

    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: expected a number in [0, 1]")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected a positive integer")
    try:
        return NSFWDetector.from_pretrained(
            args.model,
            revision=args.revision,
            device=device or (None if args.device == "auto" else args.device),
            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            batch_size=args.batch_size,
            level=args.level,
        )
    except (OSError, ValueError) as error:  # the model could not be loaded: say why, no usage
        print(f"nsfw-guard: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _run_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import warnings

    from PIL import Image, ImageOps

    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    detector = _load_detector(args, parser)
    flagged = errors = 0
    for path in args.images:
        try:
            with warnings.catch_warnings():  # past Pillow's pixel limit is an error, as in scan
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:  # the first frame, shown the right way up
                    upright = ImageOps.exif_transpose(image)
                    prediction = detector.predict(upright, threshold=args.threshold)[0]
        except Exception as error:  # one bad file never stops the others
            errors += 1
            print(f"{path}\terror: {type(error).__name__}: {error}")
            continue
        flagged += prediction.is_nsfw
        scores = " ".join(
            f"{level.value}={score:.4f}" for level, score in prediction.scores.items()
        )
        verdict = "FLAGGED" if prediction.is_nsfw else "ok"
        print(f"{path}\t{prediction.level.value}\t{scores}\t{verdict}")
    if errors:
        return EXIT_FILE_ERRORS
    return EXIT_FLAGGED if flagged else EXIT_OK


def _run_scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .scan import check_copy_folder, find_images, scan

    if args.workers < 0 or args.max_frames < 1:
        parser.error("--workers must be >= 0 and --max-frames >= 1")
    if args.output.is_dir():
        parser.error(f"--output {args.output} is a folder; give a file name such as results.jsonl")
    if not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: the folder {args.output.parent} does not exist")
    try:
        inputs = find_images(args.paths, recursive=args.recursive, exclude=args.censor_to)
        if args.censor_to is not None:
            check_copy_folder(inputs, args.censor_to)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))

    state = _process_state(args.device)
    detector = _load_detector(args, parser, device=state.device if args.device == "auto" else None)
    summary = scan(
        inputs,
        detector.scorer,
        args.output,
        level=args.level,
        threshold=args.threshold,
        batch_size=args.batch_size,
        workers=args.workers,
        resume=args.resume,
        censor_to=args.censor_to,
        action=args.action,
        copy_clean=args.copy_clean,
        max_frames=args.max_frames,
        quiet=args.quiet,
        state=state,
    )
    if not state.is_main_process:
        return EXIT_OK
    if not args.quiet:
        for line in [*summary.lines(), f"records: {args.output}"]:
            print(line, file=sys.stderr)
    if args.fail_on and summary.worst >= args.fail_on:
        return EXIT_FLAGGED
    return EXIT_FILE_ERRORS if summary.errors else EXIT_OK


def _process_state(device: str) -> Any:
    """accelerate's view of the processes (one, or several under accelerate launch/torchrun)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


if __name__ == "__main__":
    sys.exit(main())
