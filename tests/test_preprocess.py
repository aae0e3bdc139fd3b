"""In-graph preprocessing against timm's own PIL transform, for each crop mode."""

import numpy as np
import pytest
import torch
from timm.data import create_transform, resolve_data_config

from nsfw_guard.preprocess import DataConfig, Preprocess, resized_size
from nsfw_guard.testing import ARCHITECTURE, PRETRAINED_TAG

EVA_CFG = resolve_data_config(
    pretrained_cfg=__import__("timm")
    .models.get_pretrained_cfg(f"{ARCHITECTURE}.{PRETRAINED_TAG}")
    .to_dict()
)


def _pil_reference(photos, pretrained_cfg):
    transform = create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg))
    return torch.stack([transform(photo) for photo in photos])


def _tensor_path(photos, pretrained_cfg, dtype=torch.uint8):
    preprocess = Preprocess(DataConfig.from_pretrained_cfg(pretrained_cfg))
    out = []
    for photo in photos:
        array = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None]
        pixels, verifiable = preprocess(array if dtype == torch.uint8 else array.to(dtype) / 255)
        assert verifiable.all()
        out.append(pixels[0])
    return torch.stack(out)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the model's own: squash, crop_pct 1.0
        {"crop_mode": "center", "crop_pct": 0.9},
        {"crop_mode": "border", "crop_pct": 1.0},
        {"crop_mode": "squash", "crop_pct": 0.875, "interpolation": "bilinear"},
    ],
)
def test_uint8_images_match_timm_pil_transform_almost_exactly(rgb_photos, overrides):
    cfg = {**EVA_CFG, **overrides}
    reference = _pil_reference(rgb_photos, cfg)
    ours = _tensor_path(rgb_photos, cfg)
    assert ours.shape == reference.shape == (len(rgb_photos), 3, 448, 448)
    diff = (ours - reference).abs()
    # uint8 images are resized as uint8, like PIL: one uint8 step is 1/255/std ~ 0.015 in
    # normalized units, and nearly every pixel is identical (a float resize: mean 0.004).
    assert diff.mean() < 0.0015
    assert (diff > 0.03).float().mean() < 5e-5
    assert diff.max() < 0.1


def test_float_images_match_timm_pil_transform_within_a_uint8_step(rgb_photos):
    reference = _pil_reference(rgb_photos, EVA_CFG)
    diff = (_tensor_path(rgb_photos, EVA_CFG, torch.float32) - reference).abs()
    # PIL rounds and clamps to uint8 between its horizontal and vertical passes, which a float
    # resize does not: a few pixels at hard edges move more than a step.
    assert diff.mean() < 0.006
    assert (diff > 0.03).float().mean() < 1e-3
    assert diff.max() < 0.2


def test_resized_size_follows_timm_for_each_mode():
    squash = DataConfig.from_pretrained_cfg(EVA_CFG)
    assert resized_size(300, 451, squash) == [448, 448]
    center = DataConfig.from_pretrained_cfg({**EVA_CFG, "crop_mode": "center", "crop_pct": 0.875})
    assert resized_size(300, 451, center) == [512]  # shorter edge, as torchvision's Resize(int)
    border = DataConfig.from_pretrained_cfg({**EVA_CFG, "crop_mode": "border"})
    assert resized_size(300, 451, border) == [298, 448]


def test_value_ranges_map_to_the_same_pixels():
    preprocess = Preprocess(DataConfig.from_pretrained_cfg(EVA_CFG))
    unit = torch.rand(2, 3, 64, 80)
    signed, byte_scale = unit * 2 - 1, unit * 255
    expected, _ = preprocess(unit, "0,1")
    for images, value_range in [
        (signed, "-1,1"),
        (signed, "auto"),
        (unit, "auto"),
        (byte_scale, "0,255"),
        (byte_scale, "auto"),
    ]:
        torch.testing.assert_close(preprocess(images, value_range)[0], expected)


def test_auto_range_is_decided_per_image_in_graph():
    preprocess = Preprocess(DataConfig.from_pretrained_cfg(EVA_CFG))
    unit = torch.rand(3, 3, 32, 32)
    # Brightest pixel 3.4, as unclamped diffusers VAE outputs reach: still [-1, 1], not 0-255.
    signed = unit * 2 - 1
    signed[1, 0, 0, 0] = 3.4
    mixed = torch.stack([unit[0], signed[1], unit[2] * 255])
    expected, _ = preprocess(torch.stack([unit[0], signed[1].clamp(-1, 1) / 2 + 0.5, unit[2]]))
    torch.testing.assert_close(preprocess(mixed)[0], expected)
    # Exported from other images, the graph still decides per image: no branch on values.
    exported = torch.export.export(preprocess, (torch.rand(3, 3, 32, 32),))
    with torch.inference_mode():
        torch.testing.assert_close(exported.module()(mixed)[0], expected)


def test_explicit_ranges_clamp_like_diffusers_denormalize():
    preprocess = Preprocess(DataConfig.from_pretrained_cfg(EVA_CFG))
    wild = torch.full((1, 3, 16, 16), 3.4)
    wild[..., :8] = -2.6
    for value_range, images in [("-1,1", wild), ("0,1", wild), ("0,255", wild * 100)]:
        low, high = (float(v) for v in value_range.split(","))
        torch.testing.assert_close(
            preprocess(images, value_range)[0], preprocess(images.clamp(low, high), value_range)[0]
        )


def test_non_finite_images_are_unverifiable_and_zeroed():
    preprocess = Preprocess(DataConfig.from_pretrained_cfg(EVA_CFG))
    images = torch.rand(4, 3, 32, 32)
    images[1, 0, 5, 5] = float("nan")
    images[2, 2, 0, 0] = float("inf")
    images[3, 1, 31, 31] = -float("inf")
    pixels, verifiable = preprocess(images)
    assert verifiable.tolist() == [True, False, False, False]
    assert torch.isfinite(pixels).all()


def test_alpha_is_composited_over_the_background():
    cfg = DataConfig.from_pretrained_cfg(EVA_CFG)
    rgba = torch.zeros(1, 4, 16, 16)  # black, fully transparent
    white = torch.ones(1, 3, 16, 16)
    torch.testing.assert_close(Preprocess(cfg)(rgba)[0], Preprocess(cfg)(white)[0])
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    torch.testing.assert_close(
        Preprocess(cfg, background=(1.0, 0.0, 0.0))(rgba)[0], Preprocess(cfg)(red)[0]
    )
    gray_alpha = torch.ones(1, 2, 16, 16)  # opaque white
    torch.testing.assert_close(Preprocess(cfg)(gray_alpha)[0], Preprocess(cfg)(white)[0])


def test_bad_background_and_config_are_clear_errors():
    cfg = DataConfig.from_pretrained_cfg(EVA_CFG)
    with pytest.raises(ValueError, match="RGB triple in \\[0, 1\\]"):
        Preprocess(cfg, background=(255, 255, 255))
    with pytest.raises(ValueError, match="crop_mode 'random'"):
        DataConfig.from_pretrained_cfg({**EVA_CFG, "crop_mode": "random"})
    with pytest.raises(ValueError, match="interpolation 'lanczos'"):
        DataConfig.from_pretrained_cfg({**EVA_CFG, "interpolation": "lanczos"})
