"""The scoring graph: images → preprocess → classifier → level scores, as one module."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .levels import cumulative_scores, mark_unverifiable
from .preprocess import DataConfig, Preprocess

__all__ = ["COMPILE_BUCKETS", "NSFWScorer"]

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
        # The compiled forward, kept out of the module tree (its weights are the model's).
        self._compiled: dict[str, Callable[[Tensor], Tensor]] = {}
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
        if key not in self._compiled:
            self._compiled = {key: torch.compile(self.model.forward, dynamic=False, **options)}
            self._compiled_buckets = set()
        forward = self._compiled[key]
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
