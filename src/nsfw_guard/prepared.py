"""Images prepared for the model, and their verdicts: the decode → preprocess → check path that
``scan``, ``check`` and the Ray classifier share.

:func:`prepare_bytes` decodes a file's bytes (every frame, or an even sample; see
:mod:`nsfw_guard.decode`) and :func:`prepare_array` takes an already decoded array; both give a
:class:`Prepared` image: its frames as model input. :func:`check_prepared` classifies the frames
of many images in chunks and returns each image's verdict from its worst frame, through the
check step's own :meth:`~nsfw_guard.check.CheckStep.verdicts`, with one host transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .check import CheckStep
from .decode import decode_image
from .levels import NSFWLevel
from .preprocess import Preprocess
from .scoring import NSFWScorer

__all__ = [
    "Prepared",
    "Verdict",
    "check_prepared",
    "classify_prepared",
    "prepare_array",
    "prepare_bytes",
]


class Prepared(NamedTuple):
    """One image's checked frames as model input, and what they came from."""

    pixels: Tensor
    """``[frames, 3, S, S]`` float32 model input."""
    verifiable: Tensor
    """``[frames]`` bool: false for frames with NaN or Inf pixels."""
    width: int
    height: int
    frame_count: int
    """Frames in the file (``pixels`` holds all of them, or a sample)."""
    complete: bool
    """Whether every frame was checked."""


class Verdict(NamedTuple):
    """One image's verdict (Python values)."""

    scores: tuple[float, float, float, float]
    level: NSFWLevel
    flagged: bool


def prepare_bytes(
    data: bytes, preprocess: Preprocess, *, max_frames: int | None = None
) -> Prepared:
    """Decode an image file's bytes (any format Pillow reads, every mode, EXIF orientation) and
    preprocess its frames (``max_frames``: an even sample; ``None``: all).

    Example:
        >>> from nsfw_guard.preprocess import DataConfig
        >>> config = DataConfig.from_pretrained_cfg({"input_size": (3, 448, 448)})
        >>> data = open("tests/data/chelsea.jpg", "rb").read()
        >>> image = prepare_bytes(data, Preprocess(config))
        >>> image.pixels.shape, image.width, image.height, image.complete
        (torch.Size([1, 3, 448, 448]), 451, 300, True)
    """
    target = min(preprocess.config.input_size)
    decoded = decode_image(data, max_frames=max_frames, target_size=target)
    prepared = [preprocess(frame.pixels, frame.value_range) for frame in decoded.frames]
    return Prepared(
        pixels=torch.cat([pixels for pixels, _ in prepared]),
        verifiable=torch.cat([verifiable for _, verifiable in prepared]),
        width=decoded.width,
        height=decoded.height,
        frame_count=decoded.frame_count,
        complete=decoded.all_frames_checked,
    )


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
    return Prepared(pixels, verifiable, int(width), int(height), 1, True)


def check_prepared(
    images: Sequence[Prepared],
    step: CheckStep,
    batch_size: int = 16,
    *,
    levels: Sequence[NSFWLevel] | None = None,
    thresholds: Sequence[float] | None = None,
) -> list[Verdict]:
    """Each image's verdict: its frames classified ``batch_size`` at a time on the step's
    device, an image as bad as its worst frame (:meth:`CheckStep.verdicts`), one host transfer.
    ``levels`` and ``thresholds`` give each image its own, in place of the step's.

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
        own_levels = own_thresholds = None  # the step's, unless each image has its own
        if levels is not None:
            own_levels = torch.tensor([level.index for level in levels], device=scores.device)
        if thresholds is not None:
            own_thresholds = torch.tensor(thresholds, device=scores.device)
        verdicts = step.verdicts(
            scores, verifiable, owners, len(images), levels=own_levels, thresholds=own_thresholds
        )
        table = torch.cat(
            [verdicts.scores, verdicts.levels[:, None], verdicts.flags[:, None]], dim=1
        ).tolist()  # the one host transfer
    return [Verdict(tuple(row[:4]), NSFWLevel.parse(int(row[4])), bool(row[5])) for row in table]


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
    device = next(scorer.parameters()).device
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
