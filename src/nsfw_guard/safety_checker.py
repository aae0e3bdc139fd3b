"""``NSFWSafetyChecker``: the check step as a diffusers pipeline component.

Like diffusers' own ``StableDiffusionSafetyChecker``, it is a transformers ``PreTrainedModel``, so
diffusers treats it as it treats its own checkers: ``pipe.to(...)`` moves it,
``pipe.save_pretrained`` saves it, ``DiffusionPipeline.from_pretrained`` reloads it (once
``nsfw_guard`` is imported) and ``from_pipe`` carries it to the new pipeline (diffusers drops a
diffusers ``ModelMixin`` component whose type differs from the slot's type hint). Called the way
diffusers' stock code calls a safety checker, ``checker(images=..., clip_input=...)``, it honours
that contract: flagged images come back in [0, 1], the others untouched.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from . import DEFAULT_MODEL, censor
from .check import CheckOutput, CheckStep
from .levels import NSFWLevel
from .model import ARCHITECTURE, LABELS, LoadedModel, default_dtype, load_model, resolve_folder
from .preprocess import DataConfig
from .scoring import NSFWScorer

# diffusers finds the save/load methods of a component through the base class names its module
# exposes: PreTrainedModel must be importable from here.
__all__ = ["DTYPES", "NSFWSafetyChecker", "NSFWSafetyCheckerConfig", "PreTrainedModel"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The checker's own dtype: ``auto`` is bf16 on CUDA and on CPUs with native bf16, else float32."""

SETTINGS = (
    "level",
    "threshold",
    "action",
    "blur_radius",
    "pixelate_block_size",
    "fill_color",
    "early_stop",
    *(f"region_{name}" for name in censor.REGION_DEFAULTS),
)
"""What a checker decides and how it censors, and when a guard stops runs early: the arguments
``guard()`` passes on (``early_stop`` as :meth:`nsfw_guard.EarlyStop.to_config` gives it)."""

WEIGHTS_NAME = "model.safetensors"
# Written by nsfw-guard 0.1.0, when the checker was a diffusers ModelMixin.
_LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class NSFWSafetyCheckerConfig(PretrainedConfig):
    """The checker's settings and the classifier's recipe (not its weights)."""

    model_type = "nsfw_guard_safety_checker"

    def __init__(
        self,
        architecture: str = ARCHITECTURE,
        model_args: dict[str, Any] | None = None,
        pretrained_cfg: dict[str, Any] | None = None,
        level: str = "medium",
        threshold: float = 0.5,
        action: str = "blur",
        blur_radius: float = censor.DEFAULT_BLUR_RADIUS,
        pixelate_block_size: int | None = None,
        fill_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
        classifier_dtype: str = "auto",
        early_stop: dict[str, Any] | None = None,
        region_margin: float = censor.DEFAULT_REGION_MARGIN,
        region_shape: str = "rect",
        region_feather: float = 0.0,
        region_censor: str = "blur",
        region_map: str = "occlusion",
        region_cells: int = censor.DEFAULT_REGION_CELLS,
        **kwargs: Any,
    ):
        self.architecture = architecture
        self.model_args = dict(model_args or {})
        self.pretrained_cfg = dict(pretrained_cfg or {})
        self.level = NSFWLevel.parse(level).value
        self.threshold = threshold
        self.action = action
        self.blur_radius = blur_radius
        self.pixelate_block_size = pixelate_block_size
        self.fill_color = list(fill_color)
        self.classifier_dtype = _check_dtype_name(classifier_dtype)
        self.early_stop = dict(early_stop) if early_stop is not None else None
        self.region_margin = region_margin
        self.region_shape = region_shape
        self.region_feather = region_feather
        self.region_censor = region_censor
        self.region_map = region_map
        self.region_cells = region_cells
        super().__init__(**kwargs)


class NSFWSafetyChecker(PreTrainedModel):
    """The 4-level NSFW check as a diffusers component: score, flag at a level, censor.

    The classifier keeps its own dtype (``classifier_dtype``) whatever ``pipe.to(dtype)`` asks: the
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

    config_class = NSFWSafetyCheckerConfig
    main_input_name = "images"

    def __init__(
        self,
        config: NSFWSafetyCheckerConfig,
        model: nn.Module | None = None,
        action: censor.Action | None = None,
    ):
        super().__init__(config)
        action = config.action if action is None else action
        if callable(action):
            config.action = "custom"  # a function cannot be saved
        elif action != "custom":
            config.action = censor.check_action(action)
        else:
            warnings.warn(
                "this checker was saved with a custom (callable) action, which is not saved; "
                "flagged images are blanked instead.",
                stacklevel=2,
            )
            action = config.action = "blank"
        if model is None:
            model = timm.create_model(
                config.architecture, pretrained=False, num_classes=len(LABELS), **config.model_args
            )
            model.eval().requires_grad_(False)
        data_config = DataConfig.from_pretrained_cfg(
            {**model.pretrained_cfg, **config.pretrained_cfg}
        )
        # Both checked whatever the action: a bad setting fails here, not at generation time.
        params = {
            "blur": censor.check_params("blur", {"radius": config.blur_radius}),
            "pixelate": censor.check_params("pixelate", {"block_size": config.pixelate_block_size}),
        }
        params["regions"] = censor.check_params(
            "regions",
            {
                **{name: getattr(config, f"region_{name}") for name in censor.REGION_DEFAULTS},
                **params.get(config.region_censor, {}),
            },
        )
        self.check_step = CheckStep(
            NSFWScorer(model, data_config),
            level=config.level,
            threshold=config.threshold,
            action=action,
            censor_params=params.get(action, {}) if isinstance(action, str) else {},
            fill_color=tuple(config.fill_color),
        )
        self._kept_on: torch.device | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the classifier checkpoint; transformers must not re-initialise them."""

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike = DEFAULT_MODEL, **kwargs: Any
    ) -> NSFWSafetyChecker:
        """Load a saved checker, or build one around a classifier checkpoint (Hub id or folder).

        Settings (``level``, ``threshold``, ``action``, ``blur_radius``, ``pixelate_block_size``,
        ``fill_color``) override the saved ones; ``dtype`` is the classifier's (``"auto"``,
        ``"float32"``, ``"bfloat16"``, ``"float16"``): a ``torch.dtype`` there, such as the
        pipeline's that diffusers passes on, is ignored. ``revision``, ``cache_dir``,
        ``local_files_only`` and ``subfolder`` select the folder; diffusers' other loading
        arguments are ignored.

        Example:
            >>> import tempfile
            >>> from nsfw_guard.testing import make_checkpoint
            >>> checker = NSFWSafetyChecker.from_pretrained(make_checkpoint(tempfile.mkdtemp()))
            >>> checker.config.level, checker.config.action
            ('medium', 'blur')
        """
        folder = resolve_folder(
            pretrained_model_name_or_path,
            kwargs.get("revision"),
            kwargs.get("local_files_only"),
            kwargs.get("cache_dir"),
        )
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        settings = {k: kwargs[k] for k in SETTINGS if k in kwargs}
        dtype = kwargs.get("dtype")
        if isinstance(dtype, str):
            settings["classifier_dtype"] = _check_dtype_name(dtype)
        saved = _read_saved_config(folder)
        if saved is None:  # a classifier checkpoint: the Hub's format or timm's
            device = torch.device("cpu")
            name = settings.get("classifier_dtype", "auto")
            loaded = load_model(folder, device=device, dtype=_dtype(name, device))
            checker = cls.from_loaded(loaded, **settings)
        else:
            action = settings.pop("action", None)
            config = NSFWSafetyCheckerConfig(**{**saved, **settings})
            checker = cls(config, action=action)
            checker.check_step.scorer.model.load_state_dict(_read_saved_weights(folder))
        return checker.to(checker.device)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **settings: Any) -> NSFWSafetyChecker:
        """A checker around an already loaded classifier (its weights are shared, not copied).

        ``NSFWDetector.checkpoint`` is one: ``NSFWSafetyChecker.from_loaded(detector.checkpoint)``.
        ``settings`` are the config's (``level``, ..., ``classifier_dtype``).
        """
        action = settings.pop("action", None)
        config = NSFWSafetyCheckerConfig(
            architecture=loaded.architecture,
            model_args=loaded.model_args,
            pretrained_cfg=loaded.data_config.to_pretrained_cfg(),
            **settings,
        )
        return cls(config, model=loaded.model, action=action)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``config.json`` and the classifier's weights (``model.safetensors``).

        diffusers' ``pipe.save_pretrained`` calls this; its other arguments are not needed.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        weights = self.check_step.scorer.model.state_dict()
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / WEIGHTS_NAME)

    def to(self, *args: Any, **kwargs: Any) -> NSFWSafetyChecker:
        """Move to a device, keeping the checker's own dtype; stay put while kept on a device."""
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        device = self._kept_on or (torch.device(device) if device is not None else self.device)
        # nn.Module's own: PreTrainedModel.to only adds quantization checks.
        nn.Module.to(self, device=device, non_blocking=non_blocking)
        # Only the classifier takes the checker's dtype: preprocessing constants stay float32.
        self.check_step.scorer.model.to(dtype=_dtype(self.config.classifier_dtype, device))
        return self

    def keep_on(self, device: torch.device | str | None) -> None:
        """Ignore moves away from ``device`` (``None`` ends it).

        Model CPU offload moves every component to the CPU and back after each call; keeping the
        checker on the accelerator avoids copying its weights twice per call.
        """
        self._kept_on = torch.device(device) if device is not None else None

    @torch.inference_mode()
    def check(
        self,
        images: Tensor,
        value_range: str = "-1,1",
        flagged_range: str = "unit",
        flag_all: bool = False,
    ) -> CheckOutput:
        """Run the in-graph check step on ``images`` (see :class:`nsfw_guard.check.CheckStep`)."""
        return self.check_step.run(images, value_range, flagged_range, flag_all)

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


def _read_saved_config(folder: Path) -> dict[str, Any] | None:
    """The settings of a checker saved in ``folder``; ``None`` for a classifier checkpoint."""
    path = folder / "config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("model_type") == NSFWSafetyCheckerConfig.model_type:
        return {k: v for k, v in saved.items() if k not in ("model_type", "transformers_version")}
    if saved.get("_class_name") == NSFWSafetyChecker.__name__:  # nsfw-guard 0.1.0
        settings = {k: v for k, v in saved.items() if not k.startswith("_")}
        settings["classifier_dtype"] = settings.pop("dtype", "auto")
        return settings
    return None


def _read_saved_weights(folder: Path) -> dict[str, Tensor]:
    for name in (WEIGHTS_NAME, _LEGACY_WEIGHTS_NAME):
        if (folder / name).is_file():
            weights = load_file(folder / name)
            prefix = "check_step.scorer.model."  # 0.1.0 saved the whole component
            return {k.removeprefix(prefix): v for k, v in weights.items()}
    raise FileNotFoundError(f"{folder} has a saved NSFWSafetyChecker config but no {WEIGHTS_NAME}.")


def _check_dtype_name(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}.")
    return name


def _dtype(name: str, device: torch.device) -> torch.dtype:
    name = _check_dtype_name(name)
    return default_dtype(device) if name == "auto" else getattr(torch, name)
