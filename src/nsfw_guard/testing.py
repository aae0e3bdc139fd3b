"""Testing integrations offline: random-weight checkpoints in the Hub's exact format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import timm
import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from .levels import NSFWLevel
from .model import LABELS, quiet_transformers

__all__ = ["ARCHITECTURE", "TINY_MODEL_ARGS", "make_checkpoint"]

ARCHITECTURE = "eva02_base_patch14_448"
PRETRAINED_TAG = "mim_in22k_ft_in22k_in1k"
TINY_MODEL_ARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2}
"""The real EVA02 architecture and 448x448 input, with one narrow block (65k parameters)."""

_FORCED_LOGIT = 30.0


def make_checkpoint(
    path: str | os.PathLike,
    *,
    size: Literal["tiny", "full"] = "tiny",
    level: NSFWLevel | str | int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random-weight checkpoint in the Hub's ``timm_wrapper`` format and return its folder.

    ``tiny`` keeps the real architecture, input size and preprocessing with one narrow block;
    ``full`` is the real size (86M parameters). ``level`` forces that class to win for every input
    (head weights zero, a large bias), while the rest of the network still runs. The global RNG is
    left untouched.

    Example:
        >>> import tempfile
        >>> from nsfw_guard import NSFWDetector
        >>> folder = make_checkpoint(tempfile.mkdtemp(), level="high")
        >>> NSFWDetector.from_pretrained(folder, device="cpu").is_nsfw(torch.rand(3, 64, 64))
        True
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size={size!r}: expected 'tiny' or 'full'.")
    pretrained_cfg = timm.models.get_pretrained_cfg(f"{ARCHITECTURE}.{PRETRAINED_TAG}").to_dict()
    pretrained_cfg.pop("num_classes", None)
    config = TimmWrapperConfig(
        architecture=ARCHITECTURE,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        pretrained_cfg=pretrained_cfg,
        model_args=dict(TINY_MODEL_ARGS) if size == "tiny" else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TimmWrapperForImageClassification(config).eval()
    if level is not None:
        head = model.timm_model.head
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[NSFWLevel.parse(level).index] = _FORCED_LOGIT
    folder = Path(path)
    with quiet_transformers():
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder
