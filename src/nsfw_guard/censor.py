"""Censoring: batched, device-agnostic operations on float images ``[B, C, H, W]`` in [0, 1].

``apply`` censors only the images whose mask is true, with ``torch.where``: every image goes
through the action and the mask picks, so there is no Python branch on tensor values and no host
sync. Unmasked images come back bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "ACTIONS",
    "Action",
    "apply",
    "blank",
    "blur",
    "check_action",
    "check_color",
    "check_params",
    "pixelate",
]

Action = str | Callable[[Tensor], Tensor]
ACTIONS = ("blur", "pixelate", "blank", "none")
"""Named actions; ``"none"`` flags without changing the image."""

DEFAULT_BLUR_RADIUS = 0.08
DEFAULT_PIXELATE_CELLS = 12
"""Without a ``block_size``, ``pixelate`` makes blocks 1/12 of the image's longer side."""
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
    _check_radius(radius)
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


def pixelate(images: Tensor, block_size: int | None = None) -> Tensor:
    """Average the image over square blocks of ``block_size`` pixels (a mosaic).

    ``None`` scales the blocks to the image: 1/12 of its longer side (43 px at 512²), so the
    mosaic is as coarse at any size. Edge blocks stretch a little when the size is not a multiple.

    Example:
        >>> out = pixelate(torch.rand(1, 3, 64, 32), block_size=16)
        >>> out.shape, out.unique().numel() <= 3 * 4 * 2
        (torch.Size([1, 3, 64, 32]), True)
    """
    _check_block_size(block_size)
    height, width = images.shape[-2:]
    cell = block_size or max(height, width) / DEFAULT_PIXELATE_CELLS
    grid = [max(1, round(height / cell)), max(1, round(width / cell))]
    small = TF.resize(images, grid, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(small, [height, width], interpolation=InterpolationMode.NEAREST)


def blank(images: Tensor, color: float | Sequence[float] = 0.0) -> Tensor:
    """Fill every image with ``color``: one value for all channels or one per channel, in [0, 1].

    The default is black, for any number of channels.

    Example:
        >>> blank(torch.rand(1, 3, 2, 2), color=(1.0, 0.5, 0.0))[0, :, 0, 0].tolist()
        [1.0, 0.5, 0.0]
    """
    values = check_color(color, images.shape[1])
    filled = torch.empty_like(images)
    for channel, value in enumerate(values):
        filled[:, channel].fill_(value)  # a scalar fill: no host-to-device copy
    return filled


def check_action(action: Action) -> Action:
    """Return ``action`` if it is one of :data:`ACTIONS` or a callable, else raise ValueError.

    Example:
        >>> check_action("pixelate")
        'pixelate'
    """
    if callable(action) or action in ACTIONS:
        return action
    raise ValueError(
        f"action={action!r} is not supported; use one of {', '.join(map(repr, ACTIONS))} "
        "or a callable (images) -> images."
    )


def check_params(action: Action, params: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` if ``action`` takes them and their values are valid, else raise ValueError.

    ``"blur"`` takes ``radius``, ``"pixelate"`` ``block_size``, ``"blank"`` ``color``; a callable
    gets whatever is given.

    Example:
        >>> check_params("pixelate", {"block_size": 16})
        {'block_size': 16}
    """
    action = check_action(action)
    if callable(action):
        return dict(params)
    checks = _PARAM_CHECKS[action]
    for name, value in params.items():
        if name not in checks:
            takes = ", ".join(f"{n}=" for n in checks) or "no parameters"
            raise ValueError(f"{name}= is not a parameter of action {action!r}; it takes {takes}.")
        checks[name](value)
    return dict(params)


def check_color(color: float | Sequence[float], channels: int | None = None) -> list[float]:
    """``color`` as one float per channel, or a ValueError.

    One number fills every channel; a sequence gives one value per channel (``channels`` of
    them when given, else 1 to 4). Values are in [0, 1].

    Example:
        >>> check_color(1, channels=3)
        [1.0, 1.0, 1.0]
    """
    expected = f"one number or {channels or '1-4'} numbers in [0, 1]"
    if isinstance(color, int | float) and not isinstance(color, bool):
        values = [float(color)]
    else:
        try:
            values = [float(v) for v in color]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"color={color!r}: expected {expected}.") from None
    counts = (1, channels) if channels else (1, 2, 3, 4)
    if len(values) not in counts or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"color={color!r}: expected {expected}.")
    return values * channels if channels and len(values) == 1 else values


def _check_radius(radius: float) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int | float) or not radius > 0:
        raise ValueError(f"blur radius={radius!r}: expected a positive fraction of the image size.")


def _check_block_size(block_size: int | None) -> None:
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"pixelate block_size={block_size!r}: expected a positive number of pixels, or None "
            "for 1/12 of the image's longer side."
        )


_PARAM_CHECKS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "blur": {"radius": _check_radius},
    "pixelate": {"block_size": _check_block_size},
    "blank": {"color": check_color},
    "none": {},
}


def apply(images: Tensor, mask: Tensor, action: Action, **params: Any) -> Tensor:
    """Censor the images where ``mask`` ([B] bool) is true; leave the others untouched.

    ``action`` is ``"blur"``, ``"pixelate"``, ``"blank"``, ``"none"`` or a callable
    ``(images) -> images``; ``params`` go to it (``radius=``, ``block_size=``, ``color=``).

    Example:
        >>> images = torch.rand(2, 3, 8, 8)
        >>> out = apply(images, torch.tensor([True, False]), "blank")
        >>> out[0].max().item(), torch.equal(out[1], images[1])
        (0.0, True)
    """
    params = check_params(action, params)
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
