"""Any image a user has → batches of image tensors; the tensor path leaves pixels untouched.

Accepted forms (one image, or a list/tuple of them; arrays and tensors may also be batches):

- PIL images in any mode. Alpha is kept as a fourth channel and composited later, in-graph.
- numpy arrays ``HW``, ``HWC`` or ``BHWC`` (``C`` in 1-4) of uint8, uint16, bool or float.
- torch tensors ``HW``, ``CHW`` or ``BCHW`` (``C`` in 1-4) of uint8, bool or float, on any device.

Channels: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA. uint8 is read as 0-255, uint16 as 0-65535 and
bool as 0/1; float values follow ``value_range`` (see :data:`VALUE_RANGES`). PIL's integer modes
(``I``, ``I;16``) are read as 0-65535, or as 0-255 when no value exceeds 255 (Pillow's own
conversion of an 8-bit image); its float mode ``F`` follows ``value_range``, or 0-255 when its
values lie outside [-1, 1] (Pillow's scale again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "VALUE_RANGES",
    "ImageBatch",
    "is_single_image",
    "parse_value_range",
    "to_image_batches",
]

VALUE_RANGES = ("auto", "0,1", "-1,1")
"""How float pixels are read: ``"0,1"``, ``"-1,1"`` (diffusers' decoded images), or ``"auto"``,
which picks ``-1,1`` for an image with any negative value and ``0,1`` otherwise, per image."""

_ACCEPTED = (
    "a PIL image, a numpy array (HW, HWC or BHWC; uint8, uint16, bool or float), "
    "a torch tensor (HW, CHW or BCHW; uint8, bool or float), or a list of those"
)
# Float arrays on the host are checked for free; values this far out are not pixels in either range.
_FLOAT_LIMIT = 4.0


@dataclass(frozen=True)
class ImageBatch:
    """Same-size images ``[N, C, H, W]`` and how to read their float values.

    ``value_range`` is ignored for uint8 and bool pixels, whose range is fixed by the dtype.
    """

    pixels: Tensor
    value_range: str


def parse_value_range(value_range: str | tuple[float, float]) -> str:
    """Normalise ``value_range`` to one of :data:`VALUE_RANGES`.

    Example:
        >>> parse_value_range((-1, 1))
        '-1,1'
    """
    if isinstance(value_range, tuple | list) and len(value_range) == 2:
        value_range = f"{value_range[0]:g},{value_range[1]:g}"
    if isinstance(value_range, str):
        key = value_range.replace(" ", "").replace("[", "").replace("]", "").lower()
        if key in VALUE_RANGES:
            return key
    raise ValueError(
        f"value_range={value_range!r} is not supported; use one of {', '.join(VALUE_RANGES)}."
    )


def is_single_image(images: Any) -> bool:
    """Whether ``images`` is one image rather than a list or a batch (4-D array or tensor).

    Example:
        >>> is_single_image(torch.zeros(3, 8, 8)), is_single_image([torch.zeros(3, 8, 8)])
        (True, False)
    """
    if isinstance(images, list | tuple):
        return False
    return not (isinstance(images, np.ndarray | Tensor) and images.ndim == 4)


def to_image_batches(images: Any, value_range: str = "auto") -> list[ImageBatch]:
    """Convert one image, a list of images or a batch into image batches.

    Tensors keep their device and dtype (no copy, no host sync). PIL images and numpy arrays
    become CPU tensors.

    Example:
        >>> to_image_batches(torch.zeros(2, 3, 8, 8))[0].pixels.shape
        torch.Size([2, 3, 8, 8])
    """
    value_range = parse_value_range(value_range)
    if isinstance(images, list | tuple):
        return [_one_image(item, value_range, f"images[{i}]") for i, item in enumerate(images)]
    if isinstance(images, Image.Image):
        return [_from_pil(images, value_range)]
    if isinstance(images, np.ndarray | Tensor):
        pixels, range_ = _from_array(images, value_range, "images", allow_batch=True)
        return [ImageBatch(pixels, range_)] if pixels.shape[0] else []
    raise TypeError(f"images is a {type(images).__name__}; expected {_ACCEPTED}.")


def _one_image(item: Any, value_range: str, name: str) -> ImageBatch:
    if isinstance(item, Image.Image):
        return _from_pil(item, value_range)
    if isinstance(item, np.ndarray | Tensor):
        return ImageBatch(*_from_array(item, value_range, name, allow_batch=False))
    raise TypeError(f"{name} is a {type(item).__name__}; expected {_ACCEPTED}.")


def _from_pil(image: Image.Image, value_range: str) -> ImageBatch:
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit PNG/TIFF decoders fill 0-65535; Pillow's convert("I") of an 8-bit image keeps
        # 0-255. Reading the latter as 16-bit would hide it in near-black, so values up to 255
        # are read as 8-bit.
        array = np.asarray(image).astype(np.float32)
        full_scale = 65535.0 if array.max(initial=0.0) > 255 else 255.0
        array = array.clip(0, full_scale) / full_scale
        value_range = "0,1"
    elif mode == "F":
        array = np.asarray(image, dtype=np.float32)
        finite = array[np.isfinite(array)]
        if value_range == "auto" and finite.size and np.abs(finite).max() > 1:
            # Not [0, 1] or [-1, 1]: Pillow's own scale (convert("F") of an 8-bit image), 0-255.
            array, value_range = array.clip(0, 255) / 255.0, "0,1"
    elif mode in ("1", "L", "LA", "RGB", "RGBA"):
        array = np.asarray(image)
    elif mode == "La":  # premultiplied; Pillow converts it only to LA
        array = np.asarray(image.convert("LA"))
    else:
        array = np.asarray(image.convert("RGBA" if image.has_transparency_data else "RGB"))
    pixels, value_range = _from_array(np.array(array), value_range, "PIL image", allow_batch=False)
    return ImageBatch(pixels, value_range)


def _from_array(array: np.ndarray | Tensor, value_range: str, name: str, allow_batch: bool):
    """Return ``([N, C, H, W] tensor, value_range)`` for an array or tensor."""
    is_numpy = isinstance(array, np.ndarray)
    ndim = array.ndim
    max_ndim = 4 if allow_batch else 3
    layout = ("HW, HWC" if is_numpy else "HW, CHW") + (
        (" or BHWC" if is_numpy else " or BCHW") if allow_batch else ""
    )
    if not 2 <= ndim <= max_ndim:
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {layout}.")
    if is_numpy:
        if array.dtype == np.uint16:
            value_range = "0,1"
        array = _numpy_to_tensor(array, name)
        if ndim == 2:
            array = array[None, None]
        else:
            array = (array[None] if ndim == 3 else array).permute(0, 3, 1, 2)
    else:
        array = _check_tensor_dtype(array, name)
        if ndim == 2:
            array = array[None, None]
        elif ndim == 3:
            array = array[None]
    channels = array.shape[1]
    if channels not in (1, 2, 3, 4):
        hint = ""
        if not is_numpy and array.shape[-1] in (1, 2, 3, 4):
            hint = " It looks channels-last: torch tensors are CHW, use .permute(2, 0, 1)."
        elif is_numpy and ndim == 3 and array.shape[2] in (1, 2, 3, 4):
            hint = " It looks channels-first: numpy arrays are HWC, use .transpose(1, 2, 0)."
        raise ValueError(
            f"{name} has {channels} channels (shape {tuple(array.shape)} read as N, C, H, W); "
            f"expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) in layout {layout}.{hint}"
        )
    if array.shape[-1] == 0 or array.shape[-2] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)}).")
    if array.dtype == torch.bool:
        array = array.to(torch.uint8) * 255
    return array, value_range


def _numpy_to_tensor(array: np.ndarray, name: str) -> Tensor:
    dtype = array.dtype
    if dtype == np.uint8:
        pass
    elif dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(dtype, np.floating):
        array = array.astype(np.float32, copy=False)
        finite = array[np.isfinite(array)]
        if finite.size and np.abs(finite).max() > _FLOAT_LIMIT:
            raise ValueError(
                f"{name} is a float array with values in [{finite.min():g}, {finite.max():g}]; "
                "float pixels must be in [0, 1] or [-1, 1]. Pass uint8 for 0-255 data, or divide "
                "by 255 first."
            )
    else:
        raise ValueError(
            f"{name} has numpy dtype {dtype}; expected uint8, uint16, bool or a float dtype."
        )
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _check_tensor_dtype(tensor: Tensor, name: str) -> Tensor:
    if tensor.dtype in (torch.uint8, torch.bool) or tensor.is_floating_point():
        return tensor
    raise ValueError(
        f"{name} has torch dtype {tensor.dtype}; expected torch.uint8, torch.bool or a float dtype."
    )
