"""What nsfw-guard needs to know about a diffusers pipeline class, read once from its source.

``guard()`` checks a pipeline's images in one of these places, fastest first:

1. ``run_safety_checker``, where the Stable Diffusion family and DeepFloyd IF check their decoded
   images: replaced by the tensor-native check, returning as many values as the call site unpacks.
2. ``image_processor.postprocess`` / ``video_processor.postprocess``, where most other pipelines
   turn decoded ``[-1, 1]`` tensors into their output.
3. The pipeline's output, as the wrapped ``__call__`` returns it: every image that the places
   above did not check (pipelines without either, DeepFloyd IF's ``output_type="pt"``, ...).

This module reads, from a pipeline class's own source, which of these it has and what its output
looks like, and which pipelines cannot be guarded (they return no images).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

__all__ = ["IMAGE_FIELDS", "NSFW_FIELDS", "PipelineSupport", "pipeline_support"]

IMAGE_FIELDS = ("images", "frames", "image", "video", "videos", "rgb")
"""Output fields that hold a pipeline's images or video frames, in order of preference."""
NSFW_FIELDS = ("nsfw_content_detected", "nsfw_detected")
"""Output fields that hold per-image NSFW flags."""


@dataclass(frozen=True)
class PipelineSupport:
    """How nsfw-guard attaches to one pipeline class.

    ``refused`` is a one-line reason the class cannot be guarded, else ``None``.
    ``checker_values`` is how many values ``__call__`` unpacks from ``run_safety_checker`` (``None``
    when it does not call it). ``checker_slot`` says whether the stock ``run_safety_checker``
    calls ``self.safety_checker(images=..., clip_input=...)`` for ``(images, flags)``, so that an
    ``NSFWSafetyChecker`` in that slot works even without the guard (after ``from_pipe`` or a
    reload). ``output_fields`` are the fields of the output class, when the source names one.
    ``pt_value_range`` is the range of ``output_type="pt"`` images: ``"-1,1"`` where the source
    maps images to [0, 1] only for other output types (DeepFloyd IF, Kandinsky), else ``"auto"``
    (a pipeline's "pt" images are in [0, 1]). ``latent_output`` says whether
    ``output_type="latent"`` returns latents: pixel-space pipelines (DeepFloyd IF, DDPM) treat it
    as any other value and return images, which are checked. ``interruptible`` says whether its
    denoising loop reads ``self.interrupt`` and steps ``self.scheduler`` (early stop needs both).
    """

    refused: str | None
    checker_values: int | None
    checker_slot: bool
    output_fields: tuple[str, ...] | None
    pt_value_range: str
    latent_output: bool
    call_signature: inspect.Signature | None
    interruptible: bool = False

    def output_type(self, pipe: DiffusionPipeline, args: tuple, kwargs: dict) -> Any:
        """The ``output_type`` of the call ``pipe(*args, **kwargs)``; ``None`` if it has none."""
        if self.call_signature is None or "output_type" not in self.call_signature.parameters:
            return None
        try:
            bound = self.call_signature.bind(pipe, *args, **kwargs)
        except TypeError:
            return None
        default = self.call_signature.parameters["output_type"].default
        return bound.arguments.get("output_type", default)


@functools.cache
def pipeline_support(cls: type[DiffusionPipeline]) -> PipelineSupport:
    """Read what nsfw-guard needs from ``cls``'s source (cached per class).

    Example:
        >>> from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline
        >>> pipeline_support(StableDiffusionPipeline).checker_values
        2
        >>> support = pipeline_support(StableDiffusionUpscalePipeline)
        >>> support.checker_values, support.checker_slot
        (3, False)
    """
    call = cls.__call__
    call_tree = _parse(call)
    output_classes = _output_classes(call, call_tree)
    fields = next(
        (f for f in output_classes if any(name in IMAGE_FIELDS for name in f)),
        output_classes[0] if output_classes else None,
    )
    checker_values = None
    if call_tree is not None:
        checker_values = _unpacked_values(call_tree, "self", "run_safety_checker")
    if checker_values is not None and checker_values < 2:
        checker_values = None  # not unpacked: what the call site expects is unknown
    try:
        call_signature = inspect.signature(call)
    except (TypeError, ValueError):
        call_signature = None
    decodes = _decodes_latents(cls)
    return PipelineSupport(
        refused=_refusal(fields, call_tree),
        checker_values=checker_values,
        checker_slot=checker_values == 2 and _has_checker_slot(cls),
        output_fields=fields,
        pt_value_range="-1,1" if _raw_pt_output(call_tree, decodes) else "auto",
        # Without its source, "latent" is taken at its word (the output is not images).
        latent_output=call_tree is None
        or (decodes and _compares_with(call_tree, "output_type", "latent")),
        call_signature=call_signature,
        interruptible=call_tree is not None
        and _reads(call_tree, "self", "interrupt")
        and _reads(call_tree, "scheduler", "step"),
    )


def _refusal(fields: tuple[str, ...] | None, call_tree: ast.AST | None) -> str | None:
    if call_tree is not None and _calls_hdr_postprocess(call_tree):
        return (
            "it returns linear HDR frames (values from 0 up, unbounded), which nsfw-guard "
            "cannot check as they will be shown; check tone-mapped frames with NSFWDetector"
        )
    if fields is None:
        return None  # no output class in the source: checked at run time
    if "depth" in fields:
        return (
            "it decodes RGB and depth as one 4-channel image, which nsfw-guard cannot tell from "
            "RGBA; check its rgb output with NSFWDetector"
        )
    if not any(name in IMAGE_FIELDS for name in fields):
        return f"it returns {', '.join(fields)}, not images"
    return None


def _calls_hdr_postprocess(tree: ast.AST) -> bool:
    """Whether ``tree`` calls a ``postprocess_hdr...`` method (LTX-2's HDR video processor)."""
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("postprocess_hdr")
        for node in ast.walk(tree)
    )


def _parse(function: Callable | None) -> ast.AST | None:
    if function is None:
        return None
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):  # no source (built at run time, compiled, ...)
        return None


def _output_classes(call: Callable | None, tree: ast.AST | None) -> list[tuple[str, ...]]:
    """The fields of each ``BaseOutput`` class that ``call``'s source names."""
    if call is None or tree is None:
        return []
    module = sys.modules.get(getattr(inspect.unwrap(call), "__module__", ""), None)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    found = []
    for name in sorted(names):
        value = getattr(module, name, None)
        if inspect.isclass(value) and issubclass(value, BaseOutput) and value is not BaseOutput:
            found.append(tuple(field.name for field in dataclasses.fields(value)))
    return found


def _unpacked_values(tree: ast.AST, owner: str, method: str) -> int | None:
    """How many values ``x, y, ... = owner.method(...)`` unpacks in ``tree``; ``None`` if no such
    call. A plain ``x = owner.method(...)`` counts as 1."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        func = node.value.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == method
            and isinstance(func.value, ast.Name)
            and func.value.id == owner
        ):
            target = node.targets[0]
            return len(target.elts) if isinstance(target, ast.Tuple) else 1
    return None


def _reads(tree: ast.AST, owner: str, attribute: str) -> bool:
    """Whether ``tree`` reads ``owner.attribute`` (``owner`` a name, or an attribute's name:
    ``self.scheduler.step`` reads ``scheduler.step``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == attribute:
            value = node.value
            name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", None)
            if name == owner:
                return True
    return False


def _compares_with(tree: ast.AST, name: str, value: str) -> bool:
    """Whether ``tree`` compares the variable ``name`` with the string ``value`` (``==``, ``in``,
    ...)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = {o.id for o in operands if isinstance(o, ast.Name)}
        constants = {
            c.value
            for o in operands
            for c in (o.elts if isinstance(o, ast.List | ast.Tuple | ast.Set) else [o])
            if isinstance(c, ast.Constant)
        }
        if name in names and value in constants:
            return True
    return False


def _decodes_latents(cls: type[DiffusionPipeline]) -> bool:
    """Whether ``cls`` has a component that decodes latents into images (a VAE, MoVQ, VQ-GAN,
    Shap-E's renderer...), by its components' names; ``True`` where they are not known. A
    pixel-space pipeline (PRXPixel) returns its images, in [-1, 1], for "latent"."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return True
    return any(part in p.name for p in parameters for part in _DECODER_NAMES)


_DECODER_NAMES = ("vae", "movq", "vq", "decoder", "renderer")


def _raw_pt_output(tree: ast.AST | None, decodes_latents: bool) -> bool:
    """Whether "pt" images stay in [-1, 1]: the source maps [-1, 1] images to [0, 1]
    (``x / 2 + 0.5``, ``x * 0.5 + 0.5``) only under an ``if output_type ...`` that leaves "pt"
    out, or, with no latents to decode, returns the same as for "latent" for "pt"."""
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            selected = _selected_output_types(node.test) or set()
            if selected and "pt" not in selected and any(map(_is_denormalize, ast.walk(node))):
                return True
            if not decodes_latents and {"latent", "pt"} <= selected:
                return True
    return False


def _selected_output_types(test: ast.expr) -> set[str] | None:
    """The output types ``if output_type == "x"`` or ``if output_type in [...]`` selects."""
    if not (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "output_type"
        and len(test.ops) == 1
    ):
        return None
    right = test.comparators[0]
    if isinstance(test.ops[0], ast.Eq) and isinstance(right, ast.Constant):
        return {right.value}
    if isinstance(test.ops[0], ast.In) and isinstance(right, ast.List | ast.Tuple | ast.Set):
        return {item.value for item in right.elts if isinstance(item, ast.Constant)}
    return None


def _is_denormalize(node: ast.AST) -> bool:
    """``x / 2 + 0.5`` or ``x * 0.5 + 0.5``."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)):
        return False
    left = node.left
    return (
        _is_number(node.right, 0.5)
        and isinstance(left, ast.BinOp)
        and (
            (isinstance(left.op, ast.Div) and _is_number(left.right, 2))
            or (isinstance(left.op, ast.Mult) and _is_number(left.right, 0.5))
        )
    )


def _is_number(node: ast.AST, value: float) -> bool:
    return isinstance(node, ast.Constant) and node.value == value


def _has_checker_slot(cls: type[DiffusionPipeline]) -> bool:
    """Whether the stock ``run_safety_checker`` gets ``(images, flags)`` from its
    ``safety_checker`` and the pipeline has the feature extractor it feeds."""
    parameters = inspect.signature(cls.__init__).parameters
    if "safety_checker" not in parameters or "feature_extractor" not in parameters:
        return False
    tree = _parse(getattr(cls, "run_safety_checker", None))
    return tree is not None and _unpacked_values(tree, "self", "safety_checker") == 2
