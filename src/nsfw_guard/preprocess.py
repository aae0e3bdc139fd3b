"""In-graph preprocessing: image tensors of any size → the model's normalized input.

Everything here is batched tensor work on the input's device: no PIL, no host sync, no Python
branch on pixel values. The data config is resolved once, from the checkpoint, and passed down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import resolve_data_config
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .inputs import AUTO_0_255_ABOVE, ImageBatch, parse_value_range

__all__ = [
    "WHITE",
    "DataConfig",
    "Preprocess",
    "composite_alpha",
    "resized_size",
    "seen_rgb",
    "to_unit_range",
    "unit_affine",
]

_CROP_MODES = ("squash", "center", "border")
_TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class DataConfig:
    """What the model was trained with: input size, resize and normalization.

    Example:
        >>> cfg = DataConfig.from_pretrained_cfg(
        ...     {"input_size": (3, 448, 448), "crop_mode": "squash", "crop_pct": 1.0}
        ... )
        >>> cfg.input_size, cfg.interpolation
        ((448, 448), 'bicubic')
    """

    input_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str

    def to_pretrained_cfg(self) -> dict[str, Any]:
        """This config as timm ``pretrained_cfg`` keys (JSON-friendly), the inverse of
        :meth:`from_pretrained_cfg`."""
        return {
            "input_size": [3, *self.input_size],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_pretrained_cfg(cls, pretrained_cfg: dict[str, Any]) -> DataConfig:
        """Resolve a timm ``pretrained_cfg`` the way timm's own eval transform does."""
        data = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
        channels, height, width = data["input_size"]
        interpolation = str(data["interpolation"]).lower()
        crop_mode = str(data["crop_mode"]).lower()
        if channels != 3:
            raise ValueError(f"the model expects {channels} input channels; only 3 are supported.")
        if interpolation not in _TENSOR_INTERPOLATIONS:
            raise ValueError(
                f"the model's interpolation {interpolation!r} has no tensor implementation; "
                f"supported: {', '.join(_TENSOR_INTERPOLATIONS)}."
            )
        if crop_mode not in _CROP_MODES:
            raise ValueError(
                f"the model's crop_mode {crop_mode!r} is not supported; "
                f"supported: {', '.join(_CROP_MODES)}."
            )
        return cls(
            input_size=(int(height), int(width)),
            interpolation=interpolation,
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            crop_pct=float(data["crop_pct"]),
            crop_mode=crop_mode,
        )


def resized_size(height: int, width: int, config: DataConfig) -> list[int]:
    """The size timm's eval transform resizes an ``height x width`` image to, before its crop.

    ``squash`` scales each edge to ``size / crop_pct`` ignoring the aspect ratio; ``center`` scales
    the shorter edge and ``border`` the longer one, keeping the aspect ratio. A one-element list
    means "shorter edge", as in torchvision.

    Example:
        >>> cfg = DataConfig.from_pretrained_cfg(
        ...     {"input_size": (3, 448, 448), "crop_mode": "squash", "crop_pct": 1.0}
        ... )
        >>> resized_size(300, 500, cfg)
        [448, 448]
    """
    scale_h = math.floor(config.input_size[0] / config.crop_pct)
    scale_w = math.floor(config.input_size[1] / config.crop_pct)
    if config.crop_mode == "squash":
        return [scale_h, scale_w]
    if config.crop_mode == "center" and scale_h == scale_w:
        return [scale_h]
    pick = max if config.crop_mode == "border" else min
    ratio = pick(height / scale_h, width / scale_w)
    return [round(height / ratio), round(width / ratio)]


class Preprocess(nn.Module):
    """Images → ``(pixels, verifiable)``, all in-graph, on the module's device.

    Takes ``[B, C, H, W]`` images (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA; uint8 in 0-255, or
    float in ``value_range``, see :data:`~nsfw_guard.inputs.VALUE_RANGES`) and returns float32
    ``[B, 3, S, S]`` normalized pixels and a ``[B]`` bool mask that is false for images with NaN
    or Inf pixels (replaced, so the model input stays finite; callers give those images the
    worst-case score). uint8 gray and RGB images are resized as uint8, as the model card's PIL
    path does (on CPU, PyTorch's uint8 kernel is Pillow's; elsewhere torchvision resizes in float
    and rounds). Float pixels are clamped to their range at full size, like diffusers'
    denormalize, so the model sees the image people see. Alpha is composited over ``background``
    (RGB in [0, 1]). Mean, std and background are buffers: they move with the module, with no
    host-to-device copy per call.

    Example:
        >>> cfg = DataConfig.from_pretrained_cfg(
        ...     {"input_size": (3, 448, 448), "crop_mode": "squash", "crop_pct": 1.0}
        ... )
        >>> pixels, ok = Preprocess(cfg)(torch.rand(2, 3, 512, 512) * 2 - 1, "-1,1")
        >>> pixels.shape, ok.tolist()
        (torch.Size([2, 3, 448, 448]), [True, True])
    """

    def __init__(
        self, config: DataConfig, background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ):
        super().__init__()
        if len(background) != 3 or not all(0.0 <= float(v) <= 1.0 for v in background):
            raise ValueError(f"background={background!r}: expected an RGB triple in [0, 1].")
        self.config = config
        self._interpolation = InterpolationMode(config.interpolation)
        std = torch.tensor(config.std).view(1, 3, 1, 1)
        self.register_buffer("inv_std", 1.0 / std, persistent=False)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "background",
            torch.tensor(background, dtype=torch.float32).view(1, 3, 1, 1),
            persistent=False,
        )

    def forward(self, images: Tensor, value_range: str = "auto") -> tuple[Tensor, Tensor]:
        value_range = parse_value_range(value_range)
        given = images
        images = images.to(self.mean.device)
        size = resized_size(images.shape[-2], images.shape[-1], self.config)
        if images.dtype == torch.uint8:
            verifiable = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
            if images.shape[1] in (1, 3):  # no alpha to composite: resize the uint8 pixels
                resized = self.resize(images, size).to(torch.float32)
                return self._normalize(resized, 1.0 / 255.0, 0.0), verifiable
            images = images.to(torch.float32)
            low, high, scale, offset = 0.0, 255.0, 1.0 / 255.0, 0.0
        else:
            images = images.to(torch.float32)
            # A sum is finite only if every pixel is: one cheap read finds NaN and Inf.
            verifiable = images.flatten(1).sum(dim=1).isfinite()
            low, high, scale, offset = unit_affine(images, value_range)
            # At full size, like diffusers' denormalize; in place only on our own copy.
            images = images.clamp_(low, high) if images is not given else images.clamp(low, high)

        if images.shape[1] in (2, 4):
            images = composite_alpha(images * scale + offset, self.background)
            low, high, scale, offset = 0.0, 1.0, 1.0, 0.0

        resized = self.resize(images, size).nan_to_num_(0.0).clamp_(low, high)
        return self._normalize(resized, scale, offset), verifiable

    def resize(self, images: Tensor, size: list[int]) -> Tensor:
        """``images`` resized to ``size`` as the classifier's input is (:func:`resized_size`)."""
        if images.dtype == torch.uint8 or len(size) == 1:  # Pillow's uint8 kernel on CPU
            return TF.resize(images, size, interpolation=self._interpolation, antialias=True)
        # What TF.resize runs for float images, without its early return for an image already
        # at ``size``: a branch on the input's shape that torch.export would bake into the graph
        # (a 448² input would then fail). At the same size, this resize is exactly the identity.
        mode = self._interpolation.value
        smooth = mode in ("bilinear", "bicubic")
        return F.interpolate(
            images, size, mode=mode, align_corners=False if smooth else None, antialias=smooth
        )

    def _normalize(self, resized: Tensor, scale: Tensor | float, offset: Tensor | float) -> Tensor:
        """``(resized * scale + offset - mean) / std`` in one op, then the crop.

        Resizing is linear, so the range change is folded into the normalization of the smaller
        resized image. The crop comes last, so the border mode pads with the mean.
        """
        weight = self.inv_std * scale
        bias = (offset - self.mean) * self.inv_std
        pixels = torch.addcmul(bias, resized, weight)  # 1 channel → 3
        return TF.center_crop(pixels, list(self.config.input_size))


WHITE = (1.0, 1.0, 1.0)


def composite_alpha(unit: Tensor, background: Tensor | tuple[float, float, float]) -> Tensor:
    """``[B, C, H, W]`` images in [0, 1] with alpha (C 2 or 4) → RGB over ``background``.

    Other images pass through; gray ones stay one channel.

    Example:
        >>> composite_alpha(torch.tensor([[[[0.0]], [[0.25]]]]), (1.0, 1.0, 1.0)).flatten().tolist()
        [0.75, 0.75, 0.75]
    """
    channels = unit.shape[1]
    if channels not in (2, 4):
        return unit
    if not isinstance(background, Tensor):
        background = torch.tensor(background, dtype=unit.dtype, device=unit.device)
    color, alpha = unit[:, : channels - 1], unit[:, channels - 1 :]
    return color * alpha + background.view(1, 3, 1, 1) * (1.0 - alpha)


def to_unit_range(images: Tensor, value_range: str = "auto") -> Tensor:
    """Float32 images in [0, 1]: uint8 scaled, float clamped to ``value_range`` and mapped.

    Non-finite pixels become 0. This is diffusers' denormalize for ``"-1,1"``.

    Example:
        >>> to_unit_range(torch.tensor([[[[-2.0, 0.0, 0.5]]]]), "-1,1").tolist()
        [[[[0.0, 0.5, 0.75]]]]
        >>> to_unit_range(torch.tensor([[[[0.0, 127.5, 300.0]]]])).tolist()  # auto: 0-255
        [[[[0.0, 0.5, 1.0]]]]
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    images = images.to(torch.float32)
    low, high, scale, offset = unit_affine(images, parse_value_range(value_range))
    return (images.clamp(low, high) * scale + offset).nan_to_num_(0.0)


def seen_rgb(batch: ImageBatch) -> Tensor:
    """``[N, 3, H, W]`` float32 in [0, 1]: decoded images as the detector sees them (alpha over
    white, gray as RGB), for what people are shown of them (thumbnails, maps, censored copies).

    Example:
        >>> seen_rgb(ImageBatch(torch.full((1, 2, 1, 1), 255, dtype=torch.uint8), "0,255"))
        tensor([[[[1.]],
        <BLANKLINE>
                 [[1.]],
        <BLANKLINE>
                 [[1.]]]])
    """
    unit = composite_alpha(to_unit_range(batch.pixels, batch.value_range), WHITE)
    return unit.expand(-1, 3, -1, -1)


def unit_affine(images: Tensor, value_range: str):
    """``(low, high, scale, offset)`` for float images: their range and the map from it to [0, 1].

    ``auto`` decides per image, in-graph (``[B, 1, 1, 1]`` tensors): ``-1,1`` if any pixel is
    negative, else ``0,255`` if any exceeds :data:`~nsfw_guard.inputs.AUTO_0_255_ABOVE`, else
    ``0,1``.

    Example:
        >>> unit_affine(torch.zeros(1, 3, 2, 2), "-1,1")
        (-1.0, 1.0, 0.5, 0.5)
        >>> images = torch.tensor([-0.5, 0.5, 200.0]).view(3, 1, 1, 1)
        >>> [value.flatten().tolist() for value in unit_affine(images, "auto")[:2]]
        [[-1.0, 0.0, 0.0], [1.0, 1.0, 255.0]]
    """
    if value_range == "0,1":
        return 0.0, 1.0, 1.0, 0.0
    if value_range == "-1,1":
        return -1.0, 1.0, 0.5, 0.5
    if value_range == "0,255":
        return 0.0, 255.0, 1.0 / 255.0, 0.0
    smallest, largest = torch.aminmax(images.flatten(1), dim=1)
    signed = (smallest < 0)[:, None, None, None]
    bytes_ = (largest > AUTO_0_255_ABOVE)[:, None, None, None] & ~signed
    return (
        torch.where(signed, -1.0, 0.0),
        torch.where(bytes_, 255.0, 1.0),
        torch.where(signed, 0.5, torch.where(bytes_, 1.0 / 255.0, 1.0)),
        torch.where(signed, 0.5, 0.0),
    )
