"""One decoder for ``nsfw-guard scan``, ``nsfw-guard check`` and the library: a file (or its
bytes) → the frames to check, EXIF-oriented, in any PIL mode and size, with the exact bytes that
were decoded.

Censored or clean copies are made from :attr:`DecodedImage.data`, never by reading the file
again, so a file replaced while it is being scanned can never be copied unchecked.

- :func:`read_file` reads regular files only: FIFOs, sockets, devices and folders raise
  :class:`NotARegularFile` before a byte is read, and a FIFO never blocks. Links to files are
  followed; link loops and broken links raise the usual ``OSError``.
- :func:`decode_image` treats an image over Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``), or
  whose frames add up to over :data:`FILE_PIXELS_IN_FRAMES` times it, as an error, applies EXIF
  orientation to every frame, takes every frame or ``max_frames`` spread evenly, and box-reduces
  very large frames (any mode) before they become tensors. With
  ``frame_limit`` it decodes only the first of those frames and leaves the others ``later``, for
  :func:`decode_frames` to stream a chunk at a time (an animation's memory stays bounded).
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .inputs import ImageBatch, to_image_batches
from .preprocess import seen_rgb

__all__ = [
    "FILE_PIXELS_IN_FRAMES",
    "DecodedImage",
    "NotARegularFile",
    "count_frames",
    "decode_file",
    "decode_frames",
    "decode_image",
    "file_kind",
    "frame_indices",
    "iter_frames",
    "open_regular",
    "read_file",
]

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once instead of waiting for a writer
    | getattr(os, "O_NOCTTY", 0)  # a terminal never becomes this process's controlling one
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)  # Windows
)
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
# Modes whose box reduce is right as it is: Pillow premultiplies LA and RGBA by their alpha.
# "I" and "F" reduce too, but need their value scale fixed on the full frame (see _to_batches).
_REDUCES = frozenset(["L", "LA", "La", "RGB", "RGBA", "RGBa"])
_EXIF_ORIENTATION = 0x0112


class NotARegularFile(OSError):
    """A path that is a FIFO, a socket, a device or a folder: never opened for reading.

    Example:
        >>> read_file("tests/data")
        Traceback (most recent call last):
        nsfw_guard.decode.NotARegularFile: tests/data: a folder, not a regular file
    """


@dataclass(frozen=True)
class DecodedImage:
    """The frames of one image to check, and what they were decoded from.

    ``frames`` holds one ``[1, C, H, W]`` batch per decoded frame: EXIF-oriented, and
    box-reduced when far larger than the model's input (``target_size``). ``width`` and
    ``height`` are the full size of the oriented first frame. ``frame_indices`` says which of
    the file's ``frame_count`` frames are in ``frames``, ``later`` which further frames are to
    be checked (decoded by :func:`decode_frames`); ``data`` is the exact bytes decoded.

    Example:
        >>> image = decode_file("tests/data/chelsea.jpg")
        >>> image.format, image.width, image.height, image.frame_indices, image.all_frames_checked
        ('JPEG', 451, 300, (0,), True)
        >>> image.frames[0].pixels.shape
        torch.Size([1, 3, 300, 451])
    """

    frames: list[ImageBatch]
    width: int
    height: int
    frame_count: int
    frame_indices: tuple[int, ...]
    data: bytes
    format: str | None
    later: tuple[int, ...] = ()

    @property
    def all_frames_checked(self) -> bool:
        """Whether every frame of the file is to be checked: in ``frames`` or ``later`` (not
        only a sample of them).

        Example:
            >>> decode_file("tests/data/rocket.jpg", max_frames=1).all_frames_checked
            True
        """
        return len(self.frame_indices) + len(self.later) == self.frame_count


def read_file(path: str | os.PathLike) -> bytes:
    """The whole content of the regular file at ``path`` (links followed).

    Raises :class:`NotARegularFile` for a FIFO, a socket, a device or a folder without reading
    from it (and without blocking), even when one replaces the file between the check and the
    open; ``OSError`` as usual for a missing file, a broken link or a link loop.

    Example:
        >>> data = read_file("tests/data/astronaut.jpg")
        >>> data[:2], len(data) == os.path.getsize("tests/data/astronaut.jpg")
        (b'\\xff\\xd8', True)
    """
    with open_regular(path) as file:
        return file.read()


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """The regular file at ``path`` opened for binary reading, with :func:`read_file`'s checks:
    a FIFO, socket, device or folder raises :class:`NotARegularFile` and is never read.

    Example:
        >>> with open_regular("tests/data/astronaut.jpg") as file:
        ...     file.read(2)
        b'\\xff\\xd8'
    """
    _check_regular(os.stat(path), path)  # special files are not even opened
    descriptor = os.open(path, _OPEN_FLAGS)
    try:
        file = open(descriptor, "rb")  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(descriptor)
        raise
    try:
        _check_regular(os.fstat(descriptor), path)  # what was opened, if it was just replaced
        if _OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(descriptor, True)
    except BaseException:
        file.close()
        raise
    return file


def _check_regular(status: os.stat_result, path: str | os.PathLike) -> None:
    if stat.S_ISREG(status.st_mode):
        return
    raise NotARegularFile(f"{os.fsdecode(path)}: {file_kind(status.st_mode)}, not a regular file")


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words, from its ``st_mode``.

    Example:
        >>> file_kind(os.stat("tests").st_mode)
        'a folder'
    """
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def decode_image(
    data: bytes,
    *,
    max_frames: int | None = None,
    target_size: int | None = None,
    frame_limit: int | None = None,
) -> DecodedImage:
    """Decode an image file's bytes into the frames to check.

    Every frame is taken when ``max_frames`` is None; else at most ``max_frames`` frames spread
    evenly over the file (:func:`frame_indices`). With ``frame_limit``, only the first
    ``frame_limit`` of them are decoded; the rest are left ``later``. A frame whose
    shorter side is at least 4x ``target_size`` (the model's input side) is box-reduced by an
    integer factor that keeps it at least 2x ``target_size``, before it becomes a tensor, so a
    huge image is never held as floats; palette, bilevel and 16-bit frames are converted first
    to a mode that reduces correctly. Frames are decoded one at a time.

    Raises ``Image.DecompressionBombError`` for an image over Pillow's pixel limit,
    ``UnidentifiedImageError`` for empty or unrecognised data, and whatever Pillow raises for a
    truncated or corrupt file (usually ``OSError``).

    Example:
        >>> frames = [Image.new("L", (32, 24), 6 * i) for i in range(40)]
        >>> buffer = io.BytesIO()
        >>> frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
        >>> image = decode_image(buffer.getvalue(), max_frames=4)
        >>> image.format, image.frame_count, image.frame_indices, (image.width, image.height)
        ('GIF', 40, (0, 13, 26, 39), (32, 24))
        >>> streamed = decode_image(buffer.getvalue(), frame_limit=16)
        >>> len(streamed.frames), streamed.later[:3], streamed.all_frames_checked
        (16, (16, 17, 18), True)
        >>> big = io.BytesIO()
        >>> Image.new("1", (2000, 1800)).save(big, "PNG")
        >>> decode_image(big.getvalue(), target_size=448).frames[0].pixels.shape
        torch.Size([1, 1, 900, 1000])
    """
    for name, value in (("max_frames", max_frames), ("frame_limit", frame_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if target_size is not None and target_size < 1:
        raise ValueError(f"target_size must be at least 1, not {target_size}")
    if not isinstance(data, bytes):
        data = bytes(data)
    if not data:
        raise UnidentifiedImageError("cannot identify image file: it is empty (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns past its pixel limit and raises at twice it: both are errors here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(data, max_frames, target_size, frame_limit)
        except Image.DecompressionBombWarning as warning:
            raise Image.DecompressionBombError(str(warning)) from None


def decode_file(
    path: str | os.PathLike, *, max_frames: int | None = None, target_size: int | None = None
) -> DecodedImage:
    """:func:`read_file`, then :func:`decode_image` of its bytes.

    Example:
        >>> image = decode_file("tests/data/camera_gray.jpg", target_size=64)
        >>> image.width, image.height, image.frames[0].pixels.shape
        (512, 512, torch.Size([1, 1, 128, 128]))
    """
    return decode_image(read_file(path), max_frames=max_frames, target_size=target_size)


def _decode(
    data: bytes, max_frames: int | None, target_size: int | None, frame_limit: int | None
) -> DecodedImage:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(
            f"cannot identify image file: not an image, or a format Pillow cannot read "
            f"({len(data)} bytes starting {data[:8]!r})"
        ) from None
    with image:
        positions = _positions(image)
        indices = frame_indices(len(positions), max_frames)
        limit = len(indices) if frame_limit is None else frame_limit
        now, later = indices[:limit], indices[limit:]
        frames: list[ImageBatch] = []
        width = height = 0
        for index in now:
            frame = _frame_at(image, positions[index])
            batches = _to_batches(frame, target_size)
            if not frames:
                width, height = frame.size
                batches += _unlike_thumbnail(image, batches[0], target_size)
            frames.extend(batches)
            del frame  # one full-size frame at a time
        return DecodedImage(
            frames=frames,
            width=width,
            height=height,
            frame_count=len(positions),
            frame_indices=now,
            data=data,
            format=image.format,
            later=later,
        )


def frame_indices(count: int, max_frames: int | None = None) -> tuple[int, ...]:
    """Which of ``count`` frames to check: all of them (``max_frames`` None), or at most
    ``max_frames`` spread evenly, the first and (from two on) the last always among them.

    Example:
        >>> frame_indices(40, 4), frame_indices(3, 16)
        ((0, 13, 26, 39), (0, 1, 2))
    """
    if max_frames is None or count <= max_frames:
        return tuple(range(count))
    return tuple(sorted(set(np.linspace(0, count - 1, max_frames).round().astype(int).tolist())))


def decode_frames(
    data: bytes, indices: Sequence[int] | None = None, target_size: int | None = None
) -> Iterator[ImageBatch]:
    """The frames at ``indices`` (ascending; ``None``: every frame) of the image in ``data``,
    decoded one at a time as :func:`decode_image` decodes them: an animation streamed in
    bounded memory.

    Example:
        >>> frames = [Image.new("L", (32, 24), 6 * i) for i in range(40)]
        >>> buffer = io.BytesIO()
        >>> frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
        >>> [batch.pixels[0, 0, 0, 0].item() for batch in decode_frames(buffer.getvalue(), [1, 39])]
        [6, 234]
    """
    for frame in iter_frames(data, indices):
        yield from _to_batches(frame, target_size)


def iter_frames(data: bytes, indices: Sequence[int] | None = None) -> Iterator[Image.Image]:
    """The frames at ``indices`` (ascending; ``None``: every frame) of the image in ``data``
    (what :func:`decode_image` counts as frames), oriented, one at a time, each valid until the
    next is asked for. A frame over Pillow's pixel limit raises ``DecompressionBombError``.

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (8, 8)).save(buffer, "ICO", sizes=[(8, 8), (4, 4)])
        >>> [frame.size for frame in iter_frames(buffer.getvalue())]
        [(4, 4), (8, 8)]
    """
    with Image.open(io.BytesIO(data)) as image:
        positions = _positions(image)
        for index in range(len(positions)) if indices is None else indices:
            with warnings.catch_warnings():  # per frame: never left set while suspended
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                try:
                    frame = _frame_at(image, positions[index])
                except Image.DecompressionBombWarning as warning:
                    raise Image.DecompressionBombError(str(warning)) from None
            yield frame


def count_frames(image: Image.Image) -> int:
    """How many frames of the open ``image`` :func:`decode_image` checks (an icon's sizes count
    as frames); raises ``DecompressionBombError`` where they add up to more pixels than a file
    may hold (see :data:`FILE_PIXELS_IN_FRAMES`).

    Example:
        >>> with Image.open("tests/data/chelsea.jpg") as image:
        ...     count_frames(image)
        1
    """
    return len(_positions(image))


def _positions(image: Image.Image) -> list[int | tuple[int, ...]]:
    """Where the frames are: frame numbers, or for icons (ICO, ICNS) the sizes they hold,
    each a picture of its own (a small one need not be the large one scaled down); for a PSD
    its composite image, what viewers show (its layers are not read).

    Raises ``DecompressionBombError`` for a file whose frames hold more than
    :data:`FILE_PIXELS_IN_FRAMES` times Pillow's pixel limit in all: each frame is decoded
    whole, so a small file of many frames on a large canvas could take hours."""
    sizes = image.info.get("sizes") if image.format in ("ICO", "ICNS") else None
    if sizes:
        positions = sorted(sizes)
    elif image.format == "PSD":  # its composite, loaded on open (Pillow's "frames" are layers)
        positions = [image.tell()]
    else:
        positions = list(range(getattr(image, "n_frames", 1)))
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        pixels = (
            sum(math.prod(size[:2]) for size in positions)
            if sizes
            else len(positions) * image.width * image.height
        )
        if pixels > FILE_PIXELS_IN_FRAMES * limit:
            raise Image.DecompressionBombError(
                f"{len(positions)} frames of {image.width}x{image.height} are {pixels} pixels "
                f"to decode, more than a file may hold: {FILE_PIXELS_IN_FRAMES} frames' worth "
                f"of Pillow's pixel limit ({FILE_PIXELS_IN_FRAMES} x {limit})"
            )
    return positions


FILE_PIXELS_IN_FRAMES = 20
"""How many frames at Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``) one file's frames may add
up to: 1.8 billion pixels by default (1,900 frames of 1280x720), seconds to decode."""


def _frame_at(image: Image.Image, position: int | tuple[int, ...]) -> Image.Image:
    """The oriented frame at ``position`` (see :func:`_positions`)."""
    if isinstance(position, tuple):
        if len(position) == 3:  # ICNS: (width, height, scale), which it loads as its best_size
            image.best_size = position
            position = (position[0] * position[2], position[1] * position[2])
        image.size = position
    elif position != image.tell():  # a single-image SPIDER file refuses even seek(0)
        image.seek(position)
    return _oriented(image)


def _oriented(image: Image.Image) -> Image.Image:
    """The current frame with its EXIF orientation applied (the image itself when upright)."""
    image.load()
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _to_batches(frame: Image.Image, target_size: int | None) -> list[ImageBatch]:
    """A frame as image batches, box-reduced first when far larger than ``target_size``.

    ``Image.reduce`` rejects modes 1, P and I;16 ("image has wrong mode") and averages PA's
    palette indices as if they were colours, so frames in those and the other modes that
    :func:`~nsfw_guard.inputs.to_image_batches` converts anyway are converted first: 1 → L,
    I;16 → I, and P, PA, CMYK, YCbCr, LAB, HSV, RGBX → RGBA when they carry transparency, else
    RGB. The value scale of I (0-255 or 0-65535) and F frames is decided on the full frame,
    as ``to_image_batches`` would decide it, since averaging can move the few values it rests on.
    """
    factor = min(frame.size) // (2 * target_size) if target_size else 0
    if factor < 2:
        return to_image_batches(frame)
    mode = frame.mode
    if mode == "I" or mode.startswith("I;16"):
        frame = frame if mode == "I" else frame.convert("I")  # exact; I;16B has no extrema
        sixteen_bit = frame.getextrema()[1] > 255  # how inputs.py reads the unreduced frame
        reduced = frame.reduce(factor)
        if not sixteen_bit:
            return to_image_batches(reduced)
        return to_image_batches(np.asarray(reduced).clip(0, 65535).astype(np.uint16))
    if mode == "F":
        return to_image_batches(frame.reduce(factor), _float_range(frame))
    if mode == "1":
        frame = frame.convert("L")
    elif mode not in _REDUCES:
        frame = frame.convert("RGBA" if frame.has_transparency_data else "RGB")
    return to_image_batches(frame.reduce(factor))


def _unlike_thumbnail(
    image: Image.Image, first: ImageBatch, target_size: int | None
) -> list[ImageBatch]:
    """The file's EXIF thumbnail as batches to check with its first frame, where it is not a
    miniature of that frame (``first``): a picture of its own, which viewers and file browsers
    show. None where it is a miniature (a camera's), absent, or undecodable (nothing can show
    it)."""
    thumbnail = _exif_thumbnail(image)
    if thumbnail is None:
        return []
    batches = _to_batches(thumbnail, target_size)
    shown, miniature = seen_rgb(batches[0]), seen_rgb(first)
    miniature = torch.nn.functional.interpolate(miniature, shown.shape[-2:], mode="area")
    differs = (shown - miniature).abs().amax(dim=1) > THUMBNAIL_PIXEL_DIFFERS
    return batches if differs.float().mean() > THUMBNAIL_AREA_DIFFERS else []


THUMBNAIL_PIXEL_DIFFERS = 0.25
"""A thumbnail pixel differs from the image's miniature when a channel is off by this much."""
THUMBNAIL_AREA_DIFFERS = 0.01
"""A thumbnail is a picture of its own when more than this share of its pixels differ (JPEG
artefacts and resampling stay far below; a 14x14 insert in a 160x120 thumbnail is above)."""


def _exif_thumbnail(image: Image.Image) -> Image.Image | None:
    """The EXIF thumbnail (IFD1's JPEG) of ``image``, oriented as the image is; ``None`` where
    there is none or it cannot be decoded."""
    exif = image.info.get("exif")
    if not isinstance(exif, bytes):
        return None
    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    try:
        parsed = image.getexif()
        ifd1 = parsed.get_ifd(ExifTags.IFD.IFD1)
        start, length = ifd1.get(_THUMBNAIL_OFFSET), ifd1.get(_THUMBNAIL_LENGTH)
        if not isinstance(start, int) or not isinstance(length, int) or length <= 0:
            return None
        thumbnail = Image.open(io.BytesIO(tiff[start : start + length]))
        thumbnail.load()
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return None
    transpose = _TRANSPOSES.get(parsed.get(_EXIF_ORIENTATION, 1))
    return thumbnail.transpose(transpose) if transpose is not None else thumbnail


_THUMBNAIL_OFFSET, _THUMBNAIL_LENGTH = 0x0201, 0x0202  # JPEGInterchangeFormat(Length)
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _float_range(frame: Image.Image) -> str:
    """The value range ``to_image_batches`` reads an unreduced mode-F frame in."""
    low, high = frame.getextrema()
    if not (math.isfinite(low) and math.isfinite(high)):
        array = np.asarray(frame, dtype=np.float32)
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if max(abs(low), abs(high)) > 1:
        return "0,255"  # Pillow's scale, as inputs.py reads it
    return "-1,1" if low < 0 else "0,1"
