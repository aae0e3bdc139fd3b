"""Censoring: batched, device-agnostic operations on float images ``[B, C, H, W]`` in [0, 1].

``apply`` censors only the images whose mask is true, with ``torch.where``: every image goes
through the action and the mask picks, so there is no Python branch on tensor values and no host
sync. Unmasked images come back bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["ACTIONS", "Action", "apply", "blank", "blur", "check_action", "pixelate"]

Action = str | Callable[[Tensor], Tensor]
ACTIONS = ("blur", "pixelate", "blank", "none")
"""Named actions; ``"none"`` flags without changing the image."""

DEFAULT_BLUR_RADIUS = 0.08
DEFAULT_PIXELATE_BLOCKS = 12
# The blur runs at a size where its Gaussian has this sigma, then is scaled back up.
_WORKING_SIGMA = 2.0


def blur(images: Tensor, radius: float = DEFAULT_BLUR_RADIUS) -> Tensor:
    """Gaussian blur with sigma ``radius`` x the longer side, so its strength scales with the image.

    The default (8% of the longer side: sigma 41 px at 512²) leaves only colour blobs. It runs at a
    reduced size and is scaled back up, so a strong blur costs little.

    Example:
        >>> images = torch.rand(2, 3, 64, 96)
        >>> blur(images).shape, bool(blur(images).std() < images.std() / 4)
        (torch.Size([2, 3, 64, 96]), True)
    """
    if not radius > 0:
        raise ValueError(f"blur radius={radius!r}: expected a positive fraction of the image size.")
    height, width = images.shape[-2:]
    sigma = radius * max(height, width)
    factor = max(1.0, sigma / _WORKING_SIGMA)
    small_size = [max(1, round(height / factor)), max(1, round(width / factor))]
    small = TF.resize(images, small_size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    small_sigma = sigma / factor
    # Reflect padding needs the kernel radius below the image size.
    half = min(math.ceil(3 * small_sigma), min(small_size) - 1)
    if half > 0:
        small = TF.gaussian_blur(small, [2 * half + 1] * 2, [small_sigma] * 2)
    return TF.resize(
        small, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=False
    )


def pixelate(images: Tensor, blocks: int = DEFAULT_PIXELATE_BLOCKS) -> Tensor:
    """Average the image over a grid ``blocks`` cells across its longer side.

    Example:
        >>> pixelate(torch.rand(1, 3, 64, 32), blocks=4).unique().numel() <= 3 * 4 * 2
        True
    """
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"pixelate blocks={blocks!r}: expected a positive integer.")
    height, width = images.shape[-2:]
    cell = max(height, width) / blocks
    grid = [max(1, round(height / cell)), max(1, round(width / cell))]
    small = TF.resize(images, grid, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(small, [height, width], interpolation=InterpolationMode.NEAREST)


def blank(images: Tensor, color: tuple[float, ...] = (0.0, 0.0, 0.0)) -> Tensor:
    """Fill every image with ``color`` (RGB in [0, 1]; default black).

    Example:
        >>> blank(torch.rand(1, 3, 2, 2), color=(1.0, 0.5, 0.0))[0, :, 0, 0].tolist()
        [1.0, 0.5, 0.0]
    """
    if len(color) != images.shape[1] or not all(0.0 <= float(v) <= 1.0 for v in color):
        raise ValueError(
            f"blank color={color!r}: expected {images.shape[1]} values in [0, 1] (RGB)."
        )
    filled = torch.empty_like(images)
    for channel, value in enumerate(color):
        filled[:, channel].fill_(float(value))  # a scalar fill: no host-to-device copy
    return filled


def check_action(action: Action) -> Action:
    """Return ``action`` if it is one of :data:`ACTIONS` or a callable, else raise ValueError."""
    if callable(action) or action in ACTIONS:
        return action
    raise ValueError(
        f"action={action!r} is not supported; use one of {', '.join(map(repr, ACTIONS))} "
        "or a callable (images) -> images."
    )


def apply(images: Tensor, mask: Tensor, action: Action, **params: Any) -> Tensor:
    """Censor the images where ``mask`` ([B] bool) is true; leave the others untouched.

    ``action`` is ``"blur"``, ``"pixelate"``, ``"blank"``, ``"none"`` or a callable
    ``(images) -> images``; ``params`` go to it (``radius=``, ``blocks=``, ``color=``).

    Example:
        >>> images = torch.rand(2, 3, 8, 8)
        >>> out = apply(images, torch.tensor([True, False]), "blank")
        >>> out[0].max().item(), torch.equal(out[1], images[1])
        (0.0, True)
    """
    action = check_action(action)
    if action == "none":
        return images
    operation = {"blur": blur, "pixelate": pixelate, "blank": blank}.get(action, action)
    censored = operation(images, **params)
    if censored.shape != images.shape:
        raise ValueError(
            f"the censor action returned shape {tuple(censored.shape)} for images of shape "
            f"{tuple(images.shape)}; it must keep the shape."
        )
    return torch.where(mask[:, None, None, None], censored.to(images.dtype), images)
