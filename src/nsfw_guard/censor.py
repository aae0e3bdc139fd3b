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
    "censor_regions",
    "check_action",
    "check_color",
    "check_params",
    "pixelate",
    "region_alpha",
]

Action = str | Callable[[Tensor], Tensor]
ACTIONS = ("blur", "pixelate", "blank", "none", "regions")
"""Named actions; ``"none"`` flags without changing the image; ``"regions"`` blurs or pixelates
only the regions that made an image flagged and needs the classifier (see
:class:`nsfw_guard.check.CheckStep`)."""

DEFAULT_BLUR_RADIUS = 0.08
DEFAULT_PIXELATE_CELLS = 12
"""Without a ``block_size``, ``pixelate`` makes blocks 1/12 of the image's longer side."""
REGION_SHAPES = ("rect", "ellipse")
"""How a region grows by its margin: a square (``"rect"``) or a disc (``"ellipse"``)."""
DEFAULT_REGION_MARGIN = 0.05
REGION_MAPS = ("occlusion", "cam")
"""How ``action="regions"`` finds the regions: hiding each cell of a grid in turn and rescoring
(``"occlusion"``), or the classifier's per-patch scores from its own forward pass (``"cam"``)."""
REGION_CENSORS = ("blur", "pixelate")
DEFAULT_REGION_CELLS = 4
REGION_DEFAULTS = {
    "margin": DEFAULT_REGION_MARGIN,
    "shape": "rect",
    "feather": 0.0,
    "censor": "blur",
    "map": "occlusion",
    "cells": DEFAULT_REGION_CELLS,
}
"""``action="regions"``'s parameters and their defaults (besides the base censor's ``radius`` or
``block_size``)."""
# Region masks are grown and feathered on a grid this many cells along the image's longer side.
_REGION_GRID = 128
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

    ``"blur"`` takes ``radius``, ``"pixelate"`` ``block_size``, ``"blank"`` ``color``,
    ``"regions"`` those of :data:`REGION_DEFAULTS` and its base censor's; a callable gets
    whatever is given.

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
    if action == "regions":
        _check_region_params(
            params.get("margin", 0.0), params.get("shape", "rect"), params.get("feather", 0.0)
        )
        base = params.get("censor", "blur")
        other = {"blur": "block_size", "pixelate": "radius"}[base]
        if other in params:
            raise ValueError(f"{other}= is not a parameter of region_censor={base!r}.")
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


def _check_choice(name: str, choices: Sequence[str]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}.")

    return check


def _check_cells(cells: int) -> None:
    if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= 16:
        raise ValueError(f"region_cells={cells!r}: expected a grid size from 1 to 16.")


def _any(value: Any) -> None:
    """Checked with the others, by ``_check_region_params``."""


_PARAM_CHECKS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "blur": {"radius": _check_radius},
    "pixelate": {"block_size": _check_block_size},
    "blank": {"color": check_color},
    "none": {},
    "regions": {
        "margin": _any,
        "shape": _any,
        "feather": _any,
        "censor": _check_choice("region_censor", REGION_CENSORS),
        "map": _check_choice("region_map", REGION_MAPS),
        "cells": _check_cells,
        "radius": _check_radius,
        "block_size": _check_block_size,
    },
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
    if action == "regions":
        raise ValueError(
            "action 'regions' needs the classifier to find the regions: run it through "
            "nsfw_guard.check.CheckStep (or guard(), scan, serve)."
        )
    operation = {"blur": blur, "pixelate": pixelate, "blank": blank}.get(action, action)
    censored = operation(images, **params)
    if censored.shape != images.shape:
        raise ValueError(
            f"the censor action returned shape {tuple(censored.shape)} for images of shape "
            f"{tuple(images.shape)}; it must keep the shape."
        )
    return torch.where(mask[:, None, None, None], censored.to(images.dtype), images)


def region_alpha(
    region_map: Tensor,
    threshold: float,
    size: Sequence[int],
    margin: float = DEFAULT_REGION_MARGIN,
    shape: str = "rect",
    feather: float = 0.0,
) -> Tensor:
    """How much of each pixel to censor, ``[B, 1, H, W]`` in [0, 1], from a ``[B, 1, h, w]``
    map of scores (any grid, stretched over the image ``size``).

    The cells of the map whose value is ``>= threshold`` (NaN counts as 1), whole, grown by
    ``margin`` (a fraction of the longer side; ``shape`` ``"rect"`` grows square, ``"ellipse"``
    round), get 1. ``feather`` (a fraction of the longer side, the sigma of a Gaussian) adds a
    soft edge outside that, never inside. Fail closed: an image with no value at or above the
    threshold gets 1 everywhere. In-graph: no host sync, no branch on values.

    Example:
        >>> region_map = torch.zeros(2, 1, 4, 4)
        >>> region_map[0, 0, 0, 0] = 0.9
        >>> alpha = region_alpha(region_map, 0.5, (64, 64), margin=0.0)
        >>> alpha[0, 0, :16, :16].min().item(), alpha[0, 0, 32:, 32:].max().item()
        (1.0, 0.0)
        >>> alpha[1].min().item()  # nothing above the threshold: all of it
        1.0
    """
    _check_region_params(margin, shape, feather)
    height, width = int(size[0]), int(size[1])
    scale = min(1.0, _REGION_GRID / max(height, width))
    grid = [max(1, round(height * scale)), max(1, round(width * scale))]
    # Thresholded per cell of the map, then spread over each cell's whole area: a cell at or
    # above the threshold is censored entirely (a bilinear map would shrink it).
    hot = (region_map.float().nan_to_num(nan=1.0) >= threshold).float()
    hot = TF.resize(hot, grid, interpolation=InterpolationMode.NEAREST_EXACT)
    empty = hot.flatten(1).amax(dim=1) == 0
    hot = torch.where(empty[:, None, None, None], torch.ones_like(hot), hot)
    reach = round(margin * max(grid))
    if reach > 0:
        hot = _dilate(hot, reach, shape)
    if feather > 0:
        sigma = feather * max(grid)
        half = math.ceil(3 * sigma)
        padded = torch.nn.functional.pad(hot, [half] * 4)  # zeros: the edge fades out too
        soft = TF.gaussian_blur(padded, [2 * half + 1] * 2, [sigma] * 2)[
            ..., half:-half, half:-half
        ]
        hot = torch.maximum(hot, soft)
        return TF.resize(hot, [height, width], interpolation=InterpolationMode.BILINEAR)
    full = TF.resize(hot, [height, width], interpolation=InterpolationMode.BILINEAR)
    return (full >= 0.5).float()


def censor_regions(images: Tensor, censored: Tensor, alpha: Tensor) -> Tensor:
    """``censored`` where ``alpha`` ([B, 1, H, W]) is 1, ``images`` where it is 0, blended
    between; pixels with ``alpha`` 0 are ``images``' bit for bit.

    Example:
        >>> images, alpha = torch.rand(1, 3, 4, 4), torch.zeros(1, 1, 4, 4)
        >>> alpha[..., :2] = 1.0
        >>> out = censor_regions(images, torch.zeros_like(images), alpha)
        >>> out[..., :2].max().item(), torch.equal(out[..., 2:], images[..., 2:])
        (0.0, True)
    """
    alpha = alpha.to(images.dtype)
    blended = torch.lerp(images, censored.to(images.dtype), alpha)
    return torch.where(alpha > 0, blended, images)


def _dilate(mask: Tensor, reach: int, shape: str) -> Tensor:
    """Grow a ``[B, 1, h, w]`` 0/1 mask by ``reach`` cells, as a square or a disc."""
    if shape == "rect":
        return torch.nn.functional.max_pool2d(mask, 2 * reach + 1, stride=1, padding=reach)
    offsets = torch.arange(-reach, reach + 1, device=mask.device, dtype=mask.dtype)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= reach**2 + 0.5).to(mask.dtype)
    grown = torch.nn.functional.conv2d(mask, disc[None, None], padding=reach)
    return (grown > 0.5).to(mask.dtype)


def _check_region_params(margin: float, shape: str, feather: float) -> None:
    for name, value in (("margin", margin), ("feather", feather)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(
                f"region {name}={value!r}: expected a fraction of the image's longer side in "
                "[0, 1]."
            )
    if shape not in REGION_SHAPES:
        raise ValueError(
            f"region shape={shape!r}: expected one of {', '.join(map(repr, REGION_SHAPES))}."
        )
