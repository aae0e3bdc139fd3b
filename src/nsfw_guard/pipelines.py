"""``guard(pipe)``: attach the NSFW check to any diffusers pipeline, and ``unguard`` it again.

Two ways in, both on the decoded tensor, on the pipeline's device:

- Pipelines with a ``safety_checker`` component (the Stable Diffusion family): the checker is
  registered as that component, and the pipeline's ``run_safety_checker`` is replaced on this
  instance by a tensor-native one (no feature extractor, no PIL, no ``.cpu()`` of the images).
  ``output.nsfw_content_detected`` is filled as usual.
- Every other pipeline (SDXL, SD3, Flux, PixArt, Sana, video pipelines, ...): the check runs where
  the pipeline postprocesses its decoded images (``image_processor.postprocess`` or
  ``video_processor.postprocess``), and censored images keep that place's value range.

Failures are closed: an image that could not be checked is never returned uncensored.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import Tensor
from transformers import CLIPImageProcessor

from . import DEFAULT_MODEL, censor
from .detector import NSFWDetector
from .levels import NSFWLevel, check_threshold, parse_check_level
from .preprocess import to_unit_range
from .safety_checker import NSFWSafetyChecker

__all__ = ["ON_ERROR", "Guard", "GuardResult", "GuardWarning", "guard", "unguard"]

ON_ERROR = ("block", "raise")
_MISSING = object()
_WORST = (0.0, 1.0, 1.0, 1.0)


class GuardWarning(UserWarning):
    """Something was blocked or could not be checked; the message says what and why."""


@dataclass(frozen=True)
class GuardResult:
    """The verdict on one image of a guarded pipeline call.

    ``level`` is the highest level whose score reached the threshold, ``scores`` the four level
    scores, ``flagged`` whether the image was censored. ``reason`` says why an image was blocked
    without a verdict (NaN/Inf pixels, a failed check); those get the worst-case scores.
    ``original`` is the uncensored image (``[3, H, W]`` float in [0, 1], CPU), only with
    ``keep_originals=True``.
    """

    level: NSFWLevel
    scores: dict[NSFWLevel, float]
    flagged: bool
    reason: str | None = None
    original: Tensor | None = None


class Guard:
    """A guard attached to one pipeline: its checker, settings and the last call's results.

    Made by :func:`guard`; ``remove()`` restores the pipeline exactly as it was.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        checker: NSFWSafetyChecker,
        on_error: str,
        keep_originals: bool,
    ):
        self.pipe = pipe
        self.checker = checker
        self.on_error = on_error
        self.keep_originals = keep_originals
        self.last: list[GuardResult] = []
        """One result per image of the last pipeline call (per frame for video)."""
        self._restore: list[Callable[[], None]] = []
        self._call_open = False
        self._warned_unchecked = False

    @property
    def level(self) -> NSFWLevel:
        return self.checker.check_step.level

    @property
    def threshold(self) -> float:
        return self.checker.check_step.threshold

    def remove(self) -> None:
        """Detach: the pipeline's components, config and methods are as they were before."""
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self.checker.keep_on(None)
        if self.pipe.__dict__.get("_nsfw_guard") is self:
            del self.pipe.__dict__["_nsfw_guard"]

    # Attaching ---------------------------------------------------------------------------------

    def _attach(self) -> None:
        if _has_safety_checker_slot(self.pipe):
            self._attach_as_safety_checker()
        else:
            self._attach_to_postprocess()
        self._wrap(self.pipe, "maybe_free_model_hooks", self._after_call)
        self.pipe.__dict__["_nsfw_guard"] = self

    def _attach_as_safety_checker(self) -> None:
        pipe = self.pipe
        components = {"safety_checker": self.checker}
        if "feature_extractor" in pipe.components and pipe.feature_extractor is None:
            # diffusers refuses to load a pipeline whose checker has no feature extractor; a
            # config-only processor lets a saved guarded pipeline reload (it is not used here).
            components["feature_extractor"] = CLIPImageProcessor()
        previous = {name: getattr(pipe, name) for name in components}
        pipe.register_modules(**components)
        self._restore.append(lambda: pipe.register_modules(**previous))
        self._wrap(pipe, "run_safety_checker", lambda original: self._run_safety_checker)

    def _attach_to_postprocess(self) -> None:
        processors = [
            getattr(self.pipe, name, None) for name in ("image_processor", "video_processor")
        ]
        processors = [p for p in processors if callable(getattr(p, "postprocess", None))]
        if not processors:
            raise ValueError(
                f"{type(self.pipe).__name__} has neither a safety_checker component nor an "
                "image_processor/video_processor postprocess step that nsfw-guard can hook. "
                "Check its output with NSFWDetector instead."
            )
        for processor in processors:
            self._wrap(
                processor,
                "postprocess",
                lambda original, p=processor: self._postprocess(p, original),
            )

    def _wrap(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        """Set ``owner.name`` on the instance to ``make(current)``; remember how to undo it."""
        before = owner.__dict__.get(name, _MISSING)
        owner.__dict__[name] = make(getattr(owner, name))

        def restore() -> None:
            if before is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = before

        self._restore.append(restore)

    # Per call ------------------------------------------------------------------------------------

    def _run_safety_checker(
        self, image: Tensor | np.ndarray, device: Any = None, dtype: Any = None
    ):
        """The tensor-native ``run_safety_checker``: ``(images, [flagged, ...])``."""
        if isinstance(image, np.ndarray):  # a few pipelines decode to numpy BHWC in [0, 1]
            pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
            checked, flags = self._check(pixels, "0,1", "unit", device)
            return checked.permute(0, 2, 3, 1).cpu().numpy(), flags
        return self._check(image, "-1,1", "unit", device)

    def _postprocess(self, processor: Any, original: Callable) -> Callable:
        def postprocess(image: Any, *args: Any, **kwargs: Any) -> Any:
            output_type = kwargs.get("output_type", args[0] if args else "pil")
            if output_type == "latent" or not torch.is_tensor(image):
                return original(image, *args, **kwargs)
            denormalize = kwargs.get("do_denormalize", args[1] if len(args) > 1 else None)
            value_range = _postprocess_range(processor, denormalize)
            checked, _ = self._check(image, value_range, "input")
            return original(checked, *args, **kwargs)

        return postprocess

    def _after_call(self, original: Callable) -> Callable:
        """Wrap ``maybe_free_model_hooks``, which diffusers pipelines call as they return."""

        def maybe_free_model_hooks(*args: Any, **kwargs: Any) -> Any:
            self._end_of_call()
            return original(*args, **kwargs)

        return maybe_free_model_hooks

    def _end_of_call(self) -> None:
        if not self._call_open:
            self.last = []
            if not self._warned_unchecked:
                self._warned_unchecked = True
                warnings.warn(
                    "nsfw-guard: a pipeline call finished without checking any image (with "
                    "output_type='latent' nothing is decoded, so nothing can be checked). "
                    "Check decoded images yourself, e.g. with NSFWDetector.",
                    GuardWarning,
                    stacklevel=3,
                )
        self._call_open = False

    def _check(
        self, images: Tensor, value_range: str, flagged_range: str, device: Any = None
    ) -> tuple[Tensor, list[bool]]:
        """Check a batch; fail closed. The only host transfer is the verdicts, at the end."""
        count = images.shape[0]
        try:
            self._place_checker(torch.device(device) if device is not None else images.device)
            output = self.checker.check(images, value_range, flagged_range)
            verdicts = torch.cat(
                [output.scores, output.flags[:, None].float(), output.verifiable[:, None].float()],
                dim=1,
            ).tolist()
            checked = output.images
        except Exception as error:
            if self.on_error == "raise":
                raise
            warnings.warn(
                f"nsfw-guard: the NSFW check failed ({type(error).__name__}: {error}); all "
                f"{count} image(s) of this batch are blanked and flagged.",
                GuardWarning,
                stacklevel=3,
            )
            reason = f"check failed: {type(error).__name__}: {error}"
            checked = self._blanked(images, value_range, flagged_range)
            verdicts = [[*_WORST, 1.0, 0.0]] * count
        else:
            reason = "NaN or Inf pixels"
            unverifiable = sum(1 for row in verdicts if not row[5])
            if unverifiable:
                warnings.warn(
                    f"nsfw-guard: {unverifiable} image(s) had NaN or Inf pixels (an fp16 VAE "
                    "overflow?) and could not be checked; they are blanked and flagged.",
                    GuardWarning,
                    stacklevel=3,
                )
        originals = self._originals(images, value_range)
        results = [
            GuardResult(
                level=NSFWLevel.parse(sum(score >= self.threshold for score in row[1:4])),
                scores=dict(zip(NSFWLevel, row[:4], strict=True)),
                flagged=bool(row[4]),
                reason=None if row[5] else reason,
                original=originals[i] if originals is not None else None,
            )
            for i, row in enumerate(verdicts)
        ]
        if not self._call_open:
            self.last, self._call_open = [], True
        self.last.extend(results)
        return checked, [result.flagged for result in results]

    def _place_checker(self, device: torch.device) -> None:
        """Run on the pipeline's device; under model CPU offload, stay there between calls."""
        self.checker.keep_on(None)
        self.checker.to(device)
        if getattr(self.pipe, "_all_hooks", None) and device.type != "cpu":
            self.checker.keep_on(device)

    def _blanked(self, images: Tensor, value_range: str, flagged_range: str) -> Tensor:
        color = self.checker.check_step.fill_color
        filled = censor.blank(torch.zeros_like(images, dtype=torch.float32), color)
        if flagged_range == "input" and value_range != "0,1":
            filled = filled * 2.0 - 1.0
        return filled.to(images.dtype)

    def _originals(self, images: Tensor, value_range: str) -> list[Tensor] | None:
        if not self.keep_originals:
            return None
        try:
            return list(to_unit_range(images, value_range).cpu().unbind(0))
        except Exception:
            return None


def guard(
    pipe: DiffusionPipeline,
    *,
    level: NSFWLevel | str | int = "medium",
    threshold: float = 0.5,
    action: censor.Action = "blur",
    model: str | os.PathLike | NSFWDetector | None = None,
    on_error: str = "block",
    keep_originals: bool = False,
    blur_radius: float = censor.DEFAULT_BLUR_RADIUS,
    pixelate_block_size: int | None = None,
    fill_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Guard:
    """Check every image ``pipe`` generates; censor those at or above ``level`` with ``action``.

    ``action`` is ``"blur"``, ``"pixelate"``, ``"blank"`` (``fill_color``), ``"none"`` (flag only)
    or a callable ``(images in [0, 1]) -> images``. ``model`` is a Hub id, a local folder or an
    :class:`NSFWDetector` whose weights (and dtype) are shared; ``None`` is
    ``Freepik/nsfw_image_detector``. The classifier runs on the pipeline's device, in bf16 on
    CUDA and float32 on CPUs without native bf16, whatever the pipeline's dtype.
    ``on_error="block"`` blanks and flags images whose check raised, with a warning;
    ``"raise"`` re-raises. Guarding a guarded pipeline replaces its guard.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline
        >>> pipe = make_tiny_pipeline("sd")
        >>> g = guard(pipe, model=make_checkpoint(tempfile.mkdtemp(), level="high"), action="blank")
        >>> out = pipe("a prompt", num_inference_steps=2, output_type="np")
        >>> out.nsfw_content_detected, float(out.images.max()), g.last[0].level
        ([True], 0.0, <NSFWLevel.HIGH: 'high'>)
        >>> unguard(pipe)
    """
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"guard() takes a diffusers pipeline, not a {type(pipe).__name__}.")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: expected one of {', '.join(ON_ERROR)}.")
    settings = {
        "level": parse_check_level(level).value,
        "threshold": check_threshold(threshold),
        "action": censor.check_action(action),
        "blur_radius": blur_radius,
        "pixelate_block_size": pixelate_block_size,
        "fill_color": tuple(fill_color),
    }
    if isinstance(model, NSFWDetector):  # share its weights, in its dtype
        dtype = str(model.dtype).removeprefix("torch.")
        checker = NSFWSafetyChecker.from_loaded(model.checkpoint, dtype=dtype, **settings)
    else:
        checker = NSFWSafetyChecker.from_pretrained(model or DEFAULT_MODEL, **settings)
    unguard(pipe)
    attached = Guard(pipe, checker, on_error, bool(keep_originals))
    attached._attach()
    return attached


def unguard(pipe: DiffusionPipeline) -> None:
    """Remove the guard from ``pipe``, if it has one.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline
        >>> pipe = make_tiny_pipeline("sdxl")
        >>> _ = guard(pipe, model=make_checkpoint(tempfile.mkdtemp()))
        >>> unguard(pipe)
        >>> "_nsfw_guard" in pipe.__dict__
        False
    """
    existing = pipe.__dict__.get("_nsfw_guard")
    if existing is not None:
        existing.remove()


def _has_safety_checker_slot(pipe: DiffusionPipeline) -> bool:
    """Whether ``pipe`` calls ``run_safety_checker(image, device, dtype)`` with its checker."""
    method = getattr(type(pipe), "run_safety_checker", None)
    if "safety_checker" not in pipe.components or method is None:
        return False
    return list(inspect.signature(method).parameters)[1:] == ["image", "device", "dtype"]


def _postprocess_range(processor: Any, do_denormalize: list[bool] | None) -> str:
    """The value range of images reaching ``processor.postprocess``."""
    if do_denormalize is None:
        return "-1,1" if getattr(processor.config, "do_normalize", True) else "0,1"
    if all(do_denormalize):
        return "-1,1"
    return "0,1" if not any(do_denormalize) else "auto"
