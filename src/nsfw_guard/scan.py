"""Scanning folders of images at scale: find, decode in worker processes, score, record, censor.

Decoding (EXIF orientation, any PIL mode, animated frames) and the in-graph preprocessing run in
DataLoader workers, so they overlap the model on the main process. Records are written and
flushed as each batch finishes; ``resume`` skips inputs that already have one. Under
``accelerate launch`` or ``torchrun`` the inputs are split across processes and the main process
merges their records in input order.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo
from torch.utils.data import DataLoader, Dataset

from . import censor
from .inputs import to_image_batches
from .levels import NSFWLevel
from .preprocess import WHITE, DataConfig, Preprocess, composite_alpha, to_unit_range

__all__ = [
    "IMAGE_EXTENSIONS",
    "RECORD_FIELDS",
    "ScanInput",
    "ScanSummary",
    "check_copy_folder",
    "find_images",
    "read_records",
    "scan",
]

IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".webp",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".avif",
    ]
)
RECORD_FIELDS = (
    "path",
    "level",
    "neutral",
    "low",
    "medium",
    "high",
    "flagged",
    "width",
    "height",
    "frames",
    "error",
    "bytes",
    "mtime",
)
"""One record per input. ``bytes`` and ``mtime`` identify the file version for ``--resume``."""

_TARGET_FRAMES = 16


@dataclass(frozen=True)
class ScanInput:
    """One file to scan: where it is, where its censored copy goes, and its version."""

    path: Path
    relative: Path
    bytes: int
    mtime: float

    @property
    def key(self) -> tuple[str, int, float]:
        return (str(self.path), self.bytes, self.mtime)


@dataclass
class ScanSummary:
    """What a scan found: counts per level, flagged, errors, and its throughput."""

    levels: Counter = field(default_factory=Counter)
    flagged: int = 0
    errors: int = 0
    skipped: int = 0
    scanned: int = 0
    seconds: float = 0.0
    processes: int = 1
    worst: NSFWLevel = NSFWLevel.NEUTRAL

    def add(self, record: dict[str, Any]) -> None:
        if record["error"]:
            self.errors += 1
        if record["level"]:
            level = NSFWLevel.parse(record["level"])
            self.levels[level] += 1
            self.worst = max(self.worst, level)
        self.flagged += bool(record["flagged"])

    def lines(self) -> list[str]:
        rate = self.scanned / self.seconds if self.seconds else 0.0
        counts = ", ".join(f"{level.value} {self.levels[level]}" for level in NSFWLevel)
        return [
            f"scanned {self.scanned} image(s) in {self.seconds:.1f} s ({rate:.1f} images/s"
            + (f", {self.processes} processes)" if self.processes > 1 else ")")
            + (f", {self.skipped} already done" if self.skipped else ""),
            f"levels: {counts}",
            f"flagged: {self.flagged}, errors: {self.errors}",
        ]


def find_images(
    paths: Sequence[str | os.PathLike],
    recursive: bool = True,
    exclude: str | os.PathLike | None = None,
) -> list[ScanInput]:
    """The image files under ``paths`` (by extension; a file given directly is always taken),
    sorted. Directory symlinks are not followed, so link loops cannot trap the walk; the folder
    ``exclude`` (where censored copies go) is not walked into.

    Each input's ``relative`` path, which its censored copy keeps, is relative to its folder
    when one folder is given, else to the folder that holds all the paths, so two inputs never
    share one.

    Example:
        >>> [i.relative.name for i in find_images(["tests/data"])][:2]
        ['astronaut.jpg', 'camera_gray.jpg']
    """
    roots = [Path(p) for p in paths]
    for root in roots:
        if not (root.exists() or root.is_symlink()):
            raise FileNotFoundError(f"no such file or folder: {root}")
    if len(roots) == 1:
        base = os.path.abspath(roots[0] if roots[0].is_dir() else roots[0].parent)
    else:
        base = os.path.commonpath([os.path.abspath(r.parent) for r in roots])
    skip = Path(exclude).resolve() if exclude is not None else None

    def relative(path: Path) -> Path:
        return Path(os.path.relpath(os.path.abspath(path), base))

    found: dict[str, ScanInput] = {}
    for root in roots:
        if not root.is_dir():
            found.setdefault(str(root), _scan_input(root, relative(root)))
            continue
        walk = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
        for folder, folders, names in walk:
            if skip is not None:  # never scan the copies this tool writes
                folders[:] = [d for d in folders if (Path(folder) / d).resolve() != skip]
            for name in names:
                path = Path(folder) / name
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    found.setdefault(str(path), _scan_input(path, relative(path)))
    return [found[key] for key in sorted(found)]


def check_copy_folder(inputs: Sequence[ScanInput], folder: str | os.PathLike) -> None:
    """Raise ValueError if copies written to ``folder`` would replace an input or each other.

    Example:
        >>> check_copy_folder(find_images(["tests/data"]), "copies")  # fine: says nothing
        >>> check_copy_folder(find_images(["tests/data"]), "tests/data")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: --censor-to tests/data would overwrite tests/data/astronaut.jpg: ...
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--censor-to {folder}: a file, not a folder")
    originals = {os.path.realpath(item.path): item.path for item in inputs}
    targets: dict[str, Path] = {}
    for item in inputs:
        target = os.path.realpath(folder / item.relative)
        if target in originals:
            raise ValueError(
                f"--censor-to {folder} would overwrite {originals[target]}: originals are never "
                "touched; choose a folder outside the scanned ones"
            )
        if targets.setdefault(target, item.path) != item.path:
            raise ValueError(
                f"--censor-to {folder}: {targets[target]} and {item.path} would both be "
                f"copied to {folder / item.relative}"
            )


def _scan_input(path: Path, relative: Path) -> ScanInput:
    try:
        stat = path.stat()
        return ScanInput(path, relative, stat.st_size, stat.st_mtime)
    except OSError:  # a broken link or a loop: decoding will say what is wrong
        return ScanInput(path, relative, -1, -1.0)


# Decoding (in DataLoader workers) ----------------------------------------------------------------


class _DecodedImages(Dataset):
    """Decodes and preprocesses one input per item; errors become part of the item."""

    def __init__(
        self,
        inputs: Sequence[ScanInput],
        data_config: DataConfig,
        background: tuple[float, float, float],
        max_frames: int,
    ):
        self.inputs = inputs
        self.data_config = data_config
        self.background = background
        self.max_frames = max_frames
        self._preprocess: Preprocess | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._preprocess is None:
            self._preprocess = Preprocess(self.data_config, self.background)
        item: dict[str, Any] = {"index": index, "pixels": None, "error": None}
        try:
            target = min(self.data_config.input_size)
            frames, (width, height) = _decode(self.inputs[index].path, self.max_frames, target)
            prepared = [self._preprocess(frame.pixels, frame.value_range) for frame in frames]
            item.update(
                pixels=torch.cat([pixels for pixels, _ in prepared]),
                verifiable=torch.cat([verifiable for _, verifiable in prepared]),
                width=width,
                height=height,
                frames=len(frames),
            )
        except Exception as error:  # a bad file never stops a scan
            item["error"] = f"{type(error).__name__}: {error}".strip()
        return item


def _decode(path: Path, max_frames: int, target: int):
    """The frames of an image file as image batches (oriented, any mode) and its size."""
    with warnings.catch_warnings():
        # Pillow warns past its pixel limit and raises at twice it: both are errors here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            count = getattr(image, "n_frames", 1)
            picks = np.linspace(0, count - 1, min(count, max_frames)).round().astype(int)
            frames = []
            for position in sorted(set(picks.tolist())):
                image.seek(position)
                frame = ImageOps.exif_transpose(image)
                size = frame.size
                factor = min(size) // (2 * target)
                if factor >= 2:  # very large: a box reduce keeps >= 2x the model's input size
                    frame = frame.reduce(factor)
                frames.extend(to_image_batches(frame))
    return frames, size


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


# Records -----------------------------------------------------------------------------------------


class _RecordWriter:
    """Appends records to a JSONL or CSV file, flushing after every batch."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        self.csv = path.suffix.lower() == ".csv"
        exists = append and path.is_file() and path.stat().st_size > 0
        self.file = path.open("a" if append else "w", newline="" if self.csv else None)
        if self.csv:
            self.writer = csv.DictWriter(self.file, fieldnames=RECORD_FIELDS)
            if not exists:
                self.writer.writeheader()

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            if self.csv:
                self.writer.writerow(record)
            else:
                self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records in a JSONL or CSV output; a line cut short by a kill is skipped.

    Example:
        >>> read_records("no-such-output.jsonl")
        []
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with path.open(newline="") as file:
        if path.suffix.lower() == ".csv":
            for row in csv.DictReader(file):
                if None in row or any(row.get(k) is None for k in RECORD_FIELDS):
                    continue  # a row cut short
                records.append(_typed(row))
        else:
            for line in file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and set(RECORD_FIELDS) <= set(record):
                    records.append(record)
    return records


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row with the types a JSONL record has."""

    def number(value: str, kind: type) -> Any:
        return kind(value) if value not in ("", "None") else None

    return {
        "path": row["path"],
        "level": row["level"] or None,
        **{k: number(row[k], float) for k in ("neutral", "low", "medium", "high")},
        "flagged": row["flagged"] == "True",
        **{k: number(row[k], int) for k in ("width", "height", "frames", "bytes")},
        "error": row["error"] or None,
        "mtime": float(row["mtime"]),
    }


def _record(item: ScanInput, **values: Any) -> dict[str, Any]:
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(path=str(item.path), flagged=False, bytes=item.bytes, mtime=item.mtime)
    record.update(values)
    return record


def _record_key(record: dict[str, Any]) -> tuple[str, int, float]:
    return (record["path"], int(record["bytes"]), float(record["mtime"]))


# Censored copies ---------------------------------------------------------------------------------


def _write_copy(item: ScanInput, record: dict[str, Any], folder: Path, action: censor.Action):
    """Write a censored (flagged) or plain (clean) copy under ``folder``, atomically."""
    destination = folder / item.relative
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.nsfw-guard.tmp")
    try:
        if not record["flagged"]:
            shutil.copy2(item.path, temporary)
        else:
            _save_censored(item.path, temporary, action, json.dumps(record))
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def _save_censored(source: Path, target: Path, action: censor.Action, verdict: str) -> None:
    with Image.open(source) as image:
        fmt = image.format if image.format in Image.SAVE else "PNG"
        frames = []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frame = ImageOps.exif_transpose(image)
            # What the detector saw: alpha composited over white, then censored.
            batch = to_image_batches(frame)[0]
            unit = composite_alpha(to_unit_range(batch.pixels, batch.value_range), WHITE)
            unit = unit.expand(-1, 3, -1, -1)  # gray → RGB (a no-op for RGB)
            censored = censor.apply(unit, torch.ones(1, dtype=torch.bool), action)
            array = (censored[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
            frames.append(Image.fromarray(array.numpy()))
        options: dict[str, Any] = {"format": "JPEG" if fmt == "MPO" else fmt}
        if fmt == "PNG":
            options["pnginfo"] = PngInfo()
            options["pnginfo"].add_text("nsfw-guard", verdict)
        elif fmt == "GIF":
            options["comment"] = verdict.encode()
        else:
            exif = Image.Exif()
            exif[0x010E] = verdict  # ImageDescription
            options["exif"] = exif
        if fmt in ("JPEG", "MPO", "WEBP"):
            options["quality"] = 95
        if len(frames) > 1 and fmt in ("GIF", "PNG", "WEBP", "TIFF"):
            options.update(save_all=True, append_images=frames[1:], loop=0)
            options["duration"] = image.info.get("duration", 100)
        frames[0].save(target, **options)


# The scan ----------------------------------------------------------------------------------------


@dataclass
class _Settings:
    level: NSFWLevel
    threshold: float
    batch_size: int
    workers: int
    max_frames: int
    censor_to: Path | None
    action: censor.Action
    copy_clean: bool


def scan(
    inputs: Sequence[ScanInput],
    scorer: Any,
    output: Path,
    *,
    level: NSFWLevel | str = "medium",
    threshold: float = 0.5,
    batch_size: int = 16,
    workers: int = 0,
    resume: bool = False,
    censor_to: str | os.PathLike | None = None,
    action: censor.Action = "blur",
    copy_clean: bool = False,
    max_frames: int = _TARGET_FRAMES,
    quiet: bool = False,
    state: Any = None,
) -> ScanSummary:
    """Scan ``inputs`` with ``scorer`` (an :class:`~nsfw_guard.scoring.NSFWScorer` on its device)
    and write one record per input to ``output`` (JSONL, or CSV by extension).

    ``state`` is accelerate's ``PartialState`` when several processes share the work; the main
    process then merges their records. Returns the summary of all records in ``output``.

    Example:
        >>> import tempfile
        >>> from nsfw_guard import NSFWDetector
        >>> from nsfw_guard.testing import make_checkpoint
        >>> folder = make_checkpoint(tempfile.mkdtemp(), level="high")
        >>> detector = NSFWDetector.from_pretrained(folder, device="cpu")
        >>> output = Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> summary = scan(find_images(["tests/data"]), detector.scorer, output, quiet=True)
        >>> summary.flagged == summary.scanned == len(read_records(output)) == 7
        True
    """
    settings = _Settings(
        level=NSFWLevel.parse(level),
        threshold=threshold,
        batch_size=batch_size,
        workers=workers,
        max_frames=max_frames,
        censor_to=Path(censor_to) if censor_to is not None else None,
        action=action,
        copy_clean=copy_clean,
    )
    if settings.censor_to is not None:
        check_copy_folder(inputs, settings.censor_to)
    output = Path(output)
    existing = read_records(output) if resume else []
    wanted = {item.key for item in inputs}
    kept = [r for r in existing if _record_key(r) in wanted]
    done = {_record_key(r) for r in kept}
    todo = [item for item in inputs if item.key not in done]

    processes = state.num_processes if state is not None else 1
    started = time.perf_counter()
    if processes == 1:
        if resume:  # drop stale records and any line cut short by a kill
            _rewrite(output, kept)
        writer = _RecordWriter(output, append=resume)
        try:
            _scan_part(todo, scorer, writer, settings, show_progress=not quiet)
        finally:
            writer.close()
    else:
        part = _part_path(output, state.process_index)
        with state.split_between_processes(todo) as mine:
            writer = _RecordWriter(part, append=False)
            try:
                progress = not quiet and state.is_main_process
                _scan_part(mine, scorer, writer, settings, show_progress=progress)
            finally:
                writer.close()
        state.wait_for_everyone()
        if state.is_main_process:
            parts = [_part_path(output, rank) for rank in range(processes)]
            merged = kept + [r for p in parts for r in read_records(p)]
            order = {item.key: i for i, item in enumerate(inputs)}
            _rewrite(output, sorted(merged, key=lambda r: order[_record_key(r)]))
            for p in parts:
                p.unlink(missing_ok=True)
        state.wait_for_everyone()

    summary = ScanSummary(skipped=len(kept), scanned=len(todo), processes=processes)
    summary.seconds = time.perf_counter() - started
    for record in read_records(output):
        summary.add(record)
    return summary


def _part_path(output: Path, rank: int) -> Path:
    """Where process ``rank`` writes its records (same format as ``output``)."""
    return output.with_name(f"{output.stem}.part{rank}{output.suffix}")


def _rewrite(output: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``output`` with ``records`` atomically."""
    temporary = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
    writer = _RecordWriter(temporary, append=False)
    writer.write(records)
    writer.close()
    os.replace(temporary, output)


def _scan_part(
    inputs: Sequence[ScanInput],
    scorer: Any,
    writer: _RecordWriter,
    settings: _Settings,
    show_progress: bool,
) -> None:
    from tqdm.auto import tqdm

    device = next(scorer.parameters()).device
    background = tuple(scorer.preprocess.background.flatten().tolist())
    dataset = _DecodedImages(inputs, scorer.preprocess.config, background, settings.max_frames)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=_collate,
        pin_memory=False,  # the batch is pinned once it is put together, in _score_batch
        worker_init_fn=_one_thread,
        persistent_workers=False,
    )
    flagged = 0
    with tqdm(total=len(inputs), unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
        for items in loader:
            records = _score_batch(items, inputs, scorer, device, settings)
            # Copies first: a record says its copy exists, so --resume after a kill redoes both.
            for record, item in zip(records, items, strict=True):
                if (
                    settings.censor_to is not None
                    and not record["error"]
                    and (record["flagged"] or settings.copy_clean)
                ):
                    _write_copy(inputs[item["index"]], record, settings.censor_to, settings.action)
            writer.write(records)
            flagged += sum(r["flagged"] for r in records)
            bar.set_postfix(flagged=flagged, refresh=False)
            bar.update(len(items))


def _concat(tensors: list[torch.Tensor], pinned: bool) -> torch.Tensor:
    """``torch.cat``, into page-locked memory when ``pinned`` so the copy to the GPU is async."""
    if not pinned:
        return torch.cat(tensors)
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    return torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True))


def _one_thread(_: int) -> None:
    """Workers decode in the background: one thread each, at a lower priority, so that the
    model's threads on the main process are not preempted (they wait for each other)."""
    torch.set_num_threads(1)
    os.nice(10)


def _score_batch(
    items: list[dict[str, Any]],
    inputs: Sequence[ScanInput],
    scorer: Any,
    device: torch.device,
    settings: _Settings,
) -> list[dict[str, Any]]:
    decoded = [item for item in items if item["error"] is None]
    rows: list[list[float]] = []
    if decoded:
        pixels = _concat([item["pixels"] for item in decoded], pinned=device.type == "cuda")
        verifiable = torch.cat([item["verifiable"] for item in decoded])
        scores = []
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], settings.batch_size):
                chunk = slice(start, start + settings.batch_size)
                frames = pixels[chunk].to(device, non_blocking=True)
                valid = verifiable[chunk].to(device, non_blocking=True)
                scores.append(scorer.classify(frames, valid))
        frame_scores = torch.cat(scores)
        # An animated image is as bad as its worst frame, level by level.
        per_image = []
        for frames in torch.split(frame_scores, [item["frames"] for item in decoded]):
            worst = frames.amax(dim=0)
            worst[0] = frames[:, 0].amin()
            per_image.append(worst)
        rows = torch.stack(per_image).tolist()  # the one host transfer of the batch

    records, row_iter = [], iter(rows)
    for item in items:
        source = inputs[item["index"]]
        if item["error"] is not None:
            records.append(_record(source, error=item["error"]))
            continue
        row = next(row_iter)
        level_index = sum(score >= settings.threshold for score in row[1:])
        record = _record(
            source,
            level=NSFWLevel.parse(level_index).value,
            flagged=row[settings.level.index] >= settings.threshold,
            width=item["width"],
            height=item["height"],
            frames=item["frames"],
        )
        record.update(zip(("neutral", "low", "medium", "high"), row, strict=True))
        records.append(record)
    return records
