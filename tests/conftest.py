"""Shared fixtures: real photographs and small random-weight checkpoints in the Hub's format."""

from __future__ import annotations

import contextlib
import io
import resource
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nsfw_guard import NSFWDetector
from nsfw_guard.testing import make_checkpoint, make_square_checkpoint

DATA = Path(__file__).parent / "data"
PHOTO_PATHS = sorted(DATA.glob("*.jpg"))
HEAD_WEIGHT = "timm_model.head.weight"


def sharpen(folder: Path, factor: float = 30.0) -> Path:
    """Scale a checkpoint's head so its scores spread far from uniform across images."""
    weights = load_file(folder / "model.safetensors")
    weights[HEAD_WEIGHT] = weights[HEAD_WEIGHT] * factor
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs of different sizes and aspect ratios (see tests/data/LICENSE.md)."""
    images = []
    for path in PHOTO_PATHS:
        with Image.open(path) as image:
            image.load()
            images.append(image)
    return images


@pytest.fixture(scope="session")
def rgb_photos(photos) -> list[Image.Image]:
    return [photo.convert("RGB") for photo in photos]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def sharp_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose scores depend strongly on the image."""
    return sharpen(make_checkpoint(tmp_path_factory.mktemp("sharp")))


@pytest.fixture(scope="session")
def square_checkpoint(tmp_path_factory) -> Path:
    """A toy EVA02 trained (about 8 s) to flag a magenta square as "high", from image labels."""
    return make_square_checkpoint(tmp_path_factory.mktemp("square"))


@pytest.fixture(scope="session")
def checker_checkpoint(tmp_path_factory) -> Path:
    """The same toy trained to flag a magenta-and-green checkerboard square: a texture."""
    return make_square_checkpoint(tmp_path_factory.mktemp("checker"), pattern="checker")


@pytest.fixture(scope="session")
def detector(sharp_checkpoint) -> NSFWDetector:
    # float32 pinned: the default dtype depends on the CPU (see test_model.py).
    return NSFWDetector.from_pretrained(sharp_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def level_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per level, forced to predict that level for every input."""
    return {
        level: make_checkpoint(tmp_path_factory.mktemp(level), level=level)
        for level in ("neutral", "low", "medium", "high")
    }


def make_brightness_checkpoint(folder: Path, pivot: float) -> Path:
    """A checkpoint whose verdict is 'high' for images brighter than ``pivot``, else 'neutral'.

    ``pivot`` is in the model's normalized pixel units (0 is the dataset mean). The blocks are
    zeroed into identities, so the pooled feature is the image's mean normalized pixel; the real
    network still runs end to end.
    """
    make_checkpoint(folder)
    weights = load_file(folder / "model.safetensors")
    for key in weights:
        if any(part in key for part in ("attn.proj.", "mlp.fc2.", "pos_embed", "cls_token")):
            weights[key] = torch.zeros_like(weights[key])
    patch = weights["timm_model.patch_embed.proj.weight"]
    patch.zero_()
    patch[0] = 1.0 / patch[0].numel()
    bias = weights["timm_model.patch_embed.proj.bias"]
    bias.zero_()
    bias[0] = -pivot
    head = weights[HEAD_WEIGHT]
    head.zero_()
    head[3, 0], head[0, 0] = 50.0, -50.0
    weights["timm_model.head.bias"].zero_()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def jpeg_with_exif_thumbnail(
    image: Image.Image, thumbnail: Image.Image, orientation: int = 1
) -> bytes:
    """``image`` as a JPEG whose EXIF holds ``thumbnail`` (IFD1, as cameras write it) and the
    ``orientation`` tag: Pillow writes no EXIF thumbnail, so the TIFF structure is built here."""
    small = io.BytesIO()
    thumbnail.save(small, "JPEG")
    # Header (8 bytes); IFD0 at 8 (2 + 12 + 4 bytes) with the orientation; IFD1 at 26 (2 + 2 x 12
    # + 4 bytes) pointing at the thumbnail, which follows at 56.
    tiff = b"II*\x00" + struct.pack("<I", 8)
    tiff += struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, orientation)
    tiff += struct.pack("<I", 26) + struct.pack("<H", 2)
    tiff += struct.pack("<HHII", 0x0201, 4, 1, 56) + struct.pack(
        "<HHII", 0x0202, 4, 1, small.tell()
    )
    tiff += struct.pack("<I", 0) + small.getvalue()
    out = io.BytesIO()
    image.save(out, "JPEG", exif=b"Exif\x00\x00" + tiff)
    return out.getvalue()


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """No file of this process may grow past ``limit`` bytes (RLIMIT_FSIZE), as on a full disk:
    a write past it is cut short there, or fails with EFBIG (SIGXFSZ ignored: an error, not a
    kill)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def tiny_frames_on_a_huge_canvas(side: int, count: int) -> bytes:
    """A GIF of ``count`` 1x1 frames on a ``side x side`` canvas (a few bytes a frame), written by
    hand: Pillow would store whole frames."""
    gif = bytearray(b"GIF89a" + side.to_bytes(2, "little") * 2 + bytes([0xF0, 0, 0]))
    gif += bytes([0, 0, 0, 255, 255, 255])  # two colours
    for i in range(count):
        gif += b"\x21\xf9\x04\x04\x01\x00\x00\x00"  # disposal: keep, 10 ms
        left, top = (i % side).to_bytes(2, "little"), (i // side % side).to_bytes(2, "little")
        gif += b"\x2c" + left + top + (1).to_bytes(2, "little") * 2 + b"\x00"
        gif += bytes([2, 2, 0x44, 0x01, 0])  # one pixel, LZW-coded
    return bytes(gif + b"\x3b")
