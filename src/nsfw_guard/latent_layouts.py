"""How a pipeline's latents reach its VAE, for checks while denoising.

Pipelines hand their scheduler latents in one of four layouts, and turn them into what their VAE
decodes in their own way after the loop; :func:`layout_of` reads which from the pipeline itself,
and :meth:`LatentLayout.to_vae` does the same mid-run:

- ``"image"``: ``[B, C, h, w]``, decoded as they are (SD, SDXL, SD3, PixArt, Sana, ...).
- ``"packed"``: ``[B, h/2 * w/2, C * 4]`` tokens (Flux, Flux Kontext/Fill, Chroma, QwenImage,
  ...), unpacked by the pipeline's own ``_unpack_latents(latents, height, width,
  vae_scale_factor)`` with the call's height and width (:func:`latent_size`).
- ``"video"``: ``[B, C, F, h, w]`` (Wan, HunyuanVideo, Mochi, ...), decoded by a video VAE into
  ``[B, 3, F, H, W]``.
- ``"video_frames_first"``: ``[B, F, C, h, w]`` (CogVideoX), permuted as its ``decode_latents``
  does.

Packings of other shapes (LTX's patchified video tokens) are refused with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["LAYOUTS", "LatentLayout", "latent_size", "layout_of"]

LAYOUTS = ("image", "packed", "video", "video_frames_first")
_UNPACK_PARAMETERS = ["latents", "height", "width", "vae_scale_factor"]
_FRAMES_FIRST = "permute(0, 2, 1, 3, 4)"  # CogVideoX's decode_latents, to [B, C, F, h, w]


@dataclass(frozen=True)
class LatentLayout:
    """One pipeline class's latent layout (see the module's docstring).

    Example:
        >>> import torch
        >>> from diffusers import FluxPipeline
        >>> layout = LatentLayout("packed", FluxPipeline)
        >>> layout.to_vae(torch.zeros(1, 16, 64), size=(64, 64), vae_scale_factor=8).shape
        torch.Size([1, 16, 8, 8])
    """

    kind: str
    pipeline: type | None = None

    @property
    def video(self) -> bool:
        """Whether the VAE decodes these latents into videos ``[B, 3, F, H, W]``."""
        return self.kind.startswith("video")

    def to_vae(
        self, latents: Tensor, size: tuple[int, int] | None = None, vae_scale_factor: int = 8
    ) -> Tensor:
        """``latents`` as the pipeline hands them to its VAE (before its latent scaling):
        unpacked with ``size``, the call's ``(height, width)`` in pixels, for ``"packed"``."""
        if self.kind == "packed":
            if size is None:
                raise ValueError("packed latents need the call's height and width to unpack")
            return self.pipeline._unpack_latents(latents, *size, vae_scale_factor)
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
        parameters = list(inspect.signature(unpack).parameters)
        if parameters != _UNPACK_PARAMETERS:
            raise ValueError(
                f"{name}'s latents are packed in a way nsfw-guard does not unpack "
                f"({name}._unpack_latents({', '.join(parameters)}))"
            )
        return LatentLayout("packed", cls)
    if "video_processor" not in vars(pipe):
        return LatentLayout("image")
    decode = getattr(cls, "decode_latents", None)
    if decode is not None and _FRAMES_FIRST in _source(decode):
        return LatentLayout("video_frames_first")
    return LatentLayout("video")


def latent_size(prepare_latents: Any, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """The ``(height, width)`` in pixels that a call of a pipeline's ``prepare_latents`` with
    ``args`` and ``kwargs`` makes latents for; ``None`` where it takes no height and width.

    Example:
        >>> def prepare_latents(batch_size, channels, height, width, dtype=None): ...
        >>> latent_size(prepare_latents, (2, 16, 512), {"width": 768})
        (512, 768)
    """
    try:
        arguments = inspect.signature(prepare_latents).bind(*args, **kwargs).arguments
        return int(arguments["height"]), int(arguments["width"])
    except (TypeError, ValueError, KeyError):
        return None


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""
