"""Shared fixtures: real photographs and small random-weight checkpoints in the Hub's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nsfw_guard import NSFWDetector
from nsfw_guard.testing import make_checkpoint

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
