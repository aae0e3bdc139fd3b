"""Censor operations: batched, shape-keeping, and applied only where the mask says."""

import numpy as np
import pytest
import torch

from nsfw_guard import censor


@pytest.fixture(scope="module")
def photos_tensor(rgb_photos) -> torch.Tensor:
    """Two real photos, same size, as a float batch in [0, 1]."""
    arrays = [np.array(p.resize((256, 192))) for p in rgb_photos[:2]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _roughness(images: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels: high for detail, ~0 for smooth."""
    return float((images[..., 1:] - images[..., :-1]).abs().mean())


def test_blur_removes_detail_and_scales_with_the_image(photos_tensor):
    blurred = censor.blur(photos_tensor)
    assert blurred.shape == photos_tensor.shape and blurred.dtype == photos_tensor.dtype
    assert _roughness(blurred) < _roughness(photos_tensor) / 10
    assert (blurred - photos_tensor).abs().mean() > 0.05
    assert _roughness(censor.blur(photos_tensor, radius=0.02)) > _roughness(blurred)
    # Strength is relative to the size: a 2x larger image blurs to the 2x larger blur.
    big = torch.nn.functional.interpolate(photos_tensor, scale_factor=2, mode="bilinear")
    small_then_up = torch.nn.functional.interpolate(blurred, scale_factor=2, mode="bilinear")
    assert (censor.blur(big) - small_then_up).abs().mean() < 0.02


@pytest.mark.parametrize("block_size", [32, 16])
def test_pixelate_makes_a_grid_of_flat_blocks_of_block_size(photos_tensor, block_size):
    pixelated = censor.pixelate(photos_tensor, block_size=block_size)  # 192 x 256 images
    assert pixelated.shape == photos_tensor.shape
    cells = pixelated.unfold(2, block_size, block_size).unfold(3, block_size, block_size)
    assert cells.shape[2:4] == (192 // block_size, 256 // block_size)
    assert torch.all(cells.amax(dim=(-1, -2)) == cells.amin(dim=(-1, -2)))
    assert (pixelated - photos_tensor).abs().mean() > 0.05


def test_pixelate_default_blocks_scale_with_the_image(photos_tensor):
    # 1/12 of the longer side: 256 / 12 ≈ 21 px here, 42 px at twice the size.
    for scale in (1, 2):
        images = torch.nn.functional.interpolate(photos_tensor, scale_factor=scale)
        pixelated = censor.pixelate(images)
        row = pixelated[0, 0, 0]
        assert (row[1:] != row[:-1]).sum() == 11  # 12 blocks across


def test_blank_fills_exactly(photos_tensor):
    filled = censor.blank(photos_tensor, color=(1.0, 0.25, 0.0))
    assert filled[:, 0].eq(1.0).all() and filled[:, 1].eq(0.25).all() and filled[:, 2].eq(0).all()
    assert censor.blank(photos_tensor).eq(0).all()
    assert censor.blank(photos_tensor, color=0.5).eq(0.5).all()


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_blank_works_on_any_number_of_channels(channels):
    images = torch.rand(2, channels, 8, 8)
    assert censor.blank(images).eq(0).all()  # black by default
    color = tuple(i / 4 for i in range(channels))
    out = censor.apply(images, torch.tensor([True, False]), "blank", color=color)
    assert [out[0, c].unique().item() for c in range(channels)] == list(color)
    assert torch.equal(out[1], images[1])


def test_apply_censors_only_masked_images(photos_tensor):
    mask = torch.tensor([False, True])
    for action in ("blur", "pixelate", "blank", lambda x: 1 - x):
        out = censor.apply(photos_tensor, mask, action)
        assert torch.equal(out[0], photos_tensor[0])  # bit-identical
        assert not torch.equal(out[1], photos_tensor[1])
    assert censor.apply(photos_tensor, mask, "none") is photos_tensor
    out = censor.apply(photos_tensor, mask, "blank", color=(1.0, 1.0, 1.0))
    assert out[1].eq(1.0).all()


def test_apply_keeps_dtype_and_works_batched_in_half(photos_tensor):
    half = photos_tensor.half()
    out = censor.apply(half, torch.tensor([True, True]), "blur")
    assert out.dtype == torch.float16 and out.shape == half.shape


def test_bad_actions_and_parameters_are_clear_errors(photos_tensor):
    mask = torch.tensor([True, False])
    with pytest.raises(ValueError, match="action='smudge' is not supported; use one of 'blur'"):
        censor.apply(photos_tensor, mask, "smudge")
    with pytest.raises(ValueError, match="must keep the shape"):
        censor.apply(photos_tensor, mask, lambda x: x[:, :, :10])
    with pytest.raises(ValueError, match="blur radius=0"):
        censor.blur(photos_tensor, radius=0)
    with pytest.raises(ValueError, match="pixelate block_size=0: expected a positive number"):
        censor.pixelate(photos_tensor, block_size=0)
    with pytest.raises(ValueError, match="color=\\(255, 0, 0\\): expected one number or 3"):
        censor.blank(photos_tensor, color=(255, 0, 0))
    with pytest.raises(ValueError, match="color=\\(1, 1\\): expected one number or 3"):
        censor.blank(photos_tensor, color=(1, 1))
    with pytest.raises(ValueError, match="radius= is not a parameter of action 'pixelate'"):
        censor.apply(photos_tensor, mask, "pixelate", radius=0.1)
    with pytest.raises(ValueError, match="blur radius=-1"):
        censor.check_params("blur", {"radius": -1})


def test_censoring_tiny_images_works():
    tiny = torch.rand(2, 3, 3, 5)
    for action in ("blur", "pixelate", "blank"):
        assert censor.apply(tiny, torch.tensor([True, True]), action).shape == tiny.shape
