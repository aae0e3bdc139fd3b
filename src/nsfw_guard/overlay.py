"""Region-map overlays for the pages (``serve``'s ``/v1/map``, ``review``'s ``/map/N``): an
image's region map as a PNG of one colour whose alpha is the map, so it holds none of the
image's pixels and can be drawn over a censored preview without revealing anything."""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from . import censor
from .decode import decode_frames
from .levels import NSFWLevel, parse_check_level
from .preprocess import seen_rgb
from .scoring import REGION_MAP_MODES, NSFWScorer, region_grid

__all__ = ["MAP_SIDE", "OVERLAY_COLOR", "OverlayMap", "overlay_png", "region_overlay_map"]

MAP_SIDE = 512
"""An overlay's longer side, at most (the image's aspect ratio; the page scales it)."""
OVERLAY_COLOR = (255, 24, 0)
"""Every pixel of an overlay has this colour; only its alpha (the map) varies."""


class OverlayMap(NamedTuple):
    """An image's region map for an overlay, and which frame it is of."""

    values: Tensor
    """``[h, w]`` float32 in [0, 1] on the CPU."""
    frame: int
    """The frame mapped: the one that scores highest at the level (0 for a still image)."""


@torch.no_grad()
def region_overlay_map(
    scorer: NSFWScorer,
    data: bytes,
    level: NSFWLevel | str | int,
    region_params: dict[str, Any] | None = None,
) -> OverlayMap:
    """The map ``action="regions"`` uses (``region_params``' ``map`` and ``cells``) at
    ``level``, of the image file in ``data``, or of an animation's worst frame (every frame is
    scored, one at a time, and the one scoring highest at ``level`` is mapped): ``[h, w]``
    float32 in [0, 1] on the CPU, the image's aspect ratio, at most :data:`MAP_SIDE` on its
    longer side.

    ``"occlusion"``: how much each cell makes the image score at ``level`` (below 0 is 0; see
    :meth:`NSFWScorer.occlusion_map`), the ranking ``action="regions"`` censors by; ``"cam"``:
    each patch's own score. Where the image cannot be scored, 1 (see :func:`region_grid`).

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (96, 64), "gray").save(buffer, "PNG")
        >>> overlay = region_overlay_map(detector.scorer, buffer.getvalue(), "medium")
        >>> overlay.values.shape, overlay.frame
        (torch.Size([64, 96]), 0)
    """
    params = {**censor.REGION_DEFAULTS, **(region_params or {})}
    index = parse_check_level(level).index
    device = scorer.preprocess.mean.device
    worst, worst_score, unit = 0, -1.0, None
    for number, frame in enumerate(decode_frames(data, None, MAP_SIDE)):
        pixels = seen_rgb(frame).to(device)
        score = float(scorer(pixels, "0,1")[0, index])
        if unit is None or score > worst_score:
            worst, worst_score, unit = number, score, pixels
    height, width = unit.shape[-2:]
    scale = min(1.0, MAP_SIDE / max(height, width))
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    unit = TF.resize(unit, size, antialias=True).clamp(0, 1)
    grid = region_grid(scorer, unit, index, params["map"], params["cells"]).clamp(0, 1)
    mode = REGION_MAP_MODES[params["map"]]
    return OverlayMap(TF.resize(grid, size, interpolation=mode)[0, 0].cpu(), worst)


def overlay_png(region_map: Tensor) -> bytes:
    """``[h, w]`` values in [0, 1] as an RGBA PNG: :data:`OVERLAY_COLOR` everywhere, alpha the
    value (0-255).

    Example:
        >>> with Image.open(io.BytesIO(overlay_png(torch.tensor([[0.0, 1.0]])))) as image:
        ...     image.mode, image.getpixel((0, 0)), image.getpixel((1, 0))
        ('RGBA', (255, 24, 0, 0), (255, 24, 0, 255))
    """
    alpha = (region_map.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.new("RGBA", (alpha.shape[1], alpha.shape[0]), (*OVERLAY_COLOR, 0))
    image.putalpha(Image.fromarray(alpha, "L"))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
