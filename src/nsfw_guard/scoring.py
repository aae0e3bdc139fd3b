"""The scoring graph: images → preprocess → classifier → level scores, as one module."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode

from .levels import cumulative_scores, mark_unverifiable
from .preprocess import DataConfig, Preprocess, resized_size, to_unit_range

__all__ = [
    "COMPILE_BUCKETS",
    "REGION_MAP_MODES",
    "VARIANT_CHUNK",
    "NSFWScorer",
    "region_grid",
    "score_in_chunks",
]

COMPILE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""The batch sizes the classifier is compiled for: a batch runs padded to the next one, and a
larger one in chunks of the largest, so at most this many compilations ever happen."""
COMPILE_MODE = "max-autotune-no-cudagraphs"
"""``torch.compile``'s mode for ``compile=True``: autotuned kernels; no CUDA graphs, since
callers' batches vary."""
logger = logging.getLogger("nsfw_guard")


class NSFWScorer(nn.Module):
    """Score image tensors in-graph: ``[B, C, H, W]`` images → ``[B, 4]`` float32 scores.

    Column 0 is P(neutral), columns 1-3 P(level >= low / medium / high). Images with NaN or Inf
    pixels, and any image whose scores come out NaN, get the worst case (0, 1, 1, 1). No host
    sync and no Python branch on tensor values, so it runs under ``torch.export`` and CUDA graphs.

    ``compile``: run the classifier through ``torch.compile`` (``mode`` :data:`COMPILE_MODE`, or
    a dict of ``torch.compile`` options), one compilation per batch size in
    :data:`COMPILE_BUCKETS`, each logged once with its time. ``None`` (the default) compiles on
    CUDA only: on CPUs it was measured not to pay (README). Settable: ``scorer.compile = False``.

    Example:
        >>> import tempfile, torch
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.testing import make_checkpoint
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp(), level="low"), device="cpu")
        >>> scorer = NSFWScorer(loaded.model, loaded.data_config)
        >>> scorer(torch.rand(2, 3, 64, 64)).argmax(dim=1).tolist()
        [1, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        data_config: DataConfig,
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
        compile: bool | dict[str, Any] | None = None,
    ):
        super().__init__()
        self.preprocess = Preprocess(data_config, background)
        self.model = model
        self.compile = compile
        # The compiled forward and the options it was compiled with, kept out of the module tree
        # (its weights are the model's); compiled again if the options change.
        self._compiled: tuple[str, Callable[[Tensor], Tensor]] | None = None
        self._compiled_buckets: set[int] = set()

    def forward(self, images: Tensor, value_range: str = "auto") -> Tensor:
        pixels, verifiable = self.preprocess(images, value_range)
        return self.classify(pixels, verifiable)

    def classify(self, pixels: Tensor, verifiable: Tensor) -> Tensor:
        """Scores for already preprocessed float32 ``pixels`` and their ``verifiable`` mask."""
        dtype = next(self.model.parameters()).dtype
        compile = self.compile if self.compile is not None else pixels.device.type == "cuda"
        if compile is not False and not torch.compiler.is_compiling():
            logits = self._compiled_logits(pixels.to(dtype))
        else:
            logits = self.model(pixels.to(dtype))
        return mark_unverifiable(cumulative_scores(logits), verifiable)

    def _compiled_logits(self, pixels: Tensor) -> Tensor:
        """The classifier's logits through its compiled forward, a bucket-sized batch at a time."""
        options = self.compile if isinstance(self.compile, dict) else {"mode": COMPILE_MODE}
        key = repr(sorted(options.items()))
        if self._compiled is None or self._compiled[0] != key:
            self._compiled = key, torch.compile(self.model.forward, dynamic=False, **options)
            self._compiled_buckets = set()
        forward = self._compiled[1]
        largest = COMPILE_BUCKETS[-1]
        logits = []
        for chunk in pixels.split(largest):
            count = chunk.shape[0]
            bucket = next(size for size in COMPILE_BUCKETS if size >= count)
            padded = F.pad(chunk, (0, 0, 0, 0, 0, 0, 0, bucket - count))
            if bucket in self._compiled_buckets:
                logits.append(forward(padded)[:count])
                continue
            start = time.perf_counter()
            logits.append(forward(padded)[:count])
            self._compiled_buckets.add(bucket)
            logger.info(
                "nsfw-guard: compiled the classifier for batches of %d on %s in %.1f s",
                bucket,
                padded.device,
                time.perf_counter() - start,
            )
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def classify_with_map(self, pixels: Tensor, verifiable: Tensor) -> tuple[Tensor, Tensor]:
        """Scores, and ``[B, 4, h, w]`` level scores per patch, from the same forward pass.

        The model averages its patch tokens before ``fc_norm`` and ``head``; the patch map
        applies the same norm and head to each token (a CAM-style map; the norm after pooling
        makes it no exact decomposition of the scores). Unverifiable images get the worst case
        on every patch.

        Example:
            >>> scorer, images = detector.scorer, torch.rand(2, 3, 64, 64)
            >>> scores, patches = scorer.classify_with_map(*scorer.preprocess(images))
            >>> torch.equal(scores, scorer(images)), patches.shape
            (True, torch.Size([2, 4, 32, 32]))
        """
        model = self.model
        pooling = getattr(model, "global_pool", None)
        if pooling != "avg" or getattr(model, "attn_pool", None):
            raise ValueError(
                "a patch map needs a model that averages its patch tokens (timm global_pool="
                f"'avg'); {type(model).__name__} pools with {pooling!r}."
            )
        dtype = next(model.parameters()).dtype
        tokens = model.forward_features(pixels.to(dtype))
        scores = mark_unverifiable(cumulative_scores(model.forward_head(tokens)), verifiable)
        patches = tokens[:, model.num_prefix_tokens :]
        count, height_width = patches.shape[1], tuple(model.patch_embed.grid_size)
        patch_logits = model.head(model.fc_norm(patches)).flatten(0, 1)
        patch_scores = mark_unverifiable(
            cumulative_scores(patch_logits), verifiable.repeat_interleave(count)
        )
        patch_scores = patch_scores.view(-1, *height_width, patch_scores.shape[-1])
        return scores, patch_scores.permute(0, 3, 1, 2)

    def occlusion_map(
        self, images: Tensor, level: int | Tensor, cells: int = 4, value_range: str = "0,1"
    ) -> Tensor:
        """Per cell of a ``cells x cells`` grid over the image, how much it makes the image score
        at ``level`` (an index, or ``[B]`` indices): ``[B, 1, cells, cells]`` in [-1, 1].

        A weighted mean (:data:`OCCLUSION_WEIGHTS`) of how much hiding the cell lowers the score
        (filled with the image's mean colour), the most that hiding a 2 x 2 block of cells
        covering it does, and how much showing it alone (the rest hidden) raises the score over
        the image all hidden. The blocks find what a single cell cannot hide (a shape across a
        cell's edge, two parts each enough alone); the single cells tell apart a block's cells;
        showing a cell alone tells apart the cells that still tie (a model that a sliver of the
        shape flags). Scored at the size the classifier resizes to, in one batch of
        ``B x (2 + 2 cells² + (cells - 1)²)`` images (43 at 4 cells), :data:`VARIANT_CHUNK` per
        forward. NaN where the image cannot be scored (NaN or Inf pixels).

        Example:
            >>> scorer, images = detector.scorer, torch.rand(2, 3, 64, 64)
            >>> drops = scorer.occlusion_map(images, level=2, cells=3)
            >>> drops.shape, bool(drops.abs().max() < 1e-3)  # a forced "medium": nothing helps
            (torch.Size([2, 1, 3, 3]), True)
        """
        batch, _, height, width = images.shape
        unverifiable = ~torch.isfinite(images).flatten(1).all(dim=1)
        size = resized_size(height, width, self.preprocess.config)
        unit = self.preprocess.resize(to_unit_range(images, value_range), size).clamp(0, 1)
        size = list(unit.shape[-2:])  # "center" crops resize the shorter side to one number
        alone = _hidden_blocks(size, cells, 1, unit.device)
        blocks = _hidden_blocks(size, cells, 2, unit.device)  # none for one cell
        nothing = torch.zeros_like(alone[:1])
        # The image, each cell hidden, each block hidden, each cell alone shown, all hidden.
        hidden = torch.cat([nothing, alone, blocks, ~alone, ~nothing])
        fill = unit.mean(dim=(-2, -1), keepdim=True)[:, None]
        variants = torch.where(hidden[None, :, None], fill, unit[:, None]).flatten(0, 1)
        count = hidden.shape[0]
        scores = score_in_chunks(self, variants, "0,1").view(batch, count, -1)
        if isinstance(level, Tensor):
            at_level = scores.gather(2, level.view(-1, 1, 1).expand(-1, count, 1))[..., 0]
        else:
            at_level = scores[..., level]
        base, cells_hidden, blocks_hidden, shown, blank = at_level.split(
            [1, alone.shape[0], blocks.shape[0], alone.shape[0], 1], dim=1
        )
        single = (base - cells_hidden).view(batch, 1, cells, cells)
        best_block = single
        if cells > 1:  # each cell: the most any of the (up to 4) blocks covering it lowers it
            drops = (base - blocks_hidden).view(batch, 1, cells - 1, cells - 1)
            best_block = F.max_pool2d(F.pad(drops, [1, 1, 1, 1], value=-1.0), 2, stride=1)
        gain = (shown - blank).view(batch, 1, cells, cells)
        hidden_weight, block_weight, shown_weight = OCCLUSION_WEIGHTS
        value = hidden_weight * single + block_weight * best_block + shown_weight * gain
        nan = torch.full_like(value, float("nan"))
        return torch.where(unverifiable[:, None, None, None], nan, value)


OCCLUSION_WEIGHTS = (0.45, 0.45, 0.1)
"""How :meth:`NSFWScorer.occlusion_map` weighs, per cell, the drop from hiding it, the largest
drop from hiding a 2 x 2 block covering it, and the gain from showing it alone."""
VARIANT_CHUNK = 32
"""Images scored per forward where one image becomes many (occlusion variants, region
candidates): bounds the activations' memory, whatever the batch."""


REGION_MAP_MODES = {"cam": InterpolationMode.BILINEAR, "occlusion": InterpolationMode.NEAREST}
"""How each region map is stretched over its image: the patch map smoothly, the occlusion map's
cells as blocks (each was hidden whole)."""


def region_grid(
    scorer: nn.Module,
    images: Tensor,
    level: int,
    map: str = "occlusion",
    cells: int = 4,
    value_range: str = "0,1",
) -> Tensor:
    """``[B, 1, h, w]`` float32: the region map ``map`` (``"occlusion"``: see
    :meth:`NSFWScorer.occlusion_map`, ``cells x cells``; ``"cam"``: each patch's score, see
    :meth:`NSFWScorer.classify_with_map`) of ``images`` at ``level`` (an index), 1 (the worst
    case) where an image cannot be scored. Stretch it over the image with
    :data:`REGION_MAP_MODES`.

    Example:
        >>> region_grid(detector.scorer, torch.rand(2, 3, 64, 64), 2, cells=3).shape
        torch.Size([2, 1, 3, 3])
    """
    if map == "cam":
        _, patches = scorer.classify_with_map(*scorer.preprocess(images, value_range))
        grid = patches[:, level, None]
    else:
        grid = scorer.occlusion_map(images, level, cells, value_range)
    return grid.float().nan_to_num(1.0)


def score_in_chunks(scorer: nn.Module, images: Tensor, value_range: str = "auto") -> Tensor:
    """``scorer(images, value_range)``, :data:`VARIANT_CHUNK` images per forward.

    Example:
        >>> scores = score_in_chunks(detector.scorer, torch.rand(40, 3, 32, 32), "0,1")
        >>> scores.shape
        torch.Size([40, 4])
    """
    return torch.cat([scorer(chunk, value_range) for chunk in images.split(VARIANT_CHUNK)])


def _hidden_blocks(
    size: list[int], cells: int, window: int, device: torch.device | str = "cpu"
) -> Tensor:
    """``[n², H, W]`` bool: each ``window x window`` block of a ``cells x cells`` grid over an
    image of ``size``, stepping one cell (``n = cells - window + 1``), row by row."""
    height, width = size
    blocks = cells - window + 1
    starts = torch.arange(blocks, device=device)[:, None]
    rows = (torch.arange(height, device=device) * cells // height)[None]
    columns = (torch.arange(width, device=device) * cells // width)[None]
    hidden_rows = (rows >= starts) & (rows < starts + window)
    hidden_columns = (columns >= starts) & (columns < starts + window)
    return (hidden_rows[:, None, :, None] & hidden_columns[None, :, None, :]).flatten(0, 1)
