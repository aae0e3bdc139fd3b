"""The ``nsfw-guard`` command line.

Examples:
    nsfw-guard check photo.jpg other.png
    nsfw-guard check --level high --threshold 0.7 --model ./nsfw_image_detector photo.jpg
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsfw-guard",
        description="Check images with the 4-level NSFW classifier (neutral, low, medium, high).",
        epilog="Example: nsfw-guard check photo.jpg",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
        help="auto: bfloat16 on CUDA, float32 on CPU (default: auto)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")


def _load_detector(args: argparse.Namespace, parser: argparse.ArgumentParser) -> NSFWDetector:
    import torch  # heavy imports wait until a command needs the model

    from .detector import NSFWDetector

    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: expected a number in [0, 1]")
    try:
        return NSFWDetector.from_pretrained(
            args.model,
            revision=args.revision,
            device=None if args.device == "auto" else args.device,
            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            batch_size=args.batch_size,
            level=args.level,
        )
    except (OSError, ValueError) as error:  # the model could not be loaded: say why, no usage
        print(f"nsfw-guard: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _run_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from PIL import Image, UnidentifiedImageError

    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    detector = _load_detector(args, parser)
    flagged = errors = 0
    for path in args.images:
        try:
            with Image.open(path) as image:
                image.load()
                prediction = detector.predict(image, threshold=args.threshold)[0]
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            errors += 1
            print(f"{path}\terror: {error}")
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


if __name__ == "__main__":
    sys.exit(main())
