"""Scanning files and folders at scale: find, decode in worker processes, check, record, copy.

The data flow is the library's: :mod:`nsfw_guard.decode` reads each file once (regular files
only) and decodes its frames; DataLoader workers preprocess them while the model runs; the
guard's own :class:`~nsfw_guard.check.CheckStep` turns the frames' scores into each image's
verdict (its worst frame) and censors the copies. Records go to a locked
:class:`~nsfw_guard.records.RecordFile`, flushed batch by batch; ``resume`` keeps every record
already there and scans only inputs without one (matched by real path, size and mtime).
``nsfw-guard check`` runs the same code and prints lines instead of writing records. Under
``accelerate launch`` or ``torchrun`` the inputs are split across processes, each writes its own
part file, and the main process merges them in input order.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from . import censor
from .check import CheckStep, levels_and_flags
from .copies import CopyFolder
from .levels import NSFWLevel, check_threshold, parse_check_level
from .prepared import check_prepared, prepare_bytes
from .preprocess import DataConfig, Preprocess
from .records import RECORD_FIELDS, RecordFile, part_path, part_paths, read_records, record_key
from .scoring import NSFWScorer
from .sources import IMAGE_EXTENSIONS, ScanInput, find_images, read_input
from .verdict_metadata import make_verdict

__all__ = [
    "IMAGE_EXTENSIONS",
    "RECORD_FIELDS",
    "ScanEngine",
    "ScanInput",
    "ScanSettings",
    "ScanSummary",
    "find_images",
    "read_records",
    "scan",
]


@dataclass
class ScanSummary:
    """What a scan found, over its inputs: counts per level, flagged (of the images checked),
    errors, throughput."""

    levels: Counter = field(default_factory=Counter)
    flagged: int = 0
    errors: int = 0
    skipped: int = 0
    scanned: int = 0
    total: int = 0
    seconds: float = 0.0
    processes: int = 1
    worst: NSFWLevel = NSFWLevel.NEUTRAL
    sampled: int = 0
    """Animations checked only in part (``max_frames``): their other frames could be anything."""
    interrupted: bool = False

    def add(self, record: dict[str, Any]) -> None:
        if record["error"]:
            self.errors += 1
        if record["level"]:
            level = NSFWLevel.parse(record["level"])
            self.levels[level] += 1
            self.worst = max(self.worst, level)
        self.flagged += bool(record["flagged"] and record["level"])  # checked and flagged
        self.sampled += _sampled(record)  # records before "sampled" say so by their frames

    def lines(self) -> list[str]:
        rate = self.scanned / self.seconds if self.seconds else 0.0
        counts = ", ".join(f"{level.value} {self.levels[level]}" for level in NSFWLevel)
        return [
            f"scanned {self.scanned} image(s) in {self.seconds:.1f} s ({rate:.1f} images/s"
            + (f", {self.processes} processes)" if self.processes > 1 else ")")
            + (f", {self.skipped} already done" if self.skipped else ""),
            f"levels: {counts}",
            f"flagged: {self.flagged}, errors: {self.errors}"
            + (f", sampled animations: {self.sampled}" if self.sampled else ""),
        ]


# Decoding (in DataLoader workers) ----------------------------------------------------------------


class _DecodedImages(Dataset):
    """Reads, decodes and preprocesses one input per item; errors become part of the item."""

    def __init__(
        self,
        inputs: Sequence[ScanInput],
        data_config: DataConfig,
        background: tuple[float, float, float],
        max_frames: int | None,
        keep_data: bool,
    ):
        self.inputs = inputs
        self.data_config = data_config
        self.background = background
        self.max_frames = max_frames
        self.keep_data = keep_data
        self._preprocess: Preprocess | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._preprocess is None:
            self._preprocess = Preprocess(self.data_config, self.background)
        return decode_input(
            self.inputs, index, self._preprocess, self.max_frames, keep_data=self.keep_data
        )


def decode_input(
    inputs: Sequence[ScanInput],
    index: int,
    preprocess: Preprocess,
    max_frames: int | None,
    keep_data: bool = False,
) -> dict[str, Any]:
    """Input ``index`` read, decoded and preprocessed (``image``), with its bytes when
    ``keep_data`` (``data``, for a copy), or the ``error`` that stopped it."""
    source = inputs[index]
    item: dict[str, Any] = {"index": index, "error": source.error}
    if source.error is not None:
        return item
    try:
        data = read_input(source)
        item["image"] = prepare_bytes(data, preprocess, max_frames=max_frames)
        if keep_data:  # the exact bytes checked, for the copies (via shared memory)
            item["data"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    except Exception as error:  # a bad file never stops a scan
        item["error"] = f"{type(error).__name__}: {error}".strip()
    return item


def decoding_workers(
    workers: int,
    batch_size: int,
    input_size: tuple[int, int],
    shared_memory: str | os.PathLike = "/dev/shm",
) -> int:
    """``workers``, or 0 where ``shared_memory`` (through which workers hand over their
    images) has too little room for the batches in flight: a full ``/dev/shm`` (Docker's
    64 MB default) stalls or kills workers. Says so in a warning.

    Example:
        >>> decoding_workers(2, 16, (448, 448), shared_memory="/no/such/folder")
        2
    """
    try:
        stats = os.statvfs(shared_memory)
    except (OSError, AttributeError):  # no such folder (macOS, Windows): nothing to check
        return workers
    if workers == 0:
        return 0
    # DataLoader keeps 2 batches per worker in flight, of float32 RGB images; twice that leaves
    # room for animations' frames and the bytes kept for copies.
    in_flight = 2 * workers * batch_size * 4 * 3 * input_size[0] * input_size[1]
    needed = 2 * in_flight
    free = stats.f_bavail * stats.f_frsize
    if free >= needed:
        return workers
    warnings.warn(
        f"{os.fspath(shared_memory)} has {free // 2**20} MB free, less than the "
        f"{needed // 2**20} MB that {workers} decoding workers need: decoding in the main process "
        "(in Docker, run with --shm-size=1g, or use a smaller --batch-size)",
        stacklevel=2,
    )
    return 0


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _quiet_worker(_: int) -> None:
    """Workers decode in the background: one thread each, at a lower priority, so that the
    model's threads are not preempted; Ctrl-C and SIGTERM are the main process's to handle (it
    stops after the batch in flight, then ends the workers), so workers ignore them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    os.nice(10)


# The scan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanSettings:
    """What every part of a scan decides the same way, wherever it runs."""

    level: NSFWLevel
    threshold: float
    batch_size: int
    workers: int
    max_frames: int | None
    copies: CopyFolder | None
    copy_clean: bool
    model: str | None = None


class ScanEngine(Protocol):
    """Checks inputs somewhere else (see :class:`nsfw_guard.ray.RayEngine`): records each batch
    in ``records_file`` and gives it to ``on_records`` as it comes, stops when ``should_stop``
    says so, and returns the records made."""

    def scan_part(
        self,
        inputs: Sequence[ScanInput],
        records_file: RecordFile | None,
        settings: ScanSettings,
        show_progress: bool,
        should_stop: Callable[[], bool] | None,
        on_records: Callable[[list[dict[str, Any]]], None] | None,
    ) -> list[dict[str, Any]]: ...


def scan(
    inputs: Sequence[ScanInput],
    scorer: NSFWScorer | None,
    output: str | os.PathLike | None,
    *,
    level: NSFWLevel | str = "medium",
    threshold: float = 0.5,
    batch_size: int = 16,
    workers: int = 0,
    resume: bool = False,
    censor_to: str | os.PathLike | CopyFolder | None = None,
    action: censor.Action = "blur",
    censor_params: dict[str, Any] | None = None,
    copy_clean: bool = False,
    max_frames: int = 0,
    quiet: bool = False,
    state: Any = None,
    should_stop: Callable[[], bool] | None = None,
    on_records: Callable[[list[dict[str, Any]]], None] | None = None,
    model: str | None = None,
    engine: ScanEngine | None = None,
) -> ScanSummary:
    """Scan ``inputs`` with ``scorer`` (an :class:`~nsfw_guard.scoring.NSFWScorer` on its device)
    and write one record per input to ``output`` (JSONL, CSV or parquet by extension;
    ``None``: no file). With an ``engine`` instead of a scorer, the engine checks the inputs
    (:class:`nsfw_guard.ray.RayEngine`: on a Ray cluster); records, resume and summary are the
    same, and ``censor_to`` is not supported.

    ``model`` names the checkpoint in the records: on ``resume``, records made by another model
    are scanned again. Every frame of an animation is checked, streamed in chunks; ``max_frames``
    (``0``: all) checks only that many, spread evenly, and the record of a sample says
    ``sampled`` and is flagged: its other frames were never looked at.
    ``should_stop`` is asked
    after each batch: when it says so, the scan stops there, with every record of the batches
    done written. ``on_records`` gets each batch's records as they are made. ``state`` is
    accelerate's ``PartialState`` when several processes share the work; the main process then
    merges their records. Returns the summary over ``inputs``.

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
    if (scorer is None) == (engine is None):
        raise ValueError("scan() takes a scorer or an engine (and not both)")
    if engine is not None and (censor_to is not None or state is not None):
        raise ValueError("scan() with an engine writes no copies and runs in one process")
    step = None
    if scorer is not None:
        step = CheckStep(
            scorer, level=level, threshold=threshold, action=action, censor_params=censor_params
        )
        workers = decoding_workers(workers, batch_size, scorer.preprocess.config.input_size)
    copies = censor_to if isinstance(censor_to, CopyFolder | None) else CopyFolder(censor_to)
    if copies is not None:
        copies.check(inputs)
    settings = ScanSettings(
        parse_check_level(level),
        check_threshold(threshold),
        batch_size,
        workers,
        max_frames or None,
        copies,
        copy_clean,
        model,
    )
    processes = state.num_processes if state is not None else 1
    started = time.perf_counter()

    def scan_part(
        part: Sequence[ScanInput],
        records_file: RecordFile | None,
        show_progress: bool,
        on_records: Callable[[list[dict[str, Any]]], None] | None,
    ) -> list[dict[str, Any]]:
        if engine is not None:
            return engine.scan_part(
                part, records_file, settings, show_progress, should_stop, on_records
            )
        return _scan_part(
            part, step, records_file, settings, show_progress, should_stop, on_records
        )

    if output is None:  # nsfw-guard check: records only go to on_records
        summary = ScanSummary(total=len(inputs))
        records = scan_part(inputs, None, not quiet, on_records)
        for record in records:
            summary.add(record)
        summary.scanned = len(records)
        summary.interrupted = len(records) < len(inputs)
        summary.seconds = time.perf_counter() - started
        return summary

    output = Path(output)
    if processes == 1:
        with RecordFile(output, keep=None) as records_file:  # locked before the records are read
            kept, todo = _plan(_existing_records(output, resume), inputs, settings)
            records_file.start(kept)
            for path in part_paths(output):  # a killed multi-process scan's: merged in ``kept``
                path.unlink()
            made = scan_part(todo, records_file, not quiet, on_records) if todo else []
    else:
        todo, made = _scan_processes(
            output, inputs, resume, step, settings, state, quiet, should_stop
        )

    summary = ScanSummary(skipped=len(inputs) - len(todo), scanned=len(made), processes=processes)
    summary.total, summary.interrupted = len(inputs), len(made) < len(todo)
    summary.seconds = time.perf_counter() - started
    wanted = {item.key for item in inputs}
    for record in read_records(output, warn=False):
        if record_key(record) in wanted:
            summary.add(record)
    return summary


def _existing_records(output: Path, resume: bool) -> list[dict[str, Any]]:
    """When resuming, the records of ``output`` and of any part files a killed multi-process
    scan left (read under the output's lock); else none."""
    if not resume:
        return []
    return [record for path in [output, *part_paths(output)] for record in read_records(path)]


def _plan(
    existing: list[dict[str, Any]],
    inputs: Sequence[ScanInput],
    settings: ScanSettings,
) -> tuple[list[dict[str, Any]], list[ScanInput]]:
    """``(records to keep, inputs to scan)``.

    Every existing record is kept (other scans' too), once, with the current level and
    threshold applied to its scores, except the records of inputs scanned again: a file with no
    record of its current version by this model, one recorded with an error, one that cannot be
    read (it is recorded again), an animation with fewer frames checked than now asked for, or
    one whose copy is missing or not the kind (censored or clean) its verdict now asks for.
    """
    latest = {record_key(record): record for record in existing}
    todo: list[ScanInput] = []
    refreshed: dict[tuple[str, int, float], dict[str, Any]] = {}
    for item in inputs:
        record = latest.get(item.key)
        if (
            record is None
            or item.error is not None
            or record["error"]
            or (settings.model is not None and record.get("model") not in (None, settings.model))
            or _more_frames_wanted(record, settings.max_frames)
        ):
            todo.append(item)  # no verdict of this version, by this model, on enough frames
            continue
        record = _reflagged(record, settings)
        wanted = _wanted_copy(record, settings)
        if (
            wanted is not None
            and settings.copies.kind(settings.copies.folder / item.relative) != wanted
        ):
            todo.append(item)  # its copy is missing, or clean where it must now be censored
            continue
        refreshed[item.key] = record
    rescanned = {item.key for item in todo}
    versions = {item.realpath: (item.bytes, item.mtime) for item in inputs}
    kept, seen = [], set()
    for record in existing:
        key = record_key(record)
        version = versions.get(key[0], key[1:3])
        if key in rescanned or key in seen or key[1:3] != version:  # redone, or out of date
            continue
        if key in refreshed:
            seen.add(key)
        kept.append(refreshed.get(key, record))
    return kept, todo


def _reflagged(record: dict[str, Any], settings: ScanSettings) -> dict[str, Any]:
    """``record`` with its level and flag decided again from its scores, at this scan's level
    and threshold."""
    scores = [record[name] for name in ("neutral", "low", "medium", "high")]
    if any(score is None for score in scores):
        return record
    table = torch.tensor([scores])  # float32, as the check step decides
    complete = torch.tensor([not _sampled(record)])  # a sample is flagged, as check_prepared does
    levels, flags = levels_and_flags(table, complete, settings.level.index, settings.threshold)
    return {**record, "level": NSFWLevel.parse(int(levels[0])).value, "flagged": bool(flags[0])}


def _sampled(record: dict[str, Any]) -> bool:
    """Whether ``record``'s animation had frames left unchecked (records before ``sampled``
    existed say so by their frame counts)."""
    checked, frames = record.get("frames_checked"), record.get("frames")
    return checked is not None and frames is not None and checked < frames


def _more_frames_wanted(record: dict[str, Any], max_frames: int | None) -> bool:
    if not _sampled(record):
        return False
    return max_frames is None or max_frames > record["frames_checked"]


def _wanted_copy(record: dict[str, Any], settings: ScanSettings) -> str | None:
    """The copy ``record``'s file gets: ``"censored"``, ``"clean"`` or ``None``. (A sampled
    animation is flagged, so it is never copied as clean.)"""
    if settings.copies is None or record["error"]:
        return None
    if record["flagged"]:
        return "censored"
    return "clean" if settings.copy_clean else None


def _scan_processes(
    output: Path,
    inputs: Sequence[ScanInput],
    resume: bool,
    step: CheckStep,
    settings: ScanSettings,
    state: Any,
    quiet: bool,
    should_stop: Callable[[], bool] | None,
) -> tuple[list[ScanInput], list[dict[str, Any]]]:
    """Each process scans its share into its own part file, flushed batch by batch, while the
    main process holds the output (with the kept records, old parts merged in); at the end it
    appends the parts' records in input order and removes the parts. Returns ``(inputs to
    scan, records made)``."""
    output_file = RecordFile(output, keep=None) if state.is_main_process else None
    try:
        state.wait_for_everyone()  # the output is locked: every process reads the same records
        kept, todo = _plan(_existing_records(output, resume), inputs, settings)
        state.wait_for_everyone()  # every process has read the output and the old parts
        if output_file is not None:
            output_file.start(kept)
            for path in part_paths(output):
                path.unlink(missing_ok=True)  # their records are in the output now
        state.wait_for_everyone()
        part_file = RecordFile(part_path(output, state.process_index))
        with part_file, state.split_between_processes(todo) as mine:
            progress = not quiet and state.is_main_process
            _scan_part(mine, step, part_file, settings, progress, should_stop, None)
        state.wait_for_everyone()
        made: list[dict[str, Any]] = []
        if output_file is not None:
            parts = [part_path(output, rank) for rank in range(state.num_processes)]
            made = [record for path in parts for record in read_records(path)]
            order = {item.key: i for i, item in enumerate(todo)}
            made.sort(key=lambda record: order.get(record_key(record), len(order)))
            output_file.write(made)
            for path in parts:
                path.unlink(missing_ok=True)
    finally:
        if output_file is not None:
            output_file.close()
    state.wait_for_everyone()
    return todo, made


def _scan_part(
    inputs: Sequence[ScanInput],
    step: CheckStep,
    records_file: RecordFile | None,
    settings: ScanSettings,
    show_progress: bool,
    should_stop: Callable[[], bool] | None,
    on_records: Callable[[list[dict[str, Any]]], None] | None,
) -> list[dict[str, Any]]:
    """Scan ``inputs`` batch by batch; write each batch's copies, then its records."""
    from tqdm.auto import tqdm

    scorer = step.scorer
    background = tuple(scorer.preprocess.background.flatten().tolist())
    dataset = _DecodedImages(
        inputs,
        scorer.preprocess.config,
        background,
        settings.max_frames,
        keep_data=settings.copies is not None,
    )
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=_collate,
        pin_memory=False,  # the batch is pinned once it is put together, in check_items
        worker_init_fn=_quiet_worker,
        persistent_workers=False,
    )
    made: list[dict[str, Any]] = []
    with tqdm(total=len(inputs), unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
        for items in loader:
            records = check_items(items, inputs, step, settings)
            # Copies first: a record says its copy exists, so --resume after a kill redoes both.
            for record, item in zip(records, items, strict=True):
                _write_copy(inputs[item["index"]], record, item, step, settings)
            if records_file is not None:
                records_file.write(records)
            if on_records is not None:
                on_records(records)
            made.extend(records)
            bar.set_postfix(flagged=sum(r["flagged"] for r in made), refresh=False)
            bar.update(len(items))
            if should_stop is not None and should_stop():
                break
    return made


def _write_copy(
    source: ScanInput,
    record: dict[str, Any],
    item: dict[str, Any],
    step: CheckStep,
    settings: ScanSettings,
) -> None:
    """Write the copy ``record`` asks for; a copy that cannot be written makes the record an
    error (so ``--resume`` tries again), never stops the scan."""
    wanted = _wanted_copy(record, settings)
    if wanted is None or item.get("data") is None:
        return
    data = item["data"].numpy().tobytes()
    try:
        if wanted == "censored":
            verdict = _copy_verdict(record, settings, step.action)
            settings.copies.write_censored(source.relative, data, step, verdict)
        else:
            settings.copies.write_bytes(source.relative, data)
    except Exception as error:
        record["error"] = f"copy not written: {type(error).__name__}: {error}"


def _copy_verdict(
    record: dict[str, Any], settings: ScanSettings, action: censor.Action
) -> dict[str, Any]:
    """What a censored copy carries in its metadata: ``record``'s verdict, the model that
    made it and the action that censored the copy."""
    return make_verdict(
        model=record["model"],
        level=record["level"],
        scores={name: record[name] for name in ("neutral", "low", "medium", "high")},
        flagged=record["flagged"],
        check_level=settings.level,
        threshold=settings.threshold,
        action=action,
        frames=record["frames"],
        frames_checked=record["frames_checked"],
    )


def check_items(
    items: list[dict[str, Any]],
    inputs: Sequence[ScanInput],
    step: CheckStep,
    settings: ScanSettings,
) -> list[dict[str, Any]]:
    """Records for a batch of :func:`decode_input` items
    (:func:`~nsfw_guard.prepared.check_prepared`: one host transfer)."""
    decoded = [item for item in items if item["error"] is None]
    verdicts = iter(check_prepared([item["image"] for item in decoded], step, settings.batch_size))
    records = []
    for item in items:
        source = inputs[item["index"]]
        if item["error"] is not None:
            # Not checked: flagged, so that filtering on the flag never keeps it.
            records.append(_record(source, error=item["error"], flagged=True))
            continue
        verdict, image = next(verdicts), item["image"]
        if verdict.error is not None:
            records.append(_record(source, error=verdict.error, flagged=True))
            continue
        records.append(
            _record(
                source,
                **dict(zip(("neutral", "low", "medium", "high"), verdict.scores, strict=True)),
                level=verdict.level.value,
                flagged=verdict.flagged,
                width=image.width,
                height=image.height,
                frames=image.frame_count,
                frames_checked=image.frames_checked,
                sampled=image.sampled,
                model=settings.model,
            )
        )
    return records


def _record(item: ScanInput, **values: Any) -> dict[str, Any]:
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(path=str(item.path), flagged=False, bytes=item.bytes, mtime=item.mtime)
    record.update(realpath=item.realpath, member=item.member and item.member.name, **values)
    return record
