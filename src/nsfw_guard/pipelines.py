"""``guard(pipe)``: check every image a diffusers pipeline returns, and ``unguard`` it again.

A guard is one :class:`Guard` object kept on the pipeline (``pipe._nsfw_guard``). What it
attached, and how to undo it, is data on that object, not closures, so ``copy.deepcopy`` and
``pickle`` give a pipeline with its own independent guard, and ``copy.copy`` one with a fresh guard
of its own. Attaching changes only the pipeline instance:

- Its class becomes a subclass of its own class, with the same name: its ``__call__`` opens and
  closes each call's state (``Guard.last``) and checks whatever the pipeline returns that was not
  checked on the way, its ``run_safety_checker`` (where the pipeline has one) is the
  tensor-native check, returning what the call site unpacks.
- The Stable Diffusion family: the checker is registered as the ``safety_checker`` component, so
  ``save_pretrained`` saves it and ``from_pipe`` carries it (see :mod:`nsfw_guard.safety_checker`).
- Other pipelines: the pipeline's ``image_processor`` / ``video_processor`` is replaced by a copy
  that checks the decoded tensors in its ``postprocess``.
- The decoder (or denoiser) it shares with pipelines made by ``from_pipe`` gets a forward pre-hook
  that warns when it runs for a pipeline that is not guarded.

Failures are closed: an image that could not be checked is never returned uncensored.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import CLIPImageProcessor

from . import DEFAULT_MODEL, censor
from .check import from_unit_range
from .denoising import scheduler_family, x0_estimate
from .detector import NSFWDetector
from .early_stop import EarlyCheck, EarlyCheckOutput, EarlyStop, decoder_for
from .latent_layouts import LatentLayout, call_size, layout_of
from .levels import WORST_SCORES, NSFWLevel, check_threshold, parse_check_level
from .pipeline_outputs import locate_images
from .pipeline_support import PipelineSupport, pipeline_support
from .preprocess import to_unit_range
from .safety_checker import NSFWSafetyChecker, NSFWSafetyCheckerConfig

__all__ = [
    "ON_ERROR",
    "Guard",
    "GuardError",
    "GuardResult",
    "GuardWarning",
    "SafePreviews",
    "guard",
    "unguard",
]

ON_ERROR = ("block", "raise")
_DECODERS = ("vae", "movq", "vqvae")
_DENOISERS = ("unet", "transformer", "prior", "decoder")
# Where a warning is not attributed: it points at the first frame outside these.
_LIBRARIES = ("nsfw_guard", "diffusers", "transformers", "accelerate", "torch")


class GuardWarning(UserWarning):
    """Something was blocked or could not be checked; the message says what and why."""


class GuardError(RuntimeError):
    """A guarded pipeline's output could not be checked, so it was not returned."""


@dataclass(frozen=True)
class GuardResult:
    """The verdict on one image of a guarded pipeline call.

    ``level`` is the highest level whose score reached the threshold, ``scores`` the four level
    scores, ``flagged`` whether the image was censored. ``reason`` says why an image was blocked
    without a verdict (NaN/Inf pixels, a failed check); those get the worst-case scores.
    ``original`` is the uncensored image (``[C, H, W]`` float in [0, 1], CPU), only with
    ``keep_originals=True``. With early stop, ``early_scores`` maps each step checked while
    denoising (0-based) to the scores of the image's x0 estimate there, and ``stopped_at`` is the
    step after which the run was stopped (its images are flagged whatever the final check says).
    """

    level: NSFWLevel
    scores: dict[NSFWLevel, float]
    flagged: bool
    reason: str | None = None
    original: Tensor | None = None
    stopped_at: int | None = None
    early_scores: dict[int, dict[NSFWLevel, float]] = field(default_factory=dict)


class _Call:
    """One guarded pipeline call in progress: the results of the images checked so far, its
    checks while denoising, and how many of the caller's step callbacks are running (what they
    check, previews, is censored but is not the call's output)."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.results: list[GuardResult] = []
        self.denoising: _Denoising | None = None
        self.callbacks_running = 0

    def mark(self, callback: Any) -> Any:
        """``callback`` (a step callback the caller passed) telling this call while it runs."""
        if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
            return _MarkedCallbacks(callback, self)  # diffusers reads their tensor_inputs

        @functools.wraps(callback)
        def marked(*args: Any, **kwargs: Any) -> Any:
            self.callbacks_running += 1
            try:
                return callback(*args, **kwargs)
            finally:
                self.callbacks_running -= 1

        return marked


class _MarkedCallbacks(MultiPipelineCallbacks):
    """A ``PipelineCallback`` (or several) that tells the call it runs in, as
    :meth:`_Call.mark` does for functions."""

    def __init__(self, callback: PipelineCallback | MultiPipelineCallbacks, state: _Call):
        super().__init__([callback])
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.state.callbacks_running += 1
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.state.callbacks_running -= 1


_STEP_CALLBACKS = ("callback_on_step_end", "callback")
"""The arguments through which a caller runs code during denoising (``callback``: the older
one, ``callback(step, timestep, latents)``)."""


_ACTIVE_CALL: ContextVar[_Call | None] = ContextVar("nsfw_guard_active_call", default=None)
# Pipelines already warned that they run a guarded pipeline's modules unguarded.
_WARNED_UNGUARDED: weakref.WeakSet[DiffusionPipeline] = weakref.WeakSet()


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
        early_stop: EarlyStop | None = None,
    ):
        self.pipe = pipe
        self.checker = checker
        self.on_error = on_error
        self.keep_originals = keep_originals
        self.early_stop = early_stop
        self.last: list[GuardResult] = []
        """One result per image of the last pipeline call (per frame for video); ``[]`` when it
        checked nothing or raised."""
        # What attaching changed, to undo it: the components and processors it replaced, and
        # the hooks it added.
        self._components_before: dict[str, Any] = {}
        self._processors_before: dict[str, VaeImageProcessor] = {}
        self._watches: list[RemovableHandle] = []

    @property
    def level(self) -> NSFWLevel:
        return self.checker.check_step.level

    @property
    def threshold(self) -> float:
        return self.checker.check_step.threshold

    @property
    def support(self) -> PipelineSupport:
        """What nsfw-guard read from the pipeline's class (:mod:`nsfw_guard.pipeline_support`)."""
        return pipeline_support(_base_class(type(self.pipe)))

    def __repr__(self) -> str:
        return (
            f"Guard({_base_class(type(self.pipe)).__name__}, level={self.level.value!r}, "
            f"threshold={self.threshold}, action={self.checker.config.action!r})"
        )

    def remove(self) -> None:
        """Detach: the pipeline's class, components, processors and config are as they were."""
        if self.pipe.__dict__.get("_nsfw_guard") is not self:
            return  # already removed, or replaced by another guard
        self._undo_on(self.pipe)
        for handle in self._watches:
            handle.remove()
        self._watches.clear()
        self.checker.keep_on(None)

    # Attaching ---------------------------------------------------------------------------------

    def _attach(self) -> None:
        pipe, support = self.pipe, self.support
        if support.checker_slot:
            self._register_checker()
        elif support.checker_values is None:
            self._guard_processors()
        self._watch_shared_modules()
        pipe.__dict__["_nsfw_guard"] = self
        pipe.__class__ = guarded_class(_base_class(type(pipe)))

    def _register_checker(self) -> None:
        pipe = self.pipe
        components: dict[str, Any] = {"safety_checker": self.checker}
        if getattr(pipe, "feature_extractor", None) is None:
            # diffusers refuses to build or load a pipeline whose checker has no feature
            # extractor; a config-only processor lets from_pipe and a reload work.
            components["feature_extractor"] = CLIPImageProcessor()
        self._components_before = {name: getattr(pipe, name) for name in components}
        pipe.register_modules(**components)

    def _guard_processors(self) -> None:
        for name in ("image_processor", "video_processor"):
            processor = self.pipe.__dict__.get(name)
            if not isinstance(processor, VaeImageProcessor) or name in self.pipe.config:
                continue
            checked = copy.copy(processor)
            checked.__class__ = _guarded_subclass(_GuardedProcessor, _base_class(type(processor)))
            checked.__dict__["_nsfw_guard"] = self
            self._processors_before[name] = processor
            self.pipe.__dict__[name] = checked

    def _watch_shared_modules(self) -> None:
        owner = _base_class(type(self.pipe)).__name__
        for name, module in _shared_modules(self.pipe):
            watch = _SharedModuleWatch(owner, name)
            self._watches.append(module.register_forward_pre_hook(watch))

    def _undo_on(self, pipe: DiffusionPipeline) -> None:
        """Give ``pipe`` (this guard's pipeline, or a copy of it) back what attaching replaced."""
        for name, original in self._processors_before.items():
            current = pipe.__dict__.get(name)
            if isinstance(current, _GuardedProcessor) and current._nsfw_guard is self:
                pipe.__dict__[name] = original
        if self._components_before and getattr(pipe, "safety_checker", None) is self.checker:
            pipe.register_modules(**self._components_before)
        pipe.__dict__.pop("_nsfw_guard", None)
        pipe.__class__ = _base_class(type(pipe))

    def _copy_to(self, pipe: DiffusionPipeline) -> Guard:
        """Give ``pipe``, a shallow copy of this guard's pipeline, a guard of its own."""
        self._undo_on(pipe)
        copied = Guard(pipe, self.checker, self.on_error, self.keep_originals, self.early_stop)
        copied._attach()
        return copied

    # Per call ------------------------------------------------------------------------------------

    def previews(
        self, show: Callable[[int, list], Any], every: int = 5, callback: Callable | None = None
    ) -> SafePreviews:
        """A ``callback_on_step_end`` for this guard's pipeline that, every ``every`` steps,
        decodes the x0 estimate (with the early-stop decoder, else the pipeline's VAE), checks
        it and calls ``show(step, images)`` with the censored previews (PIL images). ``callback``
        is your own ``callback_on_step_end``, called after it.

        Example:
            >>> import tempfile
            >>> from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline
            >>> pipe = make_tiny_pipeline("sd")
            >>> g = guard(pipe, model=make_checkpoint(tempfile.mkdtemp()))
            >>> shown = []
            >>> previews = g.previews(lambda step, images: shown.append(step), every=2)
            >>> out = pipe("a prompt", num_inference_steps=4, callback_on_step_end=previews)
            >>> shown
            [1, 3]
        """
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"previews(every={every!r}): expected a whole number of steps >= 1")
        if not callable(show) or (callback is not None and not callable(callback)):
            raise TypeError("previews(show, callback=...) takes functions")
        reason = self._denoising_refusal()
        if reason:
            raise ValueError(f"nsfw-guard cannot make previews here: {reason}.")
        return SafePreviews(self, show, every, callback)

    def _call(self, call: Callable, args: tuple, kwargs: dict) -> Any:
        """Run the pipeline call: ``last`` gets exactly its images' results, ``[]`` if it raised."""
        state = _Call(self)
        token = _ACTIVE_CALL.set(state)
        self.last = []
        try:
            if self.early_stop is not None or isinstance(
                kwargs.get("callback_on_step_end"), SafePreviews
            ):
                state.denoising = _Denoising.attach(self)
            try:
                marked_args, marked_kwargs = self._mark_callbacks(args, kwargs, state)
                output = call(self.pipe, *marked_args, **marked_kwargs)
            finally:
                if state.denoising is not None:
                    state.denoising.detach()
            output_type = self.support.output_type(self.pipe, args, kwargs)
            output = self._check_output(output, output_type, state)
            if state.denoising is not None:
                state.results = state.denoising.annotate(state.results)
        finally:
            _ACTIVE_CALL.reset(token)
        self.last = state.results
        return output

    def _mark_callbacks(self, args: tuple, kwargs: dict, state: _Call) -> tuple[tuple, dict]:
        """The call's arguments with each step callback marked (see :meth:`_Call.mark`), given
        by name or by position."""
        kwargs = dict(kwargs)
        for name in _STEP_CALLBACKS:
            if callable(kwargs.get(name)):
                kwargs[name] = state.mark(kwargs[name])
        signature = self.support.call_signature
        if signature is None or not args:
            return args, kwargs
        args = list(args)
        for index, parameter in enumerate(list(signature.parameters.values())[1 : len(args) + 1]):
            if parameter.kind is not parameter.POSITIONAL_OR_KEYWORD:
                break
            if parameter.name in _STEP_CALLBACKS and callable(args[index]):
                args[index] = state.mark(args[index])
        return tuple(args), kwargs

    def _denoising_refusal(self) -> str | None:
        """Why the pipeline cannot be checked while denoising, in a few words; ``None``: it can."""
        pipe, name = self.pipe, _base_class(type(self.pipe)).__name__
        if not self.support.interruptible:
            return f"{name}'s denoising loop has no interrupt (self.interrupt) to stop it with"
        try:
            layout = layout_of(pipe)
            scheduler_family(getattr(pipe, "scheduler", None))
        except ValueError as error:
            return str(error)
        decoder = self.early_stop.decoder if self.early_stop is not None else None
        if decoder_for(pipe, decoder) is None:
            return f"{name} has no vae to decode latents with; pass EarlyStop(decoder=...)"
        if layout.video and isinstance(decoder, AutoencoderTiny):
            return (
                f"{name} makes videos, which AutoencoderTiny does not decode; leave "
                "EarlyStop(decoder=...) out to decode with its own VAE"
            )
        return None

    def _check_output(self, output: Any, output_type: Any, state: _Call) -> Any:
        """Check the images of ``output`` that were not checked on their way out."""
        name = _base_class(type(self.pipe)).__name__
        if output_type == "latent" and self.support.latent_output:
            if not state.results:
                _warn(
                    f"nsfw-guard: this {name} call returned latents (output_type='latent'), "
                    "which cannot be checked. Check the images you decode from them, e.g. with "
                    "NSFWDetector."
                )
            return output
        located = locate_images(output, self.support)
        if located is None:
            if state.results:
                return output  # checked on the way; nothing else here is an image
            raise GuardError(
                f"nsfw-guard found no images it can check in what {name} returned "
                f"({type(output).__name__}, output_type={output_type!r}), so it is not returned. "
                "Use output_type 'pil', 'np' or 'pt', or unguard the pipeline."
            )
        if len(state.results) >= located.count:
            return output
        device = _execution_device(self.pipe, self.checker)
        checked, results = [], []
        for group in located.groups:
            pixels, group_results = self._check(
                group.load().to(device), group.value_range, "input", device
            )
            checked.append(pixels)
            results.extend(group_results)
        state.results = results
        return located.replace(checked, [result.flagged for result in results])

    def _run_safety_checker(self, image: Tensor | np.ndarray, device: Any, values: int) -> tuple:
        """The tensor-native ``run_safety_checker``: ``(images, flags)`` and ``None`` for each
        further value the call site unpacks (DeepFloyd IF's and the upscaler's watermark flag)."""
        if isinstance(image, np.ndarray):  # numpy BHWC in [0, 1] (DeepFloyd IF, T2I-Adapter)
            pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
            checked, results = self._check(pixels, "0,1", "unit", device)
            checked = checked.permute(0, 2, 3, 1).cpu().numpy()
        else:
            checked, results = self._check(image, "-1,1", "unit", device)
        self._record(results)
        return (checked, [result.flagged for result in results], *([None] * (values - 2)))

    def _postprocess(
        self, processor: VaeImageProcessor, postprocess: Callable, image: Any, args, kwargs
    ) -> Any:
        """``processor.postprocess`` with the decoded images checked first."""
        output_type = kwargs.get("output_type", args[0] if args else "pil")
        if output_type == "latent" or not torch.is_tensor(image):
            return postprocess(image, *args, **kwargs)
        denormalize = kwargs.get("do_denormalize", args[1] if len(args) > 1 else None)
        checked, results = self._check(image, _postprocess_range(processor, denormalize), "input")
        self._record(results)
        return postprocess(checked, *args, **kwargs)

    def _record(self, results: list[GuardResult]) -> None:
        state = _ACTIVE_CALL.get()
        if state is not None and state.guard is self:
            if not state.callbacks_running:  # a callback's previews are not the call's images
                state.results.extend(results)
        else:  # checked outside a pipeline call (its processor called directly)
            self.last = results

    def _check(
        self, images: Tensor, value_range: str, flagged_range: str, device: Any = None
    ) -> tuple[Tensor, list[GuardResult]]:
        """Check a batch; fail closed. The only host transfer is the verdicts, at the end."""
        count = images.shape[0]
        state = _ACTIVE_CALL.get()
        denoising = state.denoising if state is not None and state.guard is self else None
        stopped = denoising.stopped if denoising is not None else None
        try:
            self._place_checker(torch.device(device) if device is not None else images.device)
            output = self.checker.check(images, value_range, flagged_range, flag_all=bool(stopped))
            verdicts = torch.cat(
                [output.scores, output.flags[:, None].float(), output.verifiable[:, None].float()],
                dim=1,
            ).tolist()
            checked = output.images
        except Exception as error:
            if self.on_error == "raise":
                raise
            _warn(
                f"nsfw-guard: the NSFW check failed ({type(error).__name__}: {error}); all "
                f"{count} image(s) of this batch are blanked and flagged."
            )
            reason = f"check failed: {type(error).__name__}: {error}"
            checked = self._blanked(images, value_range, flagged_range)
            verdicts = [[*WORST_SCORES, 1.0, 0.0]] * count
        else:
            reason = "NaN or Inf pixels"
            unverifiable = sum(1 for row in verdicts if not row[5])
            if unverifiable:
                _warn(
                    f"nsfw-guard: {unverifiable} image(s) had NaN or Inf pixels (an fp16 VAE "
                    "overflow?) and could not be checked; they are blanked and flagged."
                )
        originals = self._originals(images, value_range)
        results = [
            GuardResult(
                level=NSFWLevel.parse(sum(score >= self.threshold for score in row[1:4])),
                scores=dict(zip(NSFWLevel, row[:4], strict=True)),
                flagged=bool(row[4]),
                reason=(None if row[5] else reason) or stopped,
                original=originals[i] if originals is not None else None,
            )
            for i, row in enumerate(verdicts)
        ]
        return checked, results

    def _place_checker(self, device: torch.device) -> None:
        """Run on the pipeline's device; under model CPU offload, stay there between calls."""
        self.checker.keep_on(None)
        self.checker.to(device)
        if getattr(self.pipe, "_all_hooks", None) and device.type != "cpu":
            self.checker.keep_on(device)

    def _blanked(self, images: Tensor, value_range: str, flagged_range: str) -> Tensor:
        color = self.checker.check_step.fill_color
        filled = censor.blank(torch.zeros_like(images, dtype=torch.float32), color)
        if flagged_range == "input":
            filled = from_unit_range(filled, images, value_range)
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
    level: NSFWLevel | str | int | None = None,
    threshold: float | None = None,
    action: censor.Action | None = None,
    model: str | os.PathLike | NSFWDetector | NSFWSafetyChecker | None = None,
    on_error: str = "block",
    keep_originals: bool = False,
    blur_radius: float | None = None,
    pixelate_block_size: int | None = None,
    fill_color: tuple[float, float, float] | None = None,
    early_stop: bool | EarlyStop | None = None,
    compile: bool | dict[str, Any] | None = None,
    region_margin: float | None = None,
    region_shape: str | None = None,
    region_feather: float | None = None,
    region_censor: str | None = None,
    region_map: str | None = None,
    region_cells: int | None = None,
) -> Guard:
    """Check every image ``pipe`` generates; censor those at or above ``level`` with ``action``.

    ``action`` is ``"blur"`` (default), ``"pixelate"``, ``"blank"`` (``fill_color``, default
    black), ``"none"`` (flag only), ``"regions"`` (only the regions that made an image flagged,
    blurred or pixelated per ``region_censor``, grown by ``region_margin``, shaped by
    ``region_shape`` and ``region_feather``, found by ``region_map`` on a ``region_cells`` grid;
    the whole image wherever that does not clear the flag: see
    :meth:`nsfw_guard.check.CheckStep.censor_regions`) or a callable
    ``(images in [0, 1]) -> images``; ``level``
    defaults to ``"medium"`` and ``threshold`` to 0.5. ``model`` is a Hub id, a local folder, an
    :class:`NSFWDetector` whose weights (and dtype) are shared, or an :class:`NSFWSafetyChecker`
    (a reloaded pipeline's ``safety_checker``) whose weights are shared and whose saved
    settings, early stop included, are the defaults of those not given. ``None``: the
    ``NSFWSafetyChecker`` of a pipeline reloaded with one (not guarded), else
    ``Freepik/nsfw_image_detector``.
    The classifier runs on the pipeline's device, in bf16 on CUDA and float32 on CPUs without
    native bf16, whatever the pipeline's dtype. ``on_error="block"`` blanks and flags images
    whose check raised, with a warning; ``"raise"`` re-raises. Guarding a guarded pipeline
    replaces its guard. Pipelines that return no images (audio, embeddings, depth) are refused
    with a ValueError saying why. ``early_stop`` (``True`` or an :class:`EarlyStop`) checks the
    images while they are denoised and stops runs whose every image is already clearly flagged
    (see :class:`EarlyStop`); pipelines whose loop cannot be stopped are refused with a
    ValueError saying why. ``compile`` runs the classifier through ``torch.compile`` (see
    :class:`~nsfw_guard.scoring.NSFWScorer`); ``None`` compiles on CUDA only.

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
    base = _base_class(type(pipe))
    refused = pipeline_support(base).refused
    if refused:
        raise ValueError(f"nsfw-guard cannot guard {base.__name__}: {refused}.")
    saved = model
    own = getattr(pipe, "safety_checker", None)
    if model is None and isinstance(own, NSFWSafetyChecker) and "_nsfw_guard" not in vars(pipe):
        saved = own  # a reloaded pipeline's (a guarded one's guard is replaced, as it is)
    if not isinstance(saved, NSFWSafetyChecker):
        saved = None
    given = {
        "level": level,
        "threshold": threshold,
        "action": action,
        "blur_radius": blur_radius,
        "pixelate_block_size": pixelate_block_size,
        "fill_color": fill_color,
        "region_margin": region_margin,
        "region_shape": region_shape,
        "region_feather": region_feather,
        "region_censor": region_censor,
        "region_map": region_map,
        "region_cells": region_cells,
    }
    settings = {**_settings_of(saved), **{k: v for k, v in given.items() if v is not None}}
    settings["level"] = parse_check_level(settings["level"]).value
    settings["threshold"] = check_threshold(settings["threshold"])
    settings["action"] = censor.check_action(settings["action"])
    settings["fill_color"] = tuple(settings["fill_color"])
    if early_stop is None and saved is not None and saved.config.early_stop is not None:
        early_stop = EarlyStop.from_config(saved.config.early_stop)
    if early_stop is True:
        early_stop = EarlyStop()
    elif early_stop is False or early_stop is None:
        early_stop = None
    elif not isinstance(early_stop, EarlyStop):
        raise TypeError(f"early_stop={early_stop!r}: expected True, False or an EarlyStop(...)")
    settings["early_stop"] = early_stop.to_config() if early_stop is not None else None
    if saved is not None:  # its classifier, shared, with these settings
        action = settings.pop("action")
        config = NSFWSafetyCheckerConfig(**{**saved.config.to_dict(), **settings})
        checker = NSFWSafetyChecker(config, model=saved.check_step.scorer.model, action=action)
    elif isinstance(model, NSFWDetector):  # share its weights, in its dtype
        if model.checkpoint is None:
            raise ValueError(
                "guard() runs the PyTorch classifier in-graph on the pipeline's device; this "
                "detector runs an exported ONNX file. Pass a checkpoint (a Hub id or folder)."
            )
        settings["classifier_dtype"] = str(model.dtype).removeprefix("torch.")
        checker = NSFWSafetyChecker.from_loaded(model.checkpoint, **settings)
    else:
        checker = NSFWSafetyChecker.from_pretrained(model or DEFAULT_MODEL, **settings)
    checker.check_step.scorer.compile = compile
    attached = Guard(pipe, checker, on_error, bool(keep_originals), early_stop)
    if early_stop is not None:
        refused = attached._denoising_refusal()
        if refused:
            raise ValueError(f"nsfw-guard cannot stop {base.__name__} early: {refused}.")
    unguard(pipe)
    attached._attach()
    return attached


_DEFAULT_SETTINGS = {
    "level": "medium",
    "threshold": 0.5,
    "action": "blur",
    "blur_radius": censor.DEFAULT_BLUR_RADIUS,
    "pixelate_block_size": None,
    "fill_color": (0.0, 0.0, 0.0),
    **{f"region_{name}": value for name, value in censor.REGION_DEFAULTS.items()},
}


def _settings_of(checker: NSFWSafetyChecker | None) -> dict[str, Any]:
    """A checker's settings (its callable action as itself), else the defaults."""
    if checker is None:
        return dict(_DEFAULT_SETTINGS)
    settings = {name: getattr(checker.config, name) for name in _DEFAULT_SETTINGS}
    if settings["action"] == "custom":
        settings["action"] = checker.check_step.action
    return settings


def unguard(pipe: DiffusionPipeline) -> None:
    """Remove the guard from ``pipe``, if it has one; other pipelines are left as they are.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline
        >>> pipe = make_tiny_pipeline("sdxl")
        >>> _ = guard(pipe, model=make_checkpoint(tempfile.mkdtemp()))
        >>> unguard(pipe)
        >>> "_nsfw_guard" in pipe.__dict__, type(pipe).__name__
        (False, 'StableDiffusionXLPipeline')
    """
    existing = pipe.__dict__.get("_nsfw_guard")
    if isinstance(existing, Guard) and existing.pipe is pipe:
        existing.remove()
    elif isinstance(existing, Guard):  # a copy that shares another pipeline's guard
        existing._undo_on(pipe)
    else:
        pipe.__class__ = _base_class(type(pipe))


# Checks while denoising ------------------------------------------------------------------------


class _Denoising:
    """One call's checks while denoising: wraps its scheduler's ``step`` for the call, keeps the
    last step's x0 estimate, runs the early checks and interrupts the run when they say so. For
    packed latents it also wraps the pipeline's ``prepare_latents``, to learn the call's size."""

    def __init__(self, guard: Guard, scheduler: Any, check: EarlyCheck, layout: LatentLayout):
        self.guard = guard
        self.scheduler = scheduler
        self.check = check
        self.layout = layout
        self.size: dict[str, int] | None = None  # the call's size, for packed latents
        self.steps_done = 0
        self.total: int | None = None
        self.checks_at: dict[int, float] = {}
        self.stopped: str | None = None
        self.stopped_at: int | None = None
        self.early: dict[int, Tensor] = {}  # step -> [B, 4] scores, read at the end of the call
        self._last: tuple[int, tuple] | None = None  # (step, what its x0 estimate needs)
        self._checked: tuple[int, EarlyCheckOutput] | None = None
        self._failed = False
        self._own_step: Callable | None = None
        self._own_prepare: Callable | None = None

    @classmethod
    def attach(cls, guard: Guard) -> _Denoising | None:
        """Wrap the pipeline's scheduler for this call; ``None`` (with a warning) where the
        pipeline cannot be checked while denoising any more (its scheduler was swapped...)."""
        refused = guard._denoising_refusal()
        if refused:
            _warn(f"nsfw-guard: no checks while denoising in this call: {refused}.")
            return None
        early = guard.early_stop
        decoder = decoder_for(guard.pipe, early.decoder if early is not None else None)
        device = _execution_device(guard.pipe, guard.checker)
        if early is not None and early.decoder is not None:  # the pipeline places its own VAE
            early.decoder.to(device)
        guard._place_checker(device)
        step = guard.checker.check_step
        check = EarlyCheck(decoder, step, early.threshold if early is not None else 1.0)
        denoising = cls(guard, guard.pipe.scheduler, check, layout_of(guard.pipe))
        denoising._own_step = denoising.scheduler.__dict__.get("step")  # the user's, if any
        denoising.scheduler.__dict__["step"] = denoising._step
        if denoising.layout.packed:
            denoising._own_prepare = guard.pipe.__dict__.get("prepare_latents")
            guard.pipe.__dict__["prepare_latents"] = denoising._prepare_latents
        return denoising

    def detach(self) -> None:
        """Give the scheduler back its own ``step`` (and the pipeline its ``prepare_latents``)."""
        for owner, name, wrapper, own in (
            (self.scheduler, "step", self._step, self._own_step),
            (self.guard.pipe, "prepare_latents", self._prepare_latents, self._own_prepare),
        ):
            if owner.__dict__.get(name) == wrapper:
                if own is None:
                    del owner.__dict__[name]
                else:
                    owner.__dict__[name] = own

    def _prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.guard.pipe
        prepare = self._own_prepare or functools.partial(type(pipe).prepare_latents, pipe)
        self.size = call_size(prepare, args, kwargs)
        return prepare(*args, **kwargs)

    def _step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args, **kwargs) -> Any:
        scheduler = self.scheduler
        step = self._own_step or functools.partial(type(scheduler).step, scheduler)
        output = step(model_output, timestep, sample, *args, **kwargs)
        step = self.steps_done
        self.steps_done += 1
        if self.total is None:
            self.total = int(
                getattr(self.guard.pipe, "_num_timesteps", 0) or len(scheduler.timesteps)
            )
            early = self.guard.early_stop
            self.checks_at = early.steps(self.total) if early is not None else {}
        index = getattr(scheduler, "step_index", None)
        # What the x0 estimate of this step needs; computed only if a check asks for it.
        self._last = (
            step,
            (model_output, timestep, sample, None if index is None else index - 1, output),
        )
        if step in self.checks_at and self.stopped is None:
            checked = self.checked(step)
            if checked is not None:
                self.early[step] = checked.scores
                stopping = self.guard.early_stop is not None and self.guard.early_stop.stop
                if stopping and bool(checked.stop):  # the one value read back, at `at` steps
                    self.stopped_at = step
                    self.stopped = f"stopped early at step {step + 1} of {self.total}"
                    self.guard.pipe._interrupt = True
        return output

    def checked(self, step: int) -> EarlyCheckOutput | None:
        """The early check of the x0 estimate of ``step`` (run once per step); ``None`` if that
        step's estimate is not at hand or the check failed."""
        if self._checked is not None and self._checked[0] == step:
            return self._checked[1]
        if self._last is None or self._last[0] != step or self._failed:
            return None
        try:
            with torch.inference_mode():
                model_output, timestep, sample, index, output = self._last[1]
                x0 = x0_estimate(self.scheduler, model_output, timestep, sample, index, output)
                result = self.check(self.layout.to_vae(x0, self.guard.pipe, self.size))
        except Exception as error:
            self._fail(error)
            return None
        self._checked = (step, result)
        return result

    def _fail(self, error: Exception) -> None:
        if not self._failed:
            self._failed = True
            _warn(
                f"nsfw-guard: the check while denoising failed ({type(error).__name__}: {error}); "
                "this call runs to the end, and its images get the final check."
            )

    def annotate(self, results: list[GuardResult]) -> list[GuardResult]:
        """The call's results with their early scores and where the run stopped (one host
        transfer for all early scores)."""
        early = {step: scores.tolist() for step, scores in self.early.items()}
        annotated = []
        for i, result in enumerate(results):
            per_step = {
                step: dict(zip(NSFWLevel, rows[i], strict=True))
                for step, rows in early.items()
                if i < len(rows)
            }
            annotated.append(replace(result, stopped_at=self.stopped_at, early_scores=per_step))
        return annotated


class SafePreviews:
    """A ``callback_on_step_end`` that shows censored previews; made by :meth:`Guard.previews`."""

    def __init__(
        self, guard: Guard, show: Callable[[int, list], Any], every: int, callback: Callable | None
    ):
        self.guard = guard
        self.show = show
        self.every = every
        self.callback = callback

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        state = _ACTIVE_CALL.get()
        if state is None or state.guard is not self.guard:
            raise GuardError(
                "nsfw-guard: these previews belong to another pipeline's guard; make them with "
                "g.previews(...) of the guard of the pipeline you call."
            )
        if state.denoising is not None and (step + 1) % self.every == 0:
            checked = state.denoising.checked(state.denoising.steps_done - 1)
            if checked is not None:  # never an unchecked preview
                self.show(step, _to_pil(checked.previews))
        if self.callback is not None:
            return self.callback(pipe, step, timestep, callback_kwargs)
        return {}


def _to_pil(images: Tensor) -> list:
    from PIL import Image

    array = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(image) for image in array]


# The guarded classes ---------------------------------------------------------------------------


class _GuardedSubclass:
    """Base of the classes nsfw-guard derives from a guarded object's own class (same name).

    Instances pickle and copy as instances of the derived class, rebuilt from the original class.
    """

    _nsfw_guard_base: ClassVar[type]

    def __reduce_ex__(self, protocol: int):
        reduced = super().__reduce_ex__(protocol)
        if protocol < 2 or reduced[0] is not copyreg.__newobj__:
            raise TypeError(f"{type(self).__name__} with nsfw-guard pickles with protocol >= 2.")
        cls, *args = reduced[1]
        mixin = next(c for c in type(self).__mro__ if c in _MIXINS)
        return (_new_guarded, (mixin, cls._nsfw_guard_base, *args), *reduced[2:])


class _GuardedPipeline(_GuardedSubclass):
    """What a guarded pipeline's class adds to its own: per-call state, copies, saving."""

    def __copy__(self) -> DiffusionPipeline:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        existing = new.__dict__.get("_nsfw_guard")
        if isinstance(existing, Guard):
            existing._copy_to(new)
        else:
            new.__class__ = _base_class(type(self))
        return new

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        existing = self.__dict__.get("_nsfw_guard")
        if isinstance(existing, Guard) and not existing.support.checker_slot:
            _warn(
                f"nsfw-guard: {type(self).__name__} has no safety_checker slot to save the guard "
                "in, so the saved pipeline is not guarded when it is loaded again; call "
                "nsfw_guard.guard() on it after from_pretrained."
            )
        elif isinstance(existing, Guard) and existing.early_stop is not None:
            early = existing.early_stop
            if early.decoder is not None and early.to_config()["decoder"] is None:
                _warn(
                    "nsfw-guard: the early-stop decoder is saved by its Hub id or folder, and "
                    "this one has none (it was not loaded with from_pretrained): guard() of the "
                    "reloaded pipeline decodes with its VAE unless given EarlyStop(decoder=...)."
                )
        return result


class _GuardedProcessor(_GuardedSubclass):
    """A guarded pipeline's own copy of its image or video processor: checks in ``postprocess``.

    ``VideoProcessor.postprocess_video`` calls ``postprocess`` once per video, frames as a batch.
    """

    _nsfw_guard: Guard

    def postprocess(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        return self._nsfw_guard._postprocess(self, super().postprocess, image, args, kwargs)


_MIXINS = (_GuardedPipeline, _GuardedProcessor)


@functools.cache
def _guarded_subclass(mixin: type, base: type) -> type:
    """``base`` with ``mixin`` in front, under ``base``'s own name and module."""
    namespace = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_nsfw_guard_base": base,
    }
    return type(base.__name__, (mixin, base), namespace)


@functools.cache
def guarded_class(base: type[DiffusionPipeline]) -> type[DiffusionPipeline]:
    """The class a guarded ``base`` pipeline gets: its ``__call__`` and ``run_safety_checker``
    go through the pipeline's guard.

    Example:
        >>> from diffusers import StableDiffusionPipeline
        >>> cls = guarded_class(StableDiffusionPipeline)
        >>> cls.__name__, issubclass(cls, StableDiffusionPipeline)
        ('StableDiffusionPipeline', True)
    """
    cls = _guarded_subclass(_GuardedPipeline, base)
    cls.__call__ = _guarded_call(base.__call__)
    values = pipeline_support(base).checker_values
    if values is not None:
        cls.run_safety_checker = _guarded_run_safety_checker(base.run_safety_checker, values)
    return cls


def _new_guarded(mixin: type, base: type, *args: Any) -> Any:
    """Unpickle or copy an instance of a guarded class."""
    cls = guarded_class(base) if mixin is _GuardedPipeline else _guarded_subclass(mixin, base)
    return cls.__new__(cls, *args)


def _base_class(cls: type) -> type:
    return cls._nsfw_guard_base if issubclass(cls, _GuardedSubclass) else cls


def _own_guard(pipe: DiffusionPipeline) -> Guard | None:
    """``pipe``'s guard; a copy made without ``copy.copy`` that carries its original's guard gets
    a guard of its own first, so that it never records into, or undoes, the original's."""
    existing = pipe.__dict__.get("_nsfw_guard")
    if not isinstance(existing, Guard):
        return None
    return existing if existing.pipe is pipe else existing._copy_to(pipe)


def _guarded_call(call: Callable) -> Callable:
    @functools.wraps(call)
    def __call__(self: DiffusionPipeline, *args: Any, **kwargs: Any) -> Any:
        own = _own_guard(self)
        if own is None:
            _warn(
                f"nsfw-guard: this {type(self).__name__} has a guarded pipeline's class but no "
                "guard of its own (made with from_pipe or from_pretrained on that class?), so "
                "its images are not checked; call nsfw_guard.guard() on it."
            )
            return call(self, *args, **kwargs)
        return own._call(call, args, kwargs)

    return __call__


def _guarded_run_safety_checker(run_safety_checker: Callable, values: int) -> Callable:
    @functools.wraps(run_safety_checker)
    def guarded(
        self: DiffusionPipeline, image: Any, device: Any = None, dtype: Any = None, *args, **kwargs
    ):
        own = _own_guard(self)
        if own is None:
            return run_safety_checker(self, image, device, dtype, *args, **kwargs)
        # Further arguments (StableDiffusionPipelineSafe's enable_safety_guidance) ask nothing
        # of the check.
        return own._run_safety_checker(image, device, values)

    return guarded


# Modules shared with other pipelines -----------------------------------------------------------


class _SharedModuleWatch:
    """Forward pre-hook on a guarded pipeline's decoder: warns when it runs for a pipeline that is
    not guarded (one made by ``from_pipe``, or from the guarded pipeline's components)."""

    def __init__(self, owner: str, module_name: str):
        self.owner = owner
        self.module_name = module_name
        self.warned_outside = False

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Any) -> None:
        if _ACTIVE_CALL.get() is not None:
            return
        pipe = _calling_pipeline()
        if pipe is None:
            if not self.warned_outside:
                self.warned_outside = True
                _warn(
                    f"nsfw-guard: the {self.module_name} of a guarded {self.owner} runs outside "
                    "a guarded pipeline call: nothing it makes is checked."
                )
            return
        if pipe in _WARNED_UNGUARDED or _checks_with_slot(pipe):
            return
        _WARNED_UNGUARDED.add(pipe)
        _warn(
            f"nsfw-guard: this {type(pipe).__name__} is not guarded, but it runs the "
            f"{self.module_name} of a guarded {self.owner} (made with from_pipe, or from its "
            "components?): its images are not checked. Call nsfw_guard.guard() on it."
        )


def _shared_modules(pipe: DiffusionPipeline) -> Iterator[tuple[str, nn.Module]]:
    """The modules every image of ``pipe`` goes through: its decoders, else its denoisers."""
    try:
        components = pipe.components
    except (AttributeError, ValueError):  # initialised in a way diffusers does not expect
        return
    modules = [
        (f"{name}.decoder", component.decoder)
        for name, component in components.items()
        if name in _DECODERS and isinstance(getattr(component, "decoder", None), nn.Module)
    ]
    if not modules:
        modules = [
            (name, component)
            for name, component in components.items()
            if name.startswith(_DENOISERS) and isinstance(component, nn.Module)
        ]
    yield from modules


def _calling_pipeline() -> DiffusionPipeline | None:
    """The pipeline whose ``__call__`` is running further up this thread's stack, if any."""
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, DiffusionPipeline):
            return candidate
        frame = frame.f_back
    return None


def _checks_with_slot(pipe: DiffusionPipeline) -> bool:
    """Whether ``pipe``'s stock ``run_safety_checker`` runs an NSFWSafetyChecker (from_pipe of a
    guarded Stable Diffusion pipeline carries it)."""
    checker = getattr(pipe, "safety_checker", None)
    return isinstance(checker, NSFWSafetyChecker) and pipeline_support(type(pipe)).checker_slot


def _warn(message: str) -> None:
    """Warn with a GuardWarning attributed to the first caller outside nsfw-guard and the libraries
    it runs inside (usually the line that called the pipeline)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, GuardWarning, stacklevel=level)


def _execution_device(pipe: DiffusionPipeline, checker: NSFWSafetyChecker) -> torch.device:
    try:
        return pipe._execution_device
    except Exception:  # no module to ask (a pipeline made of sub-pipelines, ...)
        return checker.device


def _postprocess_range(processor: VaeImageProcessor, do_denormalize: list[bool] | None) -> str:
    """The value range of images reaching ``processor.postprocess``."""
    if do_denormalize is None:
        return "-1,1" if getattr(processor.config, "do_normalize", True) else "0,1"
    if all(do_denormalize):
        return "-1,1"
    return "0,1" if not any(do_denormalize) else "auto"
