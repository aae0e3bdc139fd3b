"""Filter image datasets on Ray Data (``pip install "nsfw-guard[ray]"``).

- :class:`NSFWClassifier` is a callable class for ``ray.data.Dataset.map_batches``: it adds the
  verdict columns to the batches of any Ray dataset (``read_images``, ``read_webdataset``,
  ``read_parquet``, ...).
- :class:`RayEngine` runs ``nsfw-guard scan --engine ray``: the scan's inputs (files, tar and
  parquet shards) are checked by actors on a Ray cluster, while this process writes the same
  records as the local engine, batch by batch, so ``--resume`` works the same.

Both run the same decode (:mod:`nsfw_guard.decode`) and the same in-graph check step as
``scan`` and the diffusers guard, so a verdict on Ray is the verdict anywhere else. Ray is
imported only where a cluster is used: the classifier only needs the batches Ray hands it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import DEFAULT_MODEL
from .check import CheckStep
from .detector import NSFWDetector
from .levels import WORST_SCORES, NSFWLevel
from .prepared import Prepared, Verdict, check_prepared, prepare_array, prepare_bytes
from .sources import BYTES_COLUMNS, ScanInput

if TYPE_CHECKING:
    from .records import RecordFile
    from .scan import ScanSettings

__all__ = ["BYTES_COLUMNS", "OUTPUT_COLUMNS", "NSFWClassifier", "RayEngine"]
OUTPUT_COLUMNS = (
    "nsfw_neutral",
    "nsfw_low",
    "nsfw_medium",
    "nsfw_high",
    "nsfw_level",
    "nsfw_flagged",
    "nsfw_sampled",
    "nsfw_error",
)


class NSFWClassifier:
    """Adds NSFW verdicts to Ray Data batches; one instance per actor loads the model once.

    ``image_column`` names the images: decoded arrays (``ray.data.read_images``' ``image``) or
    encoded bytes (webdataset's ``jpg``/``png``/``webp``, a parquet binary column, or a
    Hugging Face image struct ``{"bytes": ...}``); by default ``image``, else the first of
    :data:`BYTES_COLUMNS` in the batch. Every input column is kept; the batch gains
    ``nsfw_neutral``, ``nsfw_low``, ``nsfw_medium``, ``nsfw_high`` (float32), ``nsfw_level``
    (str), ``nsfw_flagged`` (bool, at ``level``/``threshold``), ``nsfw_sampled`` (bool) and
    ``nsfw_error`` (str or None). A row that cannot be decoded never fails the job: it gets
    ``nsfw_error``, the worst-case scores and ``nsfw_flagged=True``. Animations are as bad as
    their worst frame; every frame is checked, a chunk at a time, unless ``max_frames`` asks
    for an even sample: a sampled animation is flagged (``nsfw_sampled``), since its other
    frames were never looked at.

    Example:
        >>> import ray  # doctest: +SKIP
        >>> checked = ray.data.read_images("photos/", include_paths=True).map_batches(
        ...     NSFWClassifier,
        ...     fn_constructor_kwargs={"level": "medium", "device": "cuda"},
        ...     batch_size=32, num_gpus=1, concurrency=2,
        ... )  # doctest: +SKIP
        >>> clean = checked.filter(lambda row: not row["nsfw_flagged"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        level: NSFWLevel | str | int = "medium",
        threshold: float = 0.5,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        image_column: str | None = None,
        revision: str | None = None,
        max_frames: int | None = None,
        batch_size: int = 16,
    ):
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        detector = NSFWDetector.from_pretrained(
            model, device=device, dtype=dtype, revision=revision
        )
        self.step = CheckStep(detector.scorer, level=level, threshold=threshold, action="none")
        self.image_column = image_column
        self.max_frames = max_frames
        self.batch_size = batch_size

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        column = self._image_column(batch)
        values = batch[column]
        prepared: list[Prepared | None] = []
        errors: list[str | None] = []
        for value in values:
            try:
                prepared.append(self._prepare(value))
                errors.append(None)
            except Exception as error:  # a bad row never fails the job
                prepared.append(None)
                errors.append(f"{type(error).__name__}: {error}".strip())
        checked = iter(
            check_prepared([p for p in prepared if p is not None], self.step, self.batch_size)
        )
        unchecked = functools.partial(Verdict, WORST_SCORES, NSFWLevel.HIGH, True)
        verdicts = [  # a row that could not be decoded: the worst case, flagged
            next(checked) if image is not None else unchecked(error)
            for image, error in zip(prepared, errors, strict=True)
        ]
        table = np.asarray([v.scores for v in verdicts], dtype=np.float32).reshape(-1, 4)
        out = dict(batch)
        for index, name in enumerate(OUTPUT_COLUMNS[:4]):
            out[name] = table[:, index]
        out["nsfw_level"] = np.asarray([v.level.value for v in verdicts], dtype=object)
        out["nsfw_flagged"] = np.asarray([v.flagged for v in verdicts], dtype=bool)
        out["nsfw_sampled"] = np.asarray([p is not None and p.sampled for p in prepared], bool)
        out["nsfw_error"] = np.asarray([v.error for v in verdicts], dtype=object)
        return out

    def _image_column(self, batch: Mapping[str, Any]) -> str:
        if self.image_column is not None:
            if self.image_column not in batch:
                raise KeyError(
                    f"NSFWClassifier: no column {self.image_column!r} in the batch; it has "
                    f"{', '.join(map(repr, batch))}"
                )
            return self.image_column
        for name in ("image", *BYTES_COLUMNS):
            if name in batch:
                return name
        raise KeyError(
            f"NSFWClassifier: no image column in the batch ({', '.join(map(repr, batch))}); "
            "name it with image_column=..."
        )

    def _prepare(self, value: Any) -> Prepared:
        preprocess = self.step.scorer.preprocess
        if isinstance(value, Mapping) and "bytes" in value:  # a Hugging Face image struct
            value = value["bytes"]
        if isinstance(value, bytes | bytearray | memoryview):
            return prepare_bytes(bytes(value), preprocess, max_frames=self.max_frames)
        if isinstance(value, np.ndarray) and value.dtype != object:
            return prepare_array(value, preprocess)
        what = "nothing" if value is None else f"a {type(value).__name__}"
        raise TypeError(f"{what} where an image (bytes or an array) was expected")


# nsfw-guard scan --engine ray ---------------------------------------------------------------------


@dataclass(frozen=True)
class RayEngine:
    """Checks a scan's inputs on a Ray cluster (:func:`nsfw_guard.scan.scan`'s ``engine``).

    ``address``: ``None`` starts a local cluster for the run (stopped at its end); ``"auto"``
    or ``"ray://host:10001"`` joins a running one. The inputs travel as their paths (and
    places in their shards): every node reads them itself, so they must be at the same paths
    on every node (a shared file system). ``actors`` actors each load the model once: by
    default one per GPU of the cluster, or one on CPUs. ``device`` ``None`` puts them on GPUs
    where the cluster has some; ``"cpu"`` or ``"cuda"`` decides. Progress is Ray Data's.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.scan import find_images, scan
        >>> from nsfw_guard.testing import make_checkpoint
        >>> engine = RayEngine(make_checkpoint(tempfile.mkdtemp()), device="cpu")
        >>> output = Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> inputs = find_images(["tests/data"])
        >>> summary = scan(inputs, None, output, engine=engine)  # doctest: +SKIP
    """

    model: str | os.PathLike = DEFAULT_MODEL
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    address: str | None = None
    actors: int | None = None

    def scan_part(
        self,
        inputs: Sequence[ScanInput],
        records_file: RecordFile | None,
        settings: ScanSettings,
        show_progress: bool,
        should_stop: Callable[[], bool] | None,
        on_records: Callable[[list[dict[str, Any]]], None] | None,
    ) -> list[dict[str, Any]]:
        """Check ``inputs`` on the cluster; record each batch as it comes back (in any order)."""
        import ray

        with _cluster(self.address):
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = show_progress
            if not show_progress:  # Ray Data's progress goes to its log too
                logging.getLogger("ray.data").setLevel(logging.WARNING)
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0))
            on_gpu = (self.device is None and gpus > 0) or str(self.device or "").startswith("cuda")
            actors = self.actors or (max(1, gpus) if on_gpu else 1)
            cpus = max(1, int(resources.get("CPU", 1)) // actors)  # each actor's share, as threads
            rows = [
                # Absolute paths: an actor's working folder is not this one.
                {"index": index, "input": pickle.dumps(replace(item, path=_absolute(item.path)))}
                for index, item in enumerate(inputs)
            ]
            checked = ray.data.from_items(rows).map_batches(
                _ScanActor,
                fn_constructor_kwargs={
                    "model": os.fspath(self.model),
                    "revision": self.revision,
                    "device": self.device or ("cuda" if on_gpu else "cpu"),
                    "dtype": self.dtype,
                    "settings": replace(settings, copies=None),
                    "threads": 0 if on_gpu else cpus,
                },
                batch_size=settings.batch_size,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=1 if on_gpu else 0,
                # Logical CPUs: less than a whole one, so that Ray Data's own tasks always find room
                # (actors holding every CPU starve them); the threads are set from ``cpus``.
                num_cpus=0 if on_gpu else 0.5,
            )
            made: list[dict[str, Any]] = []
            # No prefetch: after a stop's early break, Ray Data's prefetch thread may still call
            # into Ray, and a call after ``ray.shutdown`` kills this process (exit 1, no summary).
            # Records are small and the actors work ahead anyway. Closed here, not when
            # collected, so that Ray Data's executor stops before the cluster does.
            batches = iter(
                checked.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
            )
            with contextlib.closing(batches):
                for batch in batches:
                    records = []
                    for index, data in zip(batch["index"], batch["record"], strict=True):
                        record = pickle.loads(data)
                        record["path"] = str(inputs[int(index)].path)  # as the user gave it
                        records.append(record)
                    if records_file is not None:
                        records_file.write(records)
                    if on_records is not None:
                        on_records(records)
                    made.extend(records)
                    if should_stop is not None and should_stop():
                        break
            return made


@contextlib.contextmanager
def _cluster(address: str | None) -> Iterator[None]:
    """The Ray cluster this process uses: the one it is connected to already, else ``address``
    (``None``: a local one, started here and stopped at the end)."""
    import ray

    if ray.is_initialized():
        yield
        return
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(
        address=address or "local",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="WARNING",
    )
    if on_sigterm is not None:  # Ray's core worker takes SIGTERM over (it dies on it): give it back
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        _join_ray_data_threads()
        ray.shutdown()


_RAY_DATA_THREADS = ("StreamingExecutor-", "ray-data-metadata-prefetch")
"""Ray Data's own threads in the driver: its scheduling loop and its metadata fetcher."""


def _join_ray_data_threads(timeout: float = 60.0) -> None:
    """Wait for Ray Data's threads to end. Its executor waits 2 s for them when it shuts down,
    which a loaded machine can outlast; a call into Ray after ``ray.shutdown`` ends this process
    with exit 1 (Ray's core worker), so the cluster is shut down only once they are gone."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name.startswith(_RAY_DATA_THREADS) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


class _ScanActor:
    """One Ray actor of :class:`RayEngine`: loads the model once, then turns batches of pickled
    :class:`~nsfw_guard.sources.ScanInput` into pickled records (``scan``'s own)."""

    def __init__(
        self,
        model: str,
        revision: str | None,
        device: str,
        dtype: str | None,
        settings: ScanSettings,
        threads: int,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.step = NSFWClassifier(  # the classifier's model and check step, loaded once
            model,
            level=settings.level,
            threshold=settings.threshold,
            device=device,
            dtype=dtype,
            revision=revision,
        ).step
        self.settings = settings

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        from .scan import check_items, decode_input

        inputs = [pickle.loads(data) for data in batch["input"]]
        preprocess = self.step.scorer.preprocess
        items = [
            decode_input(inputs, i, preprocess, self.settings.max_frames)
            for i in range(len(inputs))
        ]
        records = check_items(items, inputs, self.step, self.settings)
        return {
            "index": np.asarray(batch["index"]),
            "record": np.asarray([pickle.dumps(record) for record in records], dtype=object),
        }
