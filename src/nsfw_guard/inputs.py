"""Any image a user has → batches of image tensors; the tensor path leaves pixels untouched.

Accepted forms (one image, or a list/tuple of them; arrays and tensors may also be batches):

- PIL images in any mode. Alpha is kept as a fourth channel and composited later, in-graph.
- numpy arrays ``HW``, ``HWC`` or ``BHWC`` (``C`` in 1-4) of uint8, uint16, bool or float.
- torch tensors ``HW``, ``CHW`` or ``BCHW`` (``C`` in 1-4) of uint8, bool or float, on any device.

Channels: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA. uint8 is read as 0-255, uint16 as 0-65535 and
bool as 0/1. Float values follow ``value_range`` (see :data:`VALUE_RANGES`), numpy and torch
alike: by default each image is read as [-1, 1] if it has a negative value, as 0-255 if its
largest value exceeds :data:`AUTO_0_255_ABOVE`, else as [0, 1]; that choice is made in-graph on
the tensor's device, with no host sync. PIL's integer modes (``I``, ``I;16``) are read as
0-65535, or as 0-255 when no value exceeds 255 (Pillow's own conversion of an 8-bit image); its
float mode ``F`` follows ``value_range``, or 0-255 when its values lie outside [-1, 1] (Pillow's
scale again).

A list is converted lazily, one image at a time, as :func:`iter_image_batches` is consumed;
only the types, shapes and dtypes of its items are checked up front.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "AUTO_0_255_ABOVE",
    "VALUE_RANGES",
    "ImageBatch",
    "is_single_image",
    "iter_image_batches",
    "parse_value_range",
    "to_image_batches",
]

VALUE_RANGES = ("auto", "0,1", "-1,1", "0,255")
"""How float pixels are read: ``"0,1"``, ``"-1,1"`` (diffusers' decoded images), ``"0,255"``, or
``"auto"``, which decides per image: ``-1,1`` if it has a negative value, else ``0,255`` if its
largest value exceeds :data:`AUTO_0_255_ABOVE`, else ``0,1``. Values outside the range are
clamped to it (an explicit ``"0,1"`` reads 0-255 data as white; ``"-1,1"`` is diffusers'
denormalize). Pass the range when you know it: 0-255 data with negative values (the overshoot
of a float bicubic resize) would be read as [-1, 1] by ``"auto"``."""

AUTO_0_255_ABOVE = 4.0
"""Under ``value_range="auto"``, an image without negative values whose largest value exceeds
this is read as 0-255: pixels in [0, 1] or [-1, 1] do not reach it, even unclamped (diffusers'
VAE outputs reach about 3.4)."""

_ACCEPTED = (
    "a PIL image, a numpy array (HW, HWC or BHWC; uint8, uint16, bool or float), "
    "a torch tensor (HW, CHW or BCHW; uint8, bool or float), or a list of those"
)


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
    return list(iter_image_batches(images, value_range))


def iter_image_batches(images: Any, value_range: str = "auto") -> Iterator[ImageBatch]:
    """Like :func:`to_image_batches`, but each image of a list is converted only when reached.

    The items' types, shapes and dtypes are checked at once, so bad input fails before any work.

    Example:
        >>> batches = iter_image_batches([np.zeros((8, 8), np.uint8), torch.rand(3, 4, 4)])
        >>> [batch.pixels.shape for batch in batches]
        [torch.Size([1, 1, 8, 8]), torch.Size([1, 3, 4, 4])]
    """
    value_range = parse_value_range(value_range)
    if isinstance(images, list | tuple):
        for i, item in enumerate(images):
            _check_image(item, f"images[{i}]", allow_batch=False)
        return (_convert(item, value_range) for item in images)
    _check_image(images, "images", allow_batch=True)
    batch = _convert(images, value_range)
    return iter([batch] if batch.pixels.shape[0] else [])


def _check_image(image: Any, name: str, allow_batch: bool) -> None:
    """Raise a clear error for anything that is not a usable image (or batch), without reading
    its pixels."""
    if isinstance(image, Image.Image):
        if not image.width or not image.height:
            raise ValueError(f"{name} is empty (size {image.size}).")
        return
    if not isinstance(image, np.ndarray | Tensor):
        raise TypeError(f"{name} is a {type(image).__name__}; expected {_ACCEPTED}.")
    is_numpy = isinstance(image, np.ndarray)
    shape, ndim = tuple(image.shape), image.ndim
    layout = ("HW, HWC" if is_numpy else "HW, CHW") + (
        (" or BHWC" if is_numpy else " or BCHW") if allow_batch else ""
    )
    if not 2 <= ndim <= (4 if allow_batch else 3):
        raise ValueError(f"{name} has shape {shape}; expected {layout}.")
    if is_numpy and not (
        image.dtype in (np.uint8, np.uint16, np.bool_) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(
            f"{name} has numpy dtype {image.dtype}; expected uint8, uint16, bool or a float dtype."
        )
    if not is_numpy and not (image.dtype in (torch.uint8, torch.bool) or image.is_floating_point()):
        raise ValueError(
            f"{name} has torch dtype {image.dtype}; "
            "expected torch.uint8, torch.bool or a float dtype."
        )
    if ndim == 2:
        nchw = (1, 1, *shape)
    elif is_numpy:
        *batch, height, width, channels = shape
        nchw = (*(batch or [1]), channels, height, width)
    else:
        nchw = (1, *shape) if ndim == 3 else shape
    if nchw[1] not in (1, 2, 3, 4):
        hint = ""
        if not is_numpy and nchw[3] in (1, 2, 3, 4):
            hint = " It looks channels-last: torch tensors are CHW, use .permute(2, 0, 1)."
        elif is_numpy and ndim == 3 and nchw[2] in (1, 2, 3, 4):
            hint = " It looks channels-first: numpy arrays are HWC, use .transpose(1, 2, 0)."
        raise ValueError(
            f"{name} has {nchw[1]} channels (shape {nchw} read as N, C, H, W); "
            f"expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) in layout {layout}.{hint}"
        )
    if not nchw[2] or not nchw[3]:
        raise ValueError(f"{name} is empty (shape {nchw}).")


def _convert(image: Image.Image | np.ndarray | Tensor, value_range: str) -> ImageBatch:
    """An image already checked by :func:`_check_image` as ``[N, C, H, W]`` pixels."""
    if isinstance(image, Image.Image):
        return _from_pil(image, value_range)
    return _from_array(image, value_range)


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
            value_range = "0,255"  # not [0, 1] or [-1, 1]: Pillow's own scale (convert("F"))
    elif mode in ("1", "L", "LA", "RGB", "RGBA"):
        array = np.asarray(image)
    elif mode == "La":  # premultiplied; Pillow converts it only to LA
        array = np.asarray(image.convert("LA"))
    else:
        array = np.asarray(image.convert("RGBA" if image.has_transparency_data else "RGB"))
    return _from_array(array, value_range)


def _from_array(array: np.ndarray | Tensor, value_range: str) -> ImageBatch:
    """``[N, C, H, W]`` pixels of a checked array or tensor (numpy ones become CPU tensors)."""
    ndim = array.ndim
    if isinstance(array, np.ndarray):
        if array.dtype == np.uint16:
            value_range = "0,1"
        tensor = _numpy_to_tensor(array)
        if ndim == 2:
            tensor = tensor[None, None]
        else:
            tensor = (tensor[None] if ndim == 3 else tensor).permute(0, 3, 1, 2)
    else:
        tensor = array[None, None] if ndim == 2 else array[None] if ndim == 3 else array
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8) * 255
    return ImageBatch(tensor, value_range)


def _numpy_to_tensor(array: np.ndarray) -> Tensor:
    """A CPU tensor of a checked array: uint16 scaled to [0, 1], floats as float32."""
    if array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif array.dtype != np.uint8 and array.dtype != np.bool_:
        array = array.astype(np.float32, copy=False)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)
