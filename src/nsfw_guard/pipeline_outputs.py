"""The images in what a diffusers pipeline returns, as tensors to check, and how to put them back.

A pipeline returns a ``BaseOutput`` (``images``, ``frames``, ...) or, with ``return_dict=False``, a
tuple; the images are PIL images (a list, or a list of frame lists for video), numpy arrays
(``BHWC``, or ``BFHWC`` for video) or tensors (``BCHW``, or ``BFCHW``). :func:`locate_images` finds
and counts them; each :class:`ImageGroup` loads its images as an ``[N, C, H, W]`` batch only when
asked (counting converts nothing); :meth:`LocatedImages.replace` builds the same output with the
checked images, leaving every unflagged image as it was (PIL images: the same objects).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput
from PIL import Image
from torch import Tensor

from .pipeline_support import IMAGE_FIELDS, NSFW_FIELDS, PipelineSupport

__all__ = ["ImageGroup", "LocatedImages", "locate_images"]

_PIL_MODES = ("L", "RGB", "RGBA")


@dataclass
class ImageGroup:
    """``count`` same-size images in ``value_range``: ``load()`` gives them as ``[N, C, H, W]``,
    ``rebuild`` their own form from checked pixels and per-image flags."""

    count: int
    value_range: str
    load: Callable[[], Tensor]
    rebuild: Callable[[Tensor, list[bool]], Any]


@dataclass
class LocatedImages:
    """The images of one pipeline output, in output order (batch, then frames)."""

    output: Any
    key: str | int | None  # the field or tuple index holding them; None: the output itself
    groups: list[ImageGroup]
    rebuild: Callable[[list[Any]], Any]  # the value at ``key`` from its rebuilt groups
    nsfw_key: str | int | None

    @property
    def count(self) -> int:
        return sum(group.count for group in self.groups)

    def replace(self, checked: list[Tensor], flags: list[bool]) -> Any:
        """The output with ``checked`` (one tensor per group) in place of its images."""
        values, start = [], 0
        for group, pixels in zip(self.groups, checked, strict=True):
            values.append(group.rebuild(pixels, flags[start : start + group.count]))
            start += group.count
        value = self.rebuild(values)
        if self.key is None:
            return value
        if isinstance(self.output, tuple):
            items = list(self.output)
            items[self.key] = value
            if self.nsfw_key is not None and self.nsfw_key < len(items):
                items[self.nsfw_key] = flags
            return type(self.output)(items)
        setattr(self.output, self.key, value)
        if self.nsfw_key is not None:
            setattr(self.output, self.nsfw_key, flags)
        return self.output


def locate_images(output: Any, support: PipelineSupport) -> LocatedImages | None:
    """Find the images in ``output``; ``None`` when it holds none nsfw-guard can read.

    Example:
        >>> from diffusers import StableDiffusionXLPipeline
        >>> from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
        >>> from nsfw_guard.pipeline_support import pipeline_support
        >>> output = StableDiffusionXLPipelineOutput(images=np.zeros((2, 8, 8, 3), np.float32))
        >>> located = locate_images(output, pipeline_support(StableDiffusionXLPipeline))
        >>> located.count, located.groups[0].load().shape
        (2, torch.Size([2, 3, 8, 8]))
    """
    fields = support.output_fields or ()
    nsfw_key: str | int | None = None
    if isinstance(output, BaseOutput):
        key = next((name for name in IMAGE_FIELDS if output.get(name) is not None), None)
        nsfw_key = next((name for name in NSFW_FIELDS if name in fields), None)
        value = output.get(key) if key is not None else None
    elif isinstance(output, tuple):
        key = next((fields.index(name) for name in IMAGE_FIELDS if name in fields), 0)
        nsfw_key = next((fields.index(name) for name in NSFW_FIELDS if name in fields), None)
        value = output[key] if key < len(output) else None
    else:
        key, value = None, output
    if value is None:
        return None
    parsed = _groups(value, support.pt_value_range)
    if parsed is None:
        return None
    groups, rebuild = parsed
    return LocatedImages(output, key, groups, rebuild, nsfw_key)


def _groups(value: Any, pt_range: str):
    """``(groups, rebuild)`` for one output value, or ``None`` if it is not images."""
    if isinstance(value, Tensor):
        return _tensor_groups(value, pt_range)
    if isinstance(value, np.ndarray):
        return _array_groups(value)
    if isinstance(value, list | tuple) and value:
        if all(isinstance(item, Image.Image) for item in value):
            return _pil_groups(list(value))
        parts = [_groups(item, pt_range) for item in value]
        if any(part is None for part in parts):
            return None
        groups = [group for part_groups, _ in parts for group in part_groups]
        counts = [len(part_groups) for part_groups, _ in parts]

        def rebuild(values: list[Any]) -> Any:
            rebuilt, start = [], 0
            for (_, part_rebuild), count in zip(parts, counts, strict=True):
                rebuilt.append(part_rebuild(values[start : start + count]))
                start += count
            return type(value)(rebuilt)

        return groups, rebuild
    return None


def _tensor_groups(value: Tensor, value_range: str):
    if value.ndim not in (3, 4, 5) or not (value.is_floating_point() or value.dtype == torch.uint8):
        return None
    shape = value.shape
    pixels = value.reshape(-1, *shape[-3:])
    if pixels.shape[1] not in (1, 2, 3, 4):
        return None
    device = value.device

    def rebuild(checked: Tensor, flags: list[bool]) -> Tensor:
        return checked.reshape(shape).to(device)

    group = ImageGroup(pixels.shape[0], value_range, lambda: pixels, rebuild)
    return [group], lambda values: values[0]


def _array_groups(value: np.ndarray):
    if value.ndim not in (3, 4, 5) or value.shape[-1] not in (1, 2, 3, 4):
        return None
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype == np.uint8):
        return None
    shape = value.shape
    flat = np.ascontiguousarray(value).reshape(-1, *shape[-3:])
    pixels = torch.from_numpy(flat).permute(0, 3, 1, 2)

    def rebuild(checked: Tensor, flags: list[bool]) -> np.ndarray:
        if not any(flags):
            return value
        result = flat.copy()
        censored = checked.permute(0, 2, 3, 1).cpu().numpy().astype(value.dtype, copy=False)
        result[flags] = censored[flags]
        return result.reshape(shape)

    return [ImageGroup(pixels.shape[0], "auto", lambda: pixels, rebuild)], lambda values: values[0]


def _pil_groups(images: list[Image.Image]):
    """Consecutive images of one size and mode form a batch; each becomes uint8 ``[C, H, W]``."""
    runs: list[list[Image.Image]] = []
    for image in images:
        if runs and (runs[-1][0].size, runs[-1][0].mode) == (image.size, image.mode):
            runs[-1].append(image)
        else:
            runs.append([image])
    groups = [ImageGroup(len(run), "0,1", _pil_load(run), _pil_rebuild(run)) for run in runs]

    def rebuild(values: list[list[Image.Image]]) -> list[Image.Image]:
        return [image for run in values for image in run]

    return groups, rebuild


def _pil_load(run: list[Image.Image]) -> Callable[[], Tensor]:
    def load() -> Tensor:
        readable = [image if image.mode in _PIL_MODES else image.convert("RGB") for image in run]
        arrays = [np.asarray(image) for image in readable]
        arrays = [array[..., None] if array.ndim == 2 else array for array in arrays]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    return load


def _pil_rebuild(run: list[Image.Image]):
    def rebuild(checked: Tensor, flags: list[bool]) -> list[Image.Image]:
        if not any(flags):
            return run
        arrays = checked.permute(0, 2, 3, 1).cpu().numpy()
        return [
            Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array) if flag else image
            for image, array, flag in zip(run, arrays, flags, strict=True)
        ]

    return rebuild
