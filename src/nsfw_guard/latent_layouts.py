"""How a pipeline's latents reach its VAE, for checks while denoising.

Pipelines hand their scheduler latents in one of five layouts, and turn them into what their VAE
decodes in their own way after the loop; :func:`layout_of` reads which from the pipeline itself,
and :meth:`LatentLayout.to_vae` does the same mid-run:

- ``"image"``: ``[B, C, h, w]``, decoded as they are (SD, SDXL, SD3, PixArt, Sana, ...).
- ``"packed"``: ``[B, h/2 * w/2, C * 4]`` tokens (Flux, Flux Kontext/Fill, Chroma, QwenImage,
  ...), unpacked by the pipeline's own ``_unpack_latents(latents, height, width,
  vae_scale_factor)`` at the call's height and width.
- ``"video"``: ``[B, C, F, h, w]`` (Wan, HunyuanVideo, Mochi, ...), decoded by a video VAE into
  ``[B, 3, F, H, W]``.
- ``"video_frames_first"``: ``[B, F, C, h, w]`` (CogVideoX), permuted as its ``decode_latents``
  does.
- ``"packed_video"``: LTX's patchified video tokens, unpacked by its own
  ``_unpack_latents(latents, num_frames, height, width, patch_size, patch_size_t)`` at the call's
  size in latents (its VAE's compression ratios) and its transformer's patch sizes.

The call's size is what the pipeline's ``prepare_latents`` was called with
(:func:`call_size`): for Kontext it comes from the input image, not from the call's arguments.
Packings of other shapes are refused with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["LAYOUTS", "LatentLayout", "call_size", "layout_of"]

LAYOUTS = ("image", "packed", "video", "video_frames_first", "packed_video")
_UNPACKS = {
    ("latents", "height", "width", "vae_scale_factor"): "packed",
    ("latents", "num_frames", "height", "width", "patch_size", "patch_size_t"): "packed_video",
}
_SIZES = ("height", "width", "num_frames")
_FRAMES_FIRST = "permute(0, 2, 1, 3, 4)"  # CogVideoX's decode_latents, to [B, C, F, h, w]


@dataclass(frozen=True)
class LatentLayout:
    """One pipeline class's latent layout (see the module's docstring).

    Example:
        >>> import torch
        >>> from diffusers import FluxPipeline
        >>> from types import SimpleNamespace
        >>> layout = LatentLayout("packed", FluxPipeline)
        >>> pipe = SimpleNamespace(vae_scale_factor=8)
        >>> layout.to_vae(torch.zeros(1, 16, 64), pipe, {"height": 64, "width": 64}).shape
        torch.Size([1, 16, 8, 8])
    """

    kind: str
    pipeline: type | None = None

    @property
    def packed(self) -> bool:
        """Whether these latents are unpacked at the call's size (:func:`call_size`)."""
        return self.kind in ("packed", "packed_video")

    @property
    def video(self) -> bool:
        """Whether the VAE decodes these latents into videos ``[B, 3, F, H, W]``."""
        return self.kind in ("video", "video_frames_first", "packed_video")

    def to_vae(self, latents: Tensor, pipe: Any, size: dict[str, int] | None = None) -> Tensor:
        """``latents`` as ``pipe`` hands them to its VAE (before its latent scaling); packed
        ones unpacked at ``size``, the call's ``height``, ``width`` (and ``num_frames``) in
        pixels (:func:`call_size`)."""
        if self.packed and not size:
            raise ValueError("packed latents need the call's size to be unpacked")
        if self.kind == "packed":
            height, width = size["height"], size["width"]
            return self.pipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        if self.kind == "packed_video":
            spatial = pipe.vae_spatial_compression_ratio
            temporal = pipe.vae_temporal_compression_ratio
            return self.pipeline._unpack_latents(
                latents,
                (size["num_frames"] - 1) // temporal + 1,
                size["height"] // spatial,
                size["width"] // spatial,
                pipe.transformer_spatial_patch_size,
                pipe.transformer_temporal_patch_size,
            )
        if self.kind == "video_frames_first":
            return latents.permute(0, 2, 1, 3, 4)
        return latents


def layout_of(pipe: Any) -> LatentLayout:
    """The latent layout of a pipeline. Raises ``ValueError`` with a reason for latents packed
    in another way.

    Example:
        >>> from nsfw_guard.testing import make_tiny_pipeline
        >>> layout_of(make_tiny_pipeline("sd")).kind
        'image'
    """
    cls = type(pipe)
    cls = getattr(cls, "_nsfw_guard_base", cls)  # a guarded pipeline's own class
    name = cls.__name__
    unpack = getattr(cls, "_unpack_latents", None)
    if unpack is not None:
        parameters = tuple(inspect.signature(unpack).parameters)
        if parameters not in _UNPACKS:
            raise ValueError(
                f"{name}'s latents are packed in a way nsfw-guard does not unpack "
                f"({name}._unpack_latents({', '.join(parameters)}))"
            )
        return LatentLayout(_UNPACKS[parameters], cls)
    if "video_processor" not in vars(pipe):
        return LatentLayout("image")
    decode = getattr(cls, "decode_latents", None)
    if decode is not None and _FRAMES_FIRST in _source(decode):
        return LatentLayout("video_frames_first")
    return LatentLayout("video")


def call_size(prepare_latents: Any, args: tuple, kwargs: dict) -> dict[str, int] | None:
    """The ``height`` and ``width`` (and ``num_frames``) in pixels that a call of a pipeline's
    ``prepare_latents`` with ``args`` and ``kwargs`` makes latents for; ``None`` where it takes
    no height and width.

    Example:
        >>> def prepare_latents(batch_size, channels, height, width, num_frames=9, dtype=None): ...
        >>> call_size(prepare_latents, (2, 16, 512), {"width": 768})
        {'height': 512, 'width': 768, 'num_frames': 9}
    """
    try:
        bound = inspect.signature(prepare_latents).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    values = {name: bound.arguments.get(name) for name in _SIZES}
    size = {name: int(value) for name, value in values.items() if value is not None}
    return size if "height" in size and "width" in size else None


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""
