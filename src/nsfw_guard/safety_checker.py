"""``NSFWSafetyChecker``: the check step as a diffusers pipeline component.

A ``ModelMixin + ConfigMixin``, so ``pipe.to(...)`` moves it, ``pipe.save_pretrained`` saves it
and ``DiffusionPipeline.from_pretrained`` reloads it (once ``nsfw_guard`` is imported). Called the
way diffusers' stock code calls a safety checker, ``checker(images=..., clip_input=...)``, it
honours that contract: flagged images come back in [0, 1], the others untouched.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, ClassVar

import numpy as np
import timm
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from . import DEFAULT_MODEL, censor
from .check import CheckOutput, CheckStep
from .levels import NSFWLevel
from .model import ARCHITECTURE, LABELS, LoadedModel, default_dtype, load_model, resolve_folder
from .preprocess import DataConfig
from .scoring import NSFWScorer

__all__ = ["DTYPES", "ModelMixin", "NSFWSafetyChecker"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The checker's own dtype: ``auto`` is bf16 on CUDA and on CPUs with native bf16, else float32."""

_SETTINGS = (
    "level",
    "threshold",
    "action",
    "blur_radius",
    "pixelate_block_size",
    "fill_color",
    "dtype",
)


class NSFWSafetyChecker(ModelMixin, ConfigMixin):
    """The 4-level NSFW check as a diffusers component: score, flag at a level, censor.

    The classifier keeps its own dtype (``dtype`` config) whatever ``pipe.to(dtype)`` asks: the
    pipeline's fp16 is not the classifier's. A callable ``action`` works but is not saved: a
    reloaded checker blanks instead.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.testing import make_checkpoint
        >>> checker = NSFWSafetyChecker.from_pretrained(
        ...     make_checkpoint(tempfile.mkdtemp(), level="high"), action="blank"
        ... )
        >>> images, flags = checker(images=torch.rand(2, 3, 64, 64) * 2 - 1, clip_input=None)
        >>> flags, images.max().item()
        ([True, True], 0.0)
    """

    ignore_for_config: ClassVar[list[str]] = ["model"]  # the classifier: weights, not config

    @register_to_config
    def __init__(
        self,
        architecture: str = ARCHITECTURE,
        model_args: dict[str, Any] | None = None,
        pretrained_cfg: dict[str, Any] | None = None,
        level: str = "medium",
        threshold: float = 0.5,
        action: censor.Action = "blur",
        blur_radius: float = censor.DEFAULT_BLUR_RADIUS,
        pixelate_block_size: int | None = None,
        fill_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
        dtype: str = "auto",
        model: nn.Module | None = None,
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}.")
        if callable(action):
            self.register_to_config(action="custom")  # a function cannot be saved
        elif action == "custom":
            warnings.warn(
                "this checker was saved with a custom (callable) action, which is not saved; "
                "flagged images are blanked instead.",
                stacklevel=2,
            )
            action = "blank"
        if model is None:
            model = timm.create_model(
                architecture, pretrained=False, num_classes=len(LABELS), **(model_args or {})
            )
            model.eval().requires_grad_(False)
        data_config = DataConfig.from_pretrained_cfg(
            {**model.pretrained_cfg, **(pretrained_cfg or {})}
        )
        # Both checked whatever the action: a bad setting fails here, not at generation time.
        params = {
            "blur": censor.check_params("blur", {"radius": blur_radius}),
            "pixelate": censor.check_params("pixelate", {"block_size": pixelate_block_size}),
        }
        self.check_step = CheckStep(
            NSFWScorer(model, data_config),
            level=NSFWLevel.parse(level),
            threshold=threshold,
            action=action,
            censor_params=params.get(action, {}) if isinstance(action, str) else {},
            fill_color=tuple(fill_color),
        )
        self._kept_on: torch.device | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike = DEFAULT_MODEL, **kwargs: Any
    ) -> NSFWSafetyChecker:
        """Load a saved checker, or build one around a classifier checkpoint (Hub id or folder).

        Settings (``level``, ``threshold``, ``action``, ``blur_radius``, ``pixelate_block_size``,
        ``fill_color``, ``dtype``) override the saved ones. ``revision``, ``cache_dir`` and
        ``local_files_only`` select the checkpoint; the pipeline's ``torch_dtype`` is ignored.

        Example:
            >>> import tempfile
            >>> from nsfw_guard.testing import make_checkpoint
            >>> checker = NSFWSafetyChecker.from_pretrained(make_checkpoint(tempfile.mkdtemp()))
            >>> checker.config.level, checker.config.action
            ('medium', 'blur')
        """
        kwargs.pop("torch_dtype", None)
        folder = resolve_folder(
            pretrained_model_name_or_path,
            kwargs.get("revision"),
            kwargs.get("local_files_only"),
            kwargs.get("cache_dir"),
        )
        if kwargs.get("subfolder"):
            folder = folder / kwargs.pop("subfolder")
        config_path = folder / "config.json"
        saved = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if saved.get("_class_name") == cls.__name__:
            checker = super().from_pretrained(folder, **kwargs)
        else:
            device = torch.device("cpu")
            loaded = load_model(
                folder, device=device, dtype=_dtype(kwargs.get("dtype", "auto"), device)
            )
            checker = cls.from_loaded(loaded, **{k: v for k, v in kwargs.items() if k in _SETTINGS})
        return checker.to(checker.device)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **settings: Any) -> NSFWSafetyChecker:
        """A checker around an already loaded classifier (its weights are shared, not copied).

        ``NSFWDetector.checkpoint`` is one: ``NSFWSafetyChecker.from_loaded(detector.checkpoint)``.
        """
        return cls(
            architecture=loaded.architecture,
            model_args=loaded.model_args,
            pretrained_cfg=loaded.data_config.to_pretrained_cfg(),
            model=loaded.model,
            **settings,
        )

    def to(self, *args: Any, **kwargs: Any) -> NSFWSafetyChecker:
        """Move to a device, keeping the checker's own dtype; stay put while kept on a device."""
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        device = self._kept_on or (torch.device(device) if device is not None else self.device)
        # nn.Module's own: ModelMixin.to only adds quantization checks and a spurious warning.
        nn.Module.to(self, device=device, non_blocking=non_blocking)
        # Only the classifier takes the checker's dtype: preprocessing constants stay float32.
        self.check_step.scorer.model.to(dtype=_dtype(self.config.dtype, device))
        return self

    def keep_on(self, device: torch.device | str | None) -> None:
        """Ignore moves away from ``device`` (``None`` ends it).

        Model CPU offload moves every component to the CPU and back after each call; keeping the
        checker on the accelerator avoids copying its weights twice per call.
        """
        self._kept_on = torch.device(device) if device is not None else None

    @torch.inference_mode()
    def check(
        self, images: Tensor, value_range: str = "-1,1", flagged_range: str = "unit"
    ) -> CheckOutput:
        """Run the in-graph check step on ``images`` (see :class:`nsfw_guard.check.CheckStep`)."""
        return self.check_step.run(images, value_range, flagged_range)

    def forward(self, images: Tensor | np.ndarray, clip_input: Any = None):
        """diffusers' safety-checker call: ``(images, [flagged, ...])``; ``clip_input`` is unused.

        A tensor is read as the VAE's decoded ``[-1, 1]`` images, a numpy ``BHWC`` array as
        ``[0, 1]``; flagged images come back censored in [0, 1], in the same form.
        """
        if isinstance(images, np.ndarray):
            pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
            output = self.check(pixels, "0,1")
            checked = output.images.permute(0, 2, 3, 1).cpu().numpy()
        else:
            output = self.check(images, "-1,1")
            checked = output.images
        return checked, output.flags.tolist()


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}.")
    return default_dtype(device) if name == "auto" else getattr(torch, name)
