"""Images prepared for the model, and their verdicts: the decode → preprocess → check path that
``scan``, ``check`` and the Ray classifier share.

:func:`prepare_bytes` decodes a file's bytes (every frame, or an even sample; see
:mod:`nsfw_guard.decode`) and :func:`prepare_array` takes an already decoded array; both give a
:class:`Prepared` image: its frames as model input. :func:`check_prepared` classifies the frames
of many images in chunks and returns each image's verdict from its worst frame, through the
check step's own :meth:`~nsfw_guard.check.CheckStep.verdicts`, with one host transfer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .check import CheckStep, worst_frames
from .decode import decode_frames, decode_image
from .inputs import ImageBatch
from .levels import WORST_SCORES, NSFWLevel
from .preprocess import Preprocess
from .scoring import NSFWScorer

__all__ = [
    "FRAME_CHUNK",
    "Prepared",
    "Verdict",
    "check_prepared",
    "classify_prepared",
    "prepare_array",
    "prepare_bytes",
]


FRAME_CHUNK = 16
"""Frames of an animation prepared at once: the first ones by :func:`prepare_bytes`, then the
``later`` ones by :func:`check_prepared`, a chunk at a time."""


class Prepared(NamedTuple):
    """One image's frames as model input (the first ones, for a long animation), and what they
    came from."""

    pixels: Tensor
    """``[frames, 3, S, S]`` float32 model input."""
    verifiable: Tensor
    """``[frames]`` bool: false for frames with NaN or Inf pixels."""
    width: int
    height: int
    frame_count: int
    """Frames in the file."""
    frames_checked: int
    """Frames checked once the ``later`` ones are: ``frame_count``, or fewer when sampled."""
    later: tuple[int, ...] = ()
    """Indices of the frames still to check, decoded from ``data`` by :func:`check_prepared`."""
    data: bytes | None = None
    """The encoded image, while ``later`` frames are left to decode."""

    @property
    def sampled(self) -> bool:
        """Whether some frames are never checked (an explicit ``max_frames`` sample)."""
        return self.frames_checked < self.frame_count


class Verdict(NamedTuple):
    """One image's verdict (Python values); with an ``error``, the image could not be checked
    whole (a damaged frame past the first chunk): the worst case, flagged."""

    scores: tuple[float, float, float, float]
    level: NSFWLevel
    flagged: bool
    error: str | None = None


def prepare_bytes(
    data: bytes,
    preprocess: Preprocess,
    *,
    max_frames: int | None = None,
    chunk: int = FRAME_CHUNK,
) -> Prepared:
    """Decode an image file's bytes (any format Pillow reads, every mode, EXIF orientation) and
    preprocess its first ``chunk`` frames to check (``max_frames``: an even sample; ``None``:
    every frame); the others are left ``later``, for :func:`check_prepared`.

    Example:
        >>> from nsfw_guard.preprocess import DataConfig
        >>> config = DataConfig.from_pretrained_cfg({"input_size": (3, 448, 448)})
        >>> data = open("tests/data/chelsea.jpg", "rb").read()
        >>> image = prepare_bytes(data, Preprocess(config))
        >>> image.pixels.shape, image.width, image.height, image.sampled, image.later
        (torch.Size([1, 3, 448, 448]), 451, 300, False, ())
    """
    target = min(preprocess.config.input_size)
    decoded = decode_image(data, max_frames=max_frames, target_size=target, frame_limit=chunk)
    pixels, verifiable = _prepare_frames(decoded.frames, preprocess)
    return Prepared(
        pixels=pixels,
        verifiable=verifiable,
        width=decoded.width,
        height=decoded.height,
        frame_count=decoded.frame_count,
        frames_checked=len(decoded.frame_indices) + len(decoded.later),
        later=decoded.later,
        data=data if decoded.later else None,
    )


def _prepare_frames(frames: list[ImageBatch], preprocess: Preprocess) -> tuple[Tensor, Tensor]:
    prepared = [preprocess(frame.pixels, frame.value_range) for frame in frames]
    return torch.cat([p for p, _ in prepared]), torch.cat([v for _, v in prepared])


def prepare_array(array: np.ndarray | Tensor, preprocess: Preprocess) -> Prepared:
    """Preprocess one decoded image: ``[H, W]``, ``[H, W, C]`` (C = 1-4, alpha composited) or
    ``[C, H, W]`` (C = 1, 3 or 4, W > 4), uint8 (0-255) or float (0-1), as
    ``ray.data.read_images`` or PIL give them.

    Example:
        >>> from nsfw_guard.preprocess import DataConfig
        >>> config = DataConfig.from_pretrained_cfg({"input_size": (3, 448, 448)})
        >>> prepare_array(np.zeros((30, 40, 3), np.uint8), Preprocess(config)).pixels.shape
        torch.Size([1, 3, 448, 448])
    """
    tensor = array if torch.is_tensor(array) else torch.tensor(np.asarray(array))  # a copy
    if tensor.ndim == 2:
        tensor = tensor[:, :, None]
    elif tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[-1] > 4:
        tensor = tensor.permute(1, 2, 0)  # channels first (Ray keeps gray images as [1, H, W])
    if tensor.ndim != 3 or not 1 <= tensor.shape[-1] <= 4 or min(tensor.shape[:2]) < 1:
        raise ValueError(
            f"an image array of shape {tuple(tensor.shape)}: expected [H, W] or [H, W, C] "
            "with 1 to 4 channels"
        )
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"an image array of {tensor.dtype}: expected uint8 (0-255) or float (0-1)")
    channels_first = tensor.permute(2, 0, 1)[None]
    pixels, verifiable = preprocess(
        channels_first, "0,255" if tensor.dtype == torch.uint8 else "0,1"
    )
    height, width = tensor.shape[:2]
    return Prepared(pixels, verifiable, int(width), int(height), frame_count=1, frames_checked=1)


def check_prepared(
    images: Sequence[Prepared],
    step: CheckStep,
    batch_size: int = 16,
    *,
    levels: Sequence[NSFWLevel] | None = None,
    thresholds: Sequence[float] | None = None,
) -> list[Verdict]:
    """Each image's verdict: its frames classified ``batch_size`` at a time on the step's
    device (an animation's ``later`` frames decoded and classified a chunk at a time), an image
    as bad as its worst frame (:meth:`CheckStep.verdicts`), one host transfer. An image with
    frames never checked (sampled) is flagged whatever its scores. ``levels`` and
    ``thresholds`` give each image its own, in place of the step's.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.scoring import NSFWScorer
        >>> from nsfw_guard.testing import make_checkpoint
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp(), level="high"), device="cpu")
        >>> step = CheckStep(NSFWScorer(loaded.model, loaded.data_config))
        >>> image = prepare_array(np.zeros((30, 40, 3), np.uint8), step.scorer.preprocess)
        >>> [(v.level.value, v.flagged) for v in check_prepared([image, image], step)]
        [('high', True), ('high', True)]
    """
    if not images:
        return []
    with torch.inference_mode():
        scores, verifiable, owners = classify_prepared(images, step.scorer, batch_size)
        scores, verifiable = worst_frames(scores, verifiable, owners, len(images))
        errors: list[str | None] = [None] * len(images)
        for index, image in enumerate(images):
            if image.later:
                try:
                    scores[index], verifiable[index] = _worst_of_later(
                        image, scores[index], verifiable[index], step.scorer, batch_size
                    )
                except _FrameNotDecoded as error:  # this image's error, not the batch's
                    errors[index] = str(error)
        sampled = torch.tensor([image.sampled for image in images], device=scores.device)
        own_levels = own_thresholds = None  # the step's, unless each image has its own
        if levels is not None:
            own_levels = torch.tensor([level.index for level in levels], device=scores.device)
        if thresholds is not None:
            own_thresholds = torch.tensor(thresholds, device=scores.device)
        # Flagged, as an unverifiable image is: a sample leaves frames nobody looked at.
        verdicts = step.verdicts(
            scores, verifiable & ~sampled, levels=own_levels, thresholds=own_thresholds
        )
        table = torch.cat(
            [verdicts.scores, verdicts.levels[:, None], verdicts.flags[:, None]], dim=1
        ).tolist()  # the one host transfer
    return [
        Verdict(WORST_SCORES, NSFWLevel.HIGH, True, error)
        if error is not None
        else Verdict(tuple(row[:4]), NSFWLevel.parse(int(row[4])), bool(row[5]))
        for row, error in zip(table, errors, strict=True)
    ]


class _FrameNotDecoded(Exception):
    """A frame of an animation past its first chunk could not be decoded."""


def _worst_of_later(
    image: Prepared, scores: Tensor, verifiable: Tensor, scorer: NSFWScorer, chunk: int
) -> tuple[Tensor, Tensor]:
    """An image's worst scores ``[4]`` and verifiability, its ``later`` frames decoded and
    classified ``chunk`` at a time into them (no host transfer)."""
    target = min(scorer.preprocess.config.input_size)
    frames = decode_frames(image.data, image.later, target)
    device = scores.device
    while True:
        try:
            batch = list(itertools.islice(frames, chunk))
            if not batch:
                return scores, verifiable
            pixels, ok = _prepare_frames(batch, scorer.preprocess)
        except Exception as error:  # cut short or damaged past the first chunk
            raise _FrameNotDecoded(f"{type(error).__name__}: {error}".strip()) from error
        ok = ok.to(device)
        rows = torch.cat([scores[None], scorer.classify(pixels.to(device), ok)])
        owners = torch.zeros(rows.shape[0], dtype=torch.long, device=device)
        worst, all_ok = worst_frames(rows, torch.cat([verifiable[None], ok]), owners, 1)
        scores, verifiable = worst[0], all_ok[0]


def classify_prepared(
    images: Sequence[Prepared], scorer: NSFWScorer, batch_size: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """The frames of ``images`` classified ``batch_size`` at a time on the scorer's device:
    ``(scores [F, 4], verifiable [F], owners [F])``, ``owners`` the image of each frame (as
    :meth:`CheckStep.verdicts` takes them). No host transfer.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.testing import make_checkpoint
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp()), device="cpu")
        >>> scorer = NSFWScorer(loaded.model, loaded.data_config)
        >>> image = prepare_array(np.zeros((30, 40, 3), np.uint8), scorer.preprocess)
        >>> scores, verifiable, owners = classify_prepared([image, image], scorer)
        >>> scores.shape, owners.tolist()
        (torch.Size([2, 4]), [0, 1])
    """
    device = scorer.preprocess.mean.device
    pixels = _concat([image.pixels for image in images], device)
    verifiable = torch.cat([image.verifiable for image in images])
    counts = torch.tensor([image.pixels.shape[0] for image in images])
    owners = torch.repeat_interleave(torch.arange(len(images)), counts).to(device)
    scores = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        frames = pixels[chunk].to(device, non_blocking=True)
        scores.append(scorer.classify(frames, verifiable[chunk].to(device)))
    return torch.cat(scores), verifiable.to(device), owners


def _concat(tensors: list[Tensor], device: torch.device) -> Tensor:
    """``torch.cat``; CPU tensors bound for a GPU go into page-locked memory, so that their copy
    to it is async. Tensors already on the GPU (preprocessed there) stay there."""
    if device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
        return torch.cat([t.to(device) for t in tensors])
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    return torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True))
