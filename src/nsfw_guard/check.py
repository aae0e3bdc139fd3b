"""The in-graph check step: decoded images → scores → flags → censored images, on one device.

Every integration runs this one module: the diffusers guard and its checker component call
:meth:`CheckStep.run`; ``nsfw-guard scan`` and ``check``, which preprocess in worker processes,
call its stages (:meth:`CheckStep.verdicts`, :meth:`CheckStep.censor`) on the same settings. So
"no host sync, no Python branch on tensor values" is proven once, by exporting it with
``torch.export``, and a verdict means the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from . import censor
from .inputs import parse_value_range
from .levels import NSFWLevel, check_threshold, levels_from_scores, parse_check_level
from .preprocess import to_unit_range, unit_affine
from .scoring import NSFWScorer, region_grid, score_in_chunks

__all__ = [
    "FLAGGED_RANGES",
    "CheckOutput",
    "CheckStep",
    "Verdicts",
    "from_unit_range",
    "levels_and_flags",
    "worst_frames",
]

FLAGGED_RANGES = ("unit", "input")
"""Where censored images come back: ``"unit"`` in [0, 1] (what diffusers' Stable Diffusion
pipelines expect from a safety checker), ``"input"`` in the input's own value range."""


class CheckOutput(NamedTuple):
    """The check step's results, all on the images' device."""

    images: Tensor
    """The input with flagged images censored; unflagged images are the input's, bit for bit."""
    flags: Tensor
    """``[B]`` bool: the score at the level reached the threshold, or the image is unverifiable."""
    scores: Tensor
    """``[B, 4]`` float32 level scores."""
    verifiable: Tensor
    """``[B]`` bool: false for images with NaN or Inf pixels (blanked, whatever the action)."""
    region_map: Tensor | None = None
    """With ``run(..., with_map=True)``: ``[B, 1, H, W]`` float32, each patch's score at the
    check level, upsampled to the images' size (see :meth:`NSFWScorer.classify_with_map`)."""


class Verdicts(NamedTuple):
    """Per-image verdicts, all on the scores' device."""

    scores: Tensor
    """``[B, 4]`` float32 level scores (an animation's: its worst frame's, level by level)."""
    levels: Tensor
    """``[B]`` int64: the highest level index whose score reached the threshold (0: neutral)."""
    flags: Tensor
    """``[B]`` bool: the score at the check level reached the threshold, or it is unverifiable."""
    verifiable: Tensor
    """``[B]`` bool: false for images with NaN or Inf pixels (in any frame)."""


class CheckStep(nn.Module):
    """Decoded images ``[B, 3, H, W]`` → ``(images_out, flags, scores)``, in-graph.

    Scores every image, flags those whose score at ``level`` is ``>= threshold`` (and those with
    NaN or Inf pixels, which cannot be verified), and censors the flagged ones with ``action``:
    images that could not be verified are blanked with ``fill_color`` whatever the action
    (``"blank"`` uses it too). ``censor_params`` go to the action (``radius=``, ``block_size=``;
    for ``"regions"`` see :meth:`censor_regions`). Any device and dtype; the output keeps the
    input's.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.testing import make_checkpoint
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp(), level="high"), device="cpu")
        >>> step = CheckStep(NSFWScorer(loaded.model, loaded.data_config), action="blank")
        >>> images, flags, scores = step(torch.rand(2, 3, 64, 64) * 2 - 1)
        >>> flags.tolist(), images.abs().max().item()
        ([True, True], 0.0)
    """

    def __init__(
        self,
        scorer: NSFWScorer,
        *,
        level: NSFWLevel | str | int = NSFWLevel.MEDIUM,
        threshold: float = 0.5,
        action: censor.Action = "blur",
        censor_params: dict[str, Any] | None = None,
        fill_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ):
        super().__init__()
        self.scorer = scorer
        self.level = parse_check_level(level)
        self.threshold = check_threshold(threshold)
        self.action = censor.check_action(action)
        self.fill_color = tuple(censor.check_color(fill_color, channels=3))
        self.censor_params = censor.check_params(self.action, censor_params or {})
        if self.action == "blank":
            self.censor_params.setdefault("color", self.fill_color)
        if self.action == "regions":
            self.censor_params = {**censor.REGION_DEFAULTS, **self.censor_params}

    def forward(
        self, images: Tensor, value_range: str = "-1,1", flagged_range: str = "unit"
    ) -> tuple[Tensor, Tensor, Tensor]:
        output = self.run(images, value_range, flagged_range)
        return output.images, output.flags, output.scores

    def run(
        self,
        images: Tensor,
        value_range: str = "-1,1",
        flagged_range: str = "unit",
        flag_all: bool = False,
        with_map: bool = False,
    ) -> CheckOutput:
        """Like ``forward``, with the ``verifiable`` mask as well; ``flag_all`` flags (and
        censors) every image whatever its scores (a run stopped early); ``with_map`` adds the
        region map from the same forward pass.

        Example:
            >>> step = CheckStep(detector.scorer, level="medium")  # a "medium" checkpoint
            >>> output = step.run(torch.rand(2, 3, 64, 96) * 2 - 1, with_map=True)
            >>> output.region_map.shape, bool(output.region_map.min() > 0.99)
            (torch.Size([2, 1, 64, 96]), True)
        """
        value_range = parse_value_range(value_range)
        if flagged_range not in FLAGGED_RANGES:
            raise ValueError(f"flagged_range={flagged_range!r}: expected one of {FLAGGED_RANGES}.")
        pixels, verifiable = self.scorer.preprocess(images, value_range)
        region_map = None
        if with_map:
            scores, patch_scores = self.scorer.classify_with_map(pixels, verifiable)
            at_level = patch_scores[:, self.level.index, None]
            region_map = TF.resize(
                at_level, list(images.shape[-2:]), interpolation=InterpolationMode.BILINEAR
            ).to(images.device)
        else:
            scores = self.scorer.classify(pixels, verifiable)
        verdicts = self.verdicts(scores, verifiable)
        device = images.device
        flags, verifiable = verdicts.flags.to(device), verdicts.verifiable.to(device)
        if flag_all:
            flags = torch.ones_like(flags)
        out = self.censor(images, flags, verifiable, value_range, flagged_range)
        return CheckOutput(out, flags, verdicts.scores.to(device), verifiable, region_map)

    def verdicts(
        self,
        scores: Tensor,
        verifiable: Tensor,
        owners: Tensor | None = None,
        count: int = 0,
        *,
        levels: Tensor | None = None,
        thresholds: Tensor | None = None,
    ) -> Verdicts:
        """Levels and flags from ``[N, 4]`` scores (see :meth:`NSFWScorer.classify`), at the
        step's level and threshold, or at each image's own (``levels``: level indices,
        ``thresholds``: ``[count]`` tensors; see :func:`levels_and_flags`).

        With ``owners`` (``[N]`` int64, the image each row belongs to) and ``count`` images, the
        rows are frames: an image scores as its worst frame, level by level, and is verifiable
        only if every frame is. In-graph: segment reductions, no host sync.

        Example:
            >>> import tempfile
            >>> from nsfw_guard.model import load_model
            >>> from nsfw_guard.testing import make_checkpoint
            >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp()), device="cpu")
            >>> step = CheckStep(NSFWScorer(loaded.model, loaded.data_config), level="medium")
            >>> frames = torch.tensor([[0.75, 0.25, 0.0, 0.0], [0.25, 0.75, 0.5, 0.125]])
            >>> ok, owners = torch.tensor([True, True]), torch.tensor([0, 0])
            >>> verdicts = step.verdicts(frames, ok, owners, count=1)
            >>> verdicts.scores.tolist(), verdicts.levels.tolist(), verdicts.flags.tolist()
            ([[0.25, 0.75, 0.5, 0.125]], [2], [True])
        """
        if owners is not None:
            scores, verifiable = worst_frames(scores, verifiable, owners, count)
        level = self.level.index if levels is None else levels
        threshold = self.threshold if thresholds is None else thresholds
        found, flags = levels_and_flags(scores, verifiable, level, threshold)
        return Verdicts(scores, found, flags, verifiable)

    def censor(
        self,
        images: Tensor,
        flags: Tensor,
        verifiable: Tensor,
        value_range: str = "-1,1",
        flagged_range: str = "unit",
    ) -> Tensor:
        """``images`` with the flagged ones censored (the unverifiable ones blanked), in-graph.

        Flagged images come back in [0, 1] (``flagged_range="unit"``) or in the input's own range
        (``"input"``); the others are the input's, bit for bit.
        """
        unit = to_unit_range(images, value_range)
        if self.action == "regions":
            censored = self.censor_regions(unit, verifiable)
        else:
            censored = censor.apply(unit, verifiable, self.action, **self.censor_params)
        censored = censor.apply(censored, ~verifiable, "blank", color=self.fill_color)
        if flagged_range == "input":
            censored = from_unit_range(censored, images, value_range)
        return torch.where(flags[:, None, None, None], censored.to(images.dtype), images)

    def whole_frames(self) -> CheckStep:
        """This step, censoring whole images: for ``action="regions"``, its ``censor`` action
        (with its ``radius`` or ``block_size``) over the whole image; else the step itself.

        Example:
            >>> CheckStep(detector.scorer, action="regions").whole_frames().action
            'blur'
        """
        if self.action != "regions":
            return self
        action, params = self._whole_censor()
        return CheckStep(
            self.scorer,
            level=self.level,
            threshold=self.threshold,
            action=action,
            censor_params=params,
            fill_color=self.fill_color,
        )

    def _whole_censor(self) -> tuple[censor.Action, dict[str, Any]]:
        """``action="regions"``'s own censor (``"blur"`` or ``"pixelate"``) and its parameters:
        what a whole image gets where no region clears its flag."""
        params = self.censor_params
        kept = {name: params[name] for name in ("radius", "block_size") if name in params}
        return params["censor"], kept

    def censor_regions(self, unit: Tensor, verifiable: Tensor) -> Tensor:
        """``action="regions"``: ``[B, 3, H, W]`` images in [0, 1] with only the regions that
        made them flagged censored, or censored whole wherever that did not clear the flag.

        The step's ``censor_params``: ``map``, ``cells``, ``margin``, ``shape``, ``feather`` and
        ``censor`` (``"blur"`` or ``"pixelate"``, with its ``radius`` or ``block_size``). With
        ``map="occlusion"`` the cells of a ``cells x cells`` grid are ranked by
        :meth:`NSFWScorer.occlusion_map`, and the top 1, 2, 3, 4, 6, 9… cells (see
        :func:`region_sizes`), each set grown by the margin, are censored and scored again: the
        smallest set whose image no longer reaches the threshold at the step's level is the one
        returned. With ``map="cam"``, the patches whose own score reaches the threshold, scored
        again the same way. Where no set clears the flag, the image is censored whole, as by
        ``censor``: a wrong map costs selectivity, never lets flagged content out. In-graph.

        Example:
            >>> step = CheckStep(detector.scorer, action="regions")  # a "medium" checkpoint
            >>> images = torch.rand(1, 3, 64, 64)
            >>> out = step.censor_regions(images, torch.tensor([True]))
            >>> torch.equal(out, censor.blur(images))  # no region clears it: censored whole
            True
        """
        params = self.censor_params
        base, base_params = self._whole_censor()
        whole = censor.apply(unit, verifiable, base, **base_params)
        level = self.level.index
        # Where an image cannot be scored its map is 1 everywhere; it is censored whole below.
        grid = region_grid(self.scorer, unit, level, params["map"], params["cells"])
        if params["map"] == "cam":
            candidates = (grid >= self.threshold)[:, None]
        else:
            candidates = _top_cells(grid, region_sizes(params["cells"]))
        batch, count = candidates.shape[:2]
        alpha = censor.region_alpha(
            candidates.flatten(0, 1).float(),
            0.5,
            unit.shape[-2:],
            margin=params["margin"],
            shape=params["shape"],
            feather=params["feather"],
        )
        # [B, count, 3, H, W]: each image's candidates, broadcast (no copies of the images).
        regions = censor.censor_regions(
            unit[:, None], whole[:, None], alpha.view(batch, count, *alpha.shape[1:])
        )
        recheck = score_in_chunks(self.scorer, regions.flatten(0, 1), "0,1")
        _, still_flagged = levels_and_flags(
            recheck, verifiable.repeat_interleave(count), level, self.threshold
        )
        cleared = ~still_flagged.view(batch, count)
        # The first (smallest) set that clears the flag; the whole image where none does.
        first = cleared.int().argmax(dim=1)
        pick = first.view(batch, 1, 1, 1, 1).expand(batch, 1, *unit.shape[1:])
        chosen = regions.gather(1, pick)[:, 0]
        return torch.where(cleared.any(dim=1)[:, None, None, None], chosen, whole)


def region_sizes(cells: int) -> list[int]:
    """How many of the top cells of a ``cells x cells`` map ``action="regions"`` tries to
    censor: 1 to 4, then half as many again each time, below ``cells²`` (all of them is the
    whole image).

    Example:
        >>> region_sizes(4), region_sizes(2), region_sizes(1)
        ([1, 2, 3, 4, 6, 9, 14], [1, 2, 3], [1])
    """
    total = cells * cells
    sizes = [size for size in (1, 2, 3, 4) if size < total] or [1]
    while math.ceil(sizes[-1] * 1.5) < total:
        sizes.append(math.ceil(sizes[-1] * 1.5))
    return sizes


def _top_cells(ranking: Tensor, sizes: list[int]) -> Tensor:
    """``[B, len(sizes), 1, n, n]`` bool: each image's ``size`` highest cells of ``ranking``
    (``[B, 1, n, n]``; ties in grid order), for each size. In-graph: a sort, no host sync."""
    batch, _, rows, columns = ranking.shape
    rank = ranking.flatten(1).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    top = torch.stack([rank < size for size in sizes], dim=1)
    return top.view(batch, len(sizes), 1, rows, columns)


def levels_and_flags(
    scores: Tensor, verifiable: Tensor, level: int | Tensor, threshold: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Each image's level (the highest whose score is ``>= threshold``) and flag (its score at
    ``level`` is ``>= threshold``, or it is not ``verifiable``), from ``[N, 4]`` scores: the one
    place a verdict is decided. ``level`` (an index) and ``threshold`` are one for every image,
    or ``[N]`` tensors, one each. In-graph, in the scores' dtype.

    Example:
        >>> scores = torch.tensor([[0.1, 0.9, 0.6, 0.2], [0.1, 0.9, 0.6, 0.2]])
        >>> ok = torch.tensor([True, True])
        >>> levels_and_flags(scores, ok, 2, 0.5)
        (tensor([2, 2]), tensor([True, True]))
        >>> levels_and_flags(scores, ok, torch.tensor([2, 3]), torch.tensor([0.5, 0.1]))
        (tensor([2, 3]), tensor([True, True]))
    """
    if isinstance(threshold, Tensor):
        levels = levels_from_scores(scores, threshold[:, None])
    else:
        levels = levels_from_scores(scores, threshold)
    if isinstance(level, Tensor):
        at_level = scores.gather(1, level[:, None])[:, 0]
    else:
        at_level = scores[:, level]
    return levels, (at_level >= threshold) | ~verifiable


def worst_frames(
    scores: Tensor, verifiable: Tensor, owners: Tensor, count: int
) -> tuple[Tensor, Tensor]:
    """Per image of ``count``: the highest score of its frames (``owners`` says whose each row
    is) at each level >= low, the lowest neutral; verifiable only if every frame is. In-graph.

    Example:
        >>> frames = torch.tensor([[0.75, 0.25, 0.0, 0.0], [0.25, 0.75, 0.5, 0.125]])
        >>> scores, ok = worst_frames(frames, torch.tensor([True, False]), torch.tensor([0, 0]), 1)
        >>> scores.tolist(), ok.tolist()
        ([[0.25, 0.75, 0.5, 0.125]], [False])
    """
    index = owners[:, None].expand(-1, scores.shape[1])
    worst = scores.new_zeros(count, scores.shape[1])
    worst = worst.scatter_reduce(0, index, scores, reduce="amax", include_self=False)
    least_neutral = scores.new_zeros(count).scatter_reduce(
        0, owners, scores[:, 0], reduce="amin", include_self=False
    )
    worst = torch.cat([least_neutral[:, None], worst[:, 1:]], dim=1)
    # In uint8: CUDA has no scatter-reduce for bool.
    ok = torch.ones(count, dtype=torch.uint8, device=verifiable.device).scatter_reduce(
        0, owners, verifiable.to(torch.uint8), reduce="amin", include_self=False
    )
    return worst, ok.bool()


def from_unit_range(unit: Tensor, like: Tensor, value_range: str) -> Tensor:
    """Map [0, 1] images back to the value range of ``like`` (uint8: 0-255, rounded).

    Example:
        >>> unit = torch.tensor([[[[0.0, 1.0]]]])
        >>> from_unit_range(unit, torch.zeros(1, 1, 1, 2), "-1,1").tolist()
        [[[[-1.0, 1.0]]]]
    """
    if like.dtype == torch.uint8:
        return (unit * 255.0).round_()
    _, _, scale, offset = unit_affine(like.to(torch.float32), value_range)
    return (unit - offset) / scale
