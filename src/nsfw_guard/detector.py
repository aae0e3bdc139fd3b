"""``NSFWDetector``: the 4-level classifier, with the API of ``nsfw-image-detector``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from . import DEFAULT_MODEL, censor
from .inputs import is_single_image, iter_image_batches
from .levels import NSFWLevel, check_threshold, levels_from_scores, parse_check_level
from .model import LoadedModel, default_device, load_model
from .onnx_backend import BACKENDS, OnnxScorer
from .scoring import REGION_MAP_MODES, NSFWScorer, region_grid

__all__ = ["NSFWDetector", "Prediction"]


@dataclass(frozen=True)
class Prediction:
    """One image's verdict.

    ``level`` is the highest level whose score reaches the threshold (``NEUTRAL`` if none),
    ``scores`` maps each level to its score (P(neutral), then P(level >= low / medium / high)),
    and ``is_nsfw`` says whether the detector's configured level reached the threshold.
    """

    level: NSFWLevel
    scores: dict[NSFWLevel, float]
    is_nsfw: bool


class NSFWDetector:
    """The 4-level EVA02 NSFW classifier (``Freepik/nsfw_image_detector``) for any image input.

    Accepts PIL images in any mode, numpy arrays and torch tensors on any device (see
    :mod:`nsfw_guard.inputs`); tensors are preprocessed in-graph on the model's device.
    Drop-in compatible with the ``nsfw-image-detector`` package: ``NSFWDetector()``,
    ``predict_proba``, ``is_nsfw`` and ``__call__`` take the same arguments.

    Args:
        model_name: a Hub id or a local checkpoint folder.
        device: ``None`` picks CUDA when available, else CPU.
        dtype: ``None`` picks bf16 where it is fast (CUDA with bf16, CPUs with native bf16
            instructions; the model was trained in bf16) and float32 elsewhere, where bf16 is
            emulated and about 6x slower. Scores are always computed in float32.
        level: the level that :meth:`predict`'s ``is_nsfw`` and :meth:`is_nsfw` check by default.
        background: RGB in [0, 1] that transparent pixels are composited over (default white).
        backend: ``"torch"`` runs a checkpoint; ``"onnxruntime"`` runs a file written by
            ``nsfw-guard export --format onnx`` (``model_name`` is its path) on CPU or CUDA,
            with the same API and the same preprocessing.
        compile: run the classifier through ``torch.compile``, a compilation per batch-size
            bucket, each logged once; ``None`` compiles on CUDA only (see
            :class:`~nsfw_guard.scoring.NSFWScorer`). The torch backend only.
        batch_size: images per forward pass; longer inputs run in micro-batches, and a list's
            images are converted one at a time as their micro-batch runs.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> from nsfw_guard.testing import make_checkpoint
        >>> detector = NSFWDetector(str(make_checkpoint(tempfile.mkdtemp(), level="medium")))
        >>> detector.is_nsfw(Image.new("RGB", (64, 64)))
        True
        >>> detector.predict_proba(Image.new("L", (32, 48)))[0]["high"] < 0.5
        True
    """

    def __init__(
        self,
        model_name: str | os.PathLike = DEFAULT_MODEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        revision: str | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 16,
        level: NSFWLevel | str | int = NSFWLevel.MEDIUM,
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
        backend: str = "torch",
        compile: bool | dict[str, Any] | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer.")
        self.level = parse_check_level(level)
        self.batch_size = batch_size
        if backend == "onnxruntime":
            self._check_onnx_options(dtype, revision, cache_dir, compile)
            self.checkpoint = None
            self.model = None
            self.scorer = OnnxScorer(model_name, device or default_device(), background)
            self.data_config = self.scorer.preprocess.config
            return
        if backend != "torch":
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}.")
        loaded: LoadedModel = load_model(
            model_name,
            revision=revision,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
        )
        self.checkpoint = loaded
        self.model = loaded.model
        self.data_config = loaded.data_config
        self.scorer = NSFWScorer(loaded.model, loaded.data_config, background, compile).to(
            next(loaded.model.parameters()).device
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 16,
        level: NSFWLevel | str | int = NSFWLevel.MEDIUM,
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
        backend: str = "torch",
        compile: bool | dict[str, Any] | None = None,
    ) -> NSFWDetector:
        """Load the detector from a Hub id (optionally at ``revision``) or a local folder.

        Example:
            >>> import tempfile
            >>> from nsfw_guard.testing import make_checkpoint
            >>> folder = make_checkpoint(tempfile.mkdtemp())
            >>> NSFWDetector.from_pretrained(folder, device="cpu", dtype=torch.float32).dtype
            torch.float32
        """
        return cls(
            model,
            device,
            dtype,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            batch_size=batch_size,
            level=level,
            background=background,
            backend=backend,
            compile=compile,
        )

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self.scorer.preprocess.mean.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's weight dtype (float32 for an exported graph)."""
        return torch.float32 if self.model is None else next(self.model.parameters()).dtype

    @staticmethod
    def _check_onnx_options(
        dtype: torch.dtype | None,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        compile: bool | dict[str, Any] | None,
    ) -> None:
        given = {"dtype": dtype, "revision": revision, "cache_dir": cache_dir, "compile": compile}
        for name, value in given.items():
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} applies to the torch backend; backend='onnxruntime' runs an "
                    "exported .onnx file as it was exported."
                )

    @torch.inference_mode()
    def preprocess(self, images: Any, value_range: str = "auto") -> Tensor:
        """The model's input for ``images``: ``[B, 3, S, S]`` in the model's dtype and device.

        Example:
            >>> detector.preprocess([torch.rand(3, 64, 64), torch.rand(3, 20, 90)]).shape
            torch.Size([2, 3, 448, 448])
        """
        pixels = [pixels for pixels, _ in self._batches(images, value_range)]
        return self._cat(pixels, (0, 3, *self.data_config.input_size)).to(self.dtype)

    @torch.inference_mode()
    def scores(self, images: Any, value_range: str = "auto") -> Tensor:
        """``[B, 4]`` float32 scores on the model's device, without a host sync.

        Column 0 is P(neutral), columns 1-3 P(level >= low / medium / high). Images with NaN or
        Inf pixels score (0, 1, 1, 1): they cannot be verified, so they count as the worst case.

        Example:
            >>> detector.scores(torch.rand(2, 3, 64, 64) * 2 - 1, value_range="-1,1").shape
            torch.Size([2, 4])
        """
        scores = [self.scorer.classify(*batch) for batch in self._batches(images, value_range)]
        return self._cat(scores, (0, 4)).float()

    @torch.inference_mode()
    def region_map(
        self,
        images: Any,
        level: NSFWLevel | str | int | None = None,
        value_range: str = "auto",
        map: str = "occlusion",
        cells: int = censor.DEFAULT_REGION_CELLS,
    ) -> list[Tensor]:
        """Per image, ``[H, W]`` float32 on the model's device: where it is NSFW at ``level``
        (the detector's level by default), stretched to the image's size; the worst case (1)
        everywhere on an image that cannot be scored (NaN or Inf pixels).

        ``map="occlusion"`` (the default; what ``action="regions"`` censors by): how much each
        cell of a ``cells x cells`` grid makes the image score, see
        :meth:`NSFWScorer.occlusion_map`. ``map="cam"``: each patch's own score
        (P(level >= it)) from the forward pass that scores the images, upsampled bilinearly,
        see :meth:`NSFWScorer.classify_with_map`. Both in-graph, with no host sync.

        Example:
            >>> maps = detector.region_map([torch.rand(3, 64, 96), torch.rand(3, 32, 32)])
            >>> [tuple(m.shape) for m in maps]
            [(64, 96), (32, 32)]
        """
        level = self.level if level is None else parse_check_level(level)
        censor.check_params("regions", {"map": map, "cells": cells})
        maps: list[Tensor] = []
        for batch in iter_image_batches(images, value_range):
            size = list(batch.pixels.shape[-2:])
            for start in range(0, batch.pixels.shape[0], self.batch_size):
                piece = batch.pixels[start : start + self.batch_size]
                grid = region_grid(self.scorer, piece, level.index, map, cells, batch.value_range)
                maps.extend(TF.resize(grid, size, interpolation=REGION_MAP_MODES[map])[:, 0])
        return maps

    def predict_proba(self, images: Any, value_range: str = "auto") -> list[dict[NSFWLevel, float]]:
        """Per image, a dict from each level to its score (keys also match plain strings).

        Example:
            >>> detector.predict_proba(torch.rand(3, 64, 64))[0]["medium"] > 0.5
            True
        """
        rows = self.scores(images, value_range).tolist()
        return [dict(zip(NSFWLevel, row, strict=True)) for row in rows]

    def is_nsfw(
        self,
        images: Any,
        level: NSFWLevel | str | int | None = None,
        threshold: float = 0.5,
        *,
        threshold_level: NSFWLevel | str | int | None = None,
        value_range: str = "auto",
    ) -> bool | list[bool]:
        """Whether each image's score at ``level`` is ``>= threshold``.

        ``level`` defaults to the detector's level (medium unless configured); ``threshold_level``
        is the ``nsfw-image-detector`` name for it. One image gives a bool, a list or batch a list.

        Example:
            >>> detector.is_nsfw(torch.rand(3, 64, 64), "high", 0.5)
            False
        """
        if level is not None and threshold_level is not None:
            raise TypeError("pass level or threshold_level, not both.")
        name, given = (
            ("level", level) if threshold_level is None else ("threshold_level", threshold_level)
        )
        level = self.level if given is None else parse_check_level(given, name)
        threshold = check_threshold(threshold)
        flags = (self.scores(images, value_range)[:, level.index] >= threshold).tolist()
        return flags[0] if is_single_image(images) else flags

    __call__ = is_nsfw

    def predict(
        self, images: Any, threshold: float = 0.5, *, value_range: str = "auto"
    ) -> list[Prediction]:
        """Per image, its level, its four scores and whether it is NSFW at the detector's level.

        Example:
            >>> [p.level for p in detector.predict([torch.rand(3, 64, 64)])]
            [<NSFWLevel.MEDIUM: 'medium'>]
        """
        threshold = check_threshold(threshold)
        scores = self.scores(images, value_range)
        levels = levels_from_scores(scores, threshold)
        flagged = scores[:, self.level.index] >= threshold
        return [
            Prediction(
                level=NSFWLevel.parse(level),
                scores=dict(zip(NSFWLevel, row, strict=True)),
                is_nsfw=flag,
            )
            for row, level, flag in zip(
                scores.tolist(), levels.tolist(), flagged.tolist(), strict=True
            )
        ]

    def _batches(self, images: Any, value_range: str) -> Iterator[tuple[Tensor, Tensor]]:
        """``(pixels, verifiable)`` for each forward pass of at most ``batch_size`` images.

        Images are converted and preprocessed one at a time, as the passes need them (a batch
        tensor ``batch_size`` images at a time): at most one converted image is held at full
        size, never a whole list.
        """
        pixels: list[Tensor] = []
        verifiable: list[Tensor] = []
        count = 0
        for batch in iter_image_batches(images, value_range):
            for start in range(0, batch.pixels.shape[0], self.batch_size):
                piece = batch.pixels[start : start + self.batch_size]
                prepared, ok = self.scorer.preprocess(piece, batch.value_range)
                pixels.append(prepared)
                verifiable.append(ok)
                count += prepared.shape[0]
                if count >= self.batch_size:  # full: run it before converting the next image
                    yield self._cat(pixels, ()), self._cat(verifiable, ())
                    pixels, verifiable, count = [], [], 0
            del batch, piece  # free the full-size pixels before the next image is converted
        if pixels:
            yield self._cat(pixels, ()), self._cat(verifiable, ())

    def _cat(self, tensors: list[Tensor], empty_shape: tuple[int, ...]) -> Tensor:
        if len(tensors) == 1:
            return tensors[0]  # torch.cat would copy it
        if tensors:
            return torch.cat(tensors)
        return torch.empty(empty_shape, device=self.device)
