"""Region-map overlays for the pages (``serve``'s ``/v1/map``, ``review``'s ``/map/N``): an
image's region map as a PNG of one colour whose alpha is the map, so it holds none of the
image's pixels and can be drawn over a censored preview without revealing anything."""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from . import censor
from .check import MIN_DROP
from .decode import decode_frames
from .levels import NSFWLevel, parse_check_level
from .preprocess import WHITE, composite_alpha, to_unit_range
from .scoring import NSFWScorer

__all__ = ["MAP_SIDE", "OVERLAY_COLOR", "overlay_png", "region_overlay_map"]

MAP_SIDE = 512
"""An overlay's longer side, at most (the image's aspect ratio; the page scales it)."""
OVERLAY_COLOR = (255, 24, 0)
"""Every pixel of an overlay has this colour; only its alpha (the map) varies."""


@torch.no_grad()
def region_overlay_map(
    scorer: NSFWScorer,
    data: bytes,
    level: NSFWLevel | str | int,
    region_params: dict[str, Any] | None = None,
) -> Tensor:
    """The map ``action="regions"`` uses (``region_params``' ``map`` and ``cells``), for the
    first frame of the image file in ``data`` at ``level``: ``[h, w]`` float32 in [0, 1] on the
    CPU, the image's aspect ratio, at most :data:`MAP_SIDE` on its longer side.

    ``"occlusion"``: how much hiding each cell lowers the score at ``level`` (below 0 is 0),
    or, where no cell alone does, each 2 x 2 block of cells (as ``action="regions"`` searches);
    ``"cam"``: each patch's own score. Where the image cannot be scored, 1.

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (96, 64), "gray").save(buffer, "PNG")
        >>> region_overlay_map(detector.scorer, buffer.getvalue(), "medium").shape
        torch.Size([64, 96])
    """
    params = {**censor.REGION_DEFAULTS, **(region_params or {})}
    index = parse_check_level(level).index
    frame = next(decode_frames(data, [0], MAP_SIDE))
    unit = composite_alpha(to_unit_range(frame.pixels, frame.value_range), WHITE)
    unit = unit.expand(-1, 3, -1, -1)
    height, width = unit.shape[-2:]
    scale = min(1.0, MAP_SIDE / max(height, width))
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    unit = TF.resize(unit, size, antialias=True).clamp(0, 1)
    unit = unit.to(next(scorer.parameters()).device, torch.float32)
    if params["map"] == "cam":
        _, patches = scorer.classify_with_map(*scorer.preprocess(unit, "0,1"))
        grid, mode = patches[:, index, None].float(), InterpolationMode.BILINEAR
    else:  # each cell is hidden as a whole: shown as blocks
        grid, mode = (
            _occlusion_cells(scorer, unit, index, params["cells"]),
            InterpolationMode.NEAREST,
        )
    grid = grid.nan_to_num(1.0).clamp(0, 1)
    return TF.resize(grid, size, interpolation=mode)[0, 0].cpu()


def _occlusion_cells(scorer: NSFWScorer, unit: Tensor, level: int, cells: int) -> Tensor:
    """``[1, 1, cells, cells]``: how much hiding each cell lowers the score; where no cell
    alone lowers it by :data:`~nsfw_guard.check.MIN_DROP`, the most any 2 x 2 block of cells
    that covers it does (a shape across a cell's edge shows only in blocks), as
    ``action="regions"`` searches."""
    drops = scorer.occlusion_map(unit, level, cells).float()
    if cells > 1:
        blocks = scorer.occlusion_map(unit, level, cells, window=2).float()
        padded = F.pad(blocks, [1, 1, 1, 1], value=float("-inf"))
        found = drops.flatten(1).amax(dim=1) >= MIN_DROP
        drops = torch.where(found[:, None, None, None], drops, F.max_pool2d(padded, 2, stride=1))
    return drops


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
