"""Filter image datasets on Ray Data: :class:`NSFWClassifier` is a callable class for
``ray.data.Dataset.map_batches`` (``pip install "nsfw-guard[ray]"``).

It runs the same decode (:mod:`nsfw_guard.decode`) and the same in-graph check step as ``scan``
and the diffusers guard, so a verdict on Ray is the verdict anywhere else. Ray itself is not
imported here: the class only needs the batches Ray hands it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import DEFAULT_MODEL
from .check import CheckStep
from .detector import NSFWDetector
from .levels import NSFWLevel
from .prepared import Prepared, check_prepared, prepare_array, prepare_bytes

__all__ = ["BYTES_COLUMNS", "OUTPUT_COLUMNS", "NSFWClassifier"]

BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif")
"""Columns taken as encoded images when no ``image_column`` is given (webdataset's extensions)."""
OUTPUT_COLUMNS = (
    "nsfw_neutral",
    "nsfw_low",
    "nsfw_medium",
    "nsfw_high",
    "nsfw_level",
    "nsfw_flagged",
    "nsfw_error",
)
_WORST = (0.0, 1.0, 1.0, 1.0)


class NSFWClassifier:
    """Adds NSFW verdicts to Ray Data batches; one instance per actor loads the model once.

    ``image_column`` names the images: decoded arrays (``ray.data.read_images``' ``image``) or
    encoded bytes (webdataset's ``jpg``/``png``/``webp``, a parquet binary column, or a
    Hugging Face image struct ``{"bytes": ...}``); by default ``image``, else the first of
    :data:`BYTES_COLUMNS` in the batch. Every input column is kept; the batch gains
    ``nsfw_neutral``, ``nsfw_low``, ``nsfw_medium``, ``nsfw_high`` (float32), ``nsfw_level``
    (str), ``nsfw_flagged`` (bool, at ``level``/``threshold``) and ``nsfw_error`` (str or
    None). A row that cannot be decoded never fails the job: it gets ``nsfw_error``, the
    worst-case scores and ``nsfw_flagged=True``. Animations are checked on ``max_frames``
    frames spread evenly (``None``: all) and are as bad as their worst.

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
        max_frames: int | None = 16,
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
        verdicts = iter(
            check_prepared([p for p in prepared if p is not None], self.step, self.batch_size)
        )
        scores, levels, flags = [], [], []
        for image in prepared:
            if image is None:
                scores.append(_WORST)
                levels.append(NSFWLevel.HIGH.value)
                flags.append(True)
                continue
            verdict = next(verdicts)
            scores.append(verdict.scores)
            levels.append(verdict.level.value)
            flags.append(verdict.flagged)
        table = np.asarray(scores, dtype=np.float32).reshape(-1, 4)
        out = dict(batch)
        for index, name in enumerate(OUTPUT_COLUMNS[:4]):
            out[name] = table[:, index]
        out["nsfw_level"] = np.asarray(levels, dtype=object)
        out["nsfw_flagged"] = np.asarray(flags, dtype=bool)
        out["nsfw_error"] = np.asarray(errors, dtype=object)
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
