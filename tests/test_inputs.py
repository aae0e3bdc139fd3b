"""Every input form scores like the equivalent RGB PIL image; bad input is a clear error."""

import numpy as np
import pytest
import torch
from PIL import Image

from nsfw_guard.inputs import is_single_image, parse_value_range, to_image_batches

from .conftest import PHOTO_PATHS

TOLERANCE = 2e-3  # float vs uint8 rounding, amplified by the sharpened head


@pytest.fixture(scope="module")
def photo(rgb_photos) -> Image.Image:
    return rgb_photos[2]  # 451 x 300, not square


@pytest.fixture(scope="module")
def rgb_array(photo) -> np.ndarray:
    return np.array(photo)


@pytest.fixture(scope="module")
def alpha(photo) -> np.ndarray:
    """A left-to-right alpha ramp, fully transparent to opaque."""
    width, height = photo.size
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    a = alpha[..., None].astype(np.float64) / 255
    return Image.fromarray((rgb * a + 255 * (1 - a)).round().astype(np.uint8))


def _assert_same(detector, images, equivalent, tolerance=TOLERANCE, **kwargs):
    got = detector.scores(images, **kwargs)
    expected = detector.scores(equivalent)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= tolerance, (got, expected)


def _gray(photo):
    return photo.convert("L")


PIL_CASES = {
    "1": lambda p: (p.convert("1"), p.convert("1").convert("RGB")),
    "L": lambda p: (_gray(p), _gray(p).convert("RGB")),
    "P": lambda p: (p.convert("P"), p.convert("P").convert("RGB")),
    "CMYK": lambda p: (p.convert("CMYK"), p.convert("CMYK").convert("RGB")),
    "YCbCr": lambda p: (p.convert("YCbCr"), p.convert("YCbCr").convert("RGB")),
    "I": lambda p: (
        Image.fromarray(np.array(_gray(p)).astype(np.int32) * 257),
        _gray(p).convert("RGB"),
    ),
    "I;16": lambda p: (
        Image.fromarray(np.array(_gray(p)).astype(np.uint16) * 257),
        _gray(p).convert("RGB"),
    ),
    "F": lambda p: (
        Image.fromarray(np.array(_gray(p)).astype(np.float32) / 255),
        _gray(p).convert("RGB"),
    ),
    # Pillow's own conversions of 8-bit images keep the 0-255 scale.
    "I from L": lambda p: (_gray(p).convert("I"), _gray(p).convert("RGB")),
    "I;16 from L": lambda p: (_gray(p).convert("I;16"), _gray(p).convert("RGB")),
    "F from L": lambda p: (_gray(p).convert("F"), _gray(p).convert("RGB")),
}


@pytest.mark.parametrize("mode", list(PIL_CASES))
def test_pil_modes_score_like_their_rgb_conversion(detector, photo, mode):
    image, equivalent = PIL_CASES[mode](photo)
    assert image.mode == mode.split()[0]
    _assert_same(detector, image, equivalent)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "La", "RGBa", "PA", "P-transparency"])
def test_alpha_is_composited_over_white(detector, photo, rgb_array, alpha, mode):
    rgba = Image.fromarray(np.dstack([rgb_array, alpha]))
    if mode == "RGBA":
        image, equivalent = rgba, _over_white(rgb_array, alpha)
    elif mode in ("LA", "La"):
        image = rgba.convert("LA")
        gray = np.array(image)[..., 0]
        equivalent = _over_white(np.dstack([gray] * 3), alpha)
        image = image.convert(mode)
    elif mode == "RGBa":
        image = rgba.convert("RGBa")
        equivalent = _over_white(np.array(image.convert("RGBA"))[..., :3], alpha)
    elif mode == "PA":
        # Pillow < 11 drops alpha converting RGBA to PA, so the alpha band is put in explicitly.
        image = rgba.convert("RGB").convert("P").convert("PA")
        image.putalpha(Image.fromarray(alpha))
        equivalent = _over_white(np.array(image.convert("RGB")), alpha)
    else:
        image = photo.convert("P")
        image.info["transparency"] = 0
        opaque = (np.array(image) != 0).astype(np.uint8) * 255
        equivalent = _over_white(np.array(image.convert("RGB")), opaque)
    assert image.mode == mode.split("-")[0]
    _assert_same(detector, image, equivalent)


def test_transparent_image_is_not_the_hidden_rgb(detector, rgb_array):
    invisible = Image.fromarray(np.dstack([rgb_array, np.zeros(rgb_array.shape[:2], np.uint8)]))
    blank = Image.new("RGB", invisible.size, "white")
    _assert_same(detector, invisible, blank)


def test_numpy_forms(detector, photo, rgb_array, alpha):
    gray = np.array(_gray(photo))
    gray_rgb = _gray(photo).convert("RGB")
    _assert_same(detector, rgb_array, photo)
    _assert_same(detector, gray, gray_rgb)
    _assert_same(detector, gray[..., None], gray_rgb)
    _assert_same(detector, np.dstack([gray, alpha]), _over_white(np.dstack([gray] * 3), alpha))
    _assert_same(detector, np.dstack([rgb_array, alpha]), _over_white(rgb_array, alpha))
    _assert_same(detector, rgb_array.astype(np.uint16) * 257, photo)
    _assert_same(detector, rgb_array.astype(np.float32) / 255, photo)
    _assert_same(detector, rgb_array.astype(np.float64) / 127.5 - 1, photo)
    _assert_same(detector, rgb_array.astype(np.float16) / 255, photo)
    _assert_same(detector, np.stack([rgb_array, rgb_array]), [photo, photo])
    mask = gray > 128
    _assert_same(detector, mask, Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"))


def test_torch_forms(detector, photo, rgb_array):
    chw = torch.from_numpy(rgb_array).permute(2, 0, 1)
    unit = chw.float() / 255
    _assert_same(detector, chw, photo)
    _assert_same(detector, chw[None].repeat(2, 1, 1, 1), [photo, photo])
    _assert_same(detector, unit, photo)
    _assert_same(detector, unit * 2 - 1, photo)
    _assert_same(detector, unit * 2 - 1, photo, value_range="-1,1")
    _assert_same(detector, (unit * 2 - 1).half(), photo)
    _assert_same(detector, unit.bfloat16(), photo, tolerance=0.01)  # bf16 pixels: ~2 uint8 steps
    _assert_same(detector, unit.double(), photo)
    gray = torch.from_numpy(np.array(_gray(photo)))
    _assert_same(detector, gray, _gray(photo).convert("RGB"))
    _assert_same(detector, gray[None], _gray(photo).convert("RGB"))
    rgba = torch.cat([chw, torch.full_like(chw[:1], 255)])
    _assert_same(detector, rgba, photo)
    mask = gray > 128
    _assert_same(detector, mask, Image.fromarray(mask.numpy().astype(np.uint8) * 255))


def test_value_range_is_respected_for_float_input(detector, photo, rgb_array):
    unit = torch.from_numpy(rgb_array).permute(2, 0, 1).float() / 255
    # [0, 1] data read as [-1, 1] is a different (darker, low-contrast) image.
    misread = detector.scores(unit, value_range="-1,1")
    assert (misread - detector.scores(photo)).abs().max() > 0.05
    _assert_same(detector, unit, photo, value_range=(0, 1))


def test_float_0_255_pixels_are_read_as_0_255_for_numpy_and_torch(detector, photo, rgb_array):
    """One rule for both: not refused (numpy), not clamped to white (torch)."""
    hwc = rgb_array.astype(np.float32)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    white = Image.new("RGB", photo.size, "white")
    assert (detector.scores(photo) - detector.scores(white)).abs().max() > 10 * TOLERANCE
    for value_range in ("auto", "0,255"):
        _assert_same(detector, hwc, photo, value_range=value_range)
        _assert_same(detector, hwc.astype(np.float64), photo, value_range=value_range)
        _assert_same(detector, chw, photo, value_range=value_range)
        _assert_same(detector, chw.half(), photo, value_range=value_range)
    # Decided per image, among [0, 1], [-1, 1] and 0-255 images of one batch.
    batch = torch.stack([chw / 255, chw / 127.5 - 1, chw])
    _assert_same(detector, batch, [photo] * 3)
    # An explicit range clamps: 0-255 data read as [0, 1] is (nearly) white.
    _assert_same(detector, chw, white, value_range="0,1", tolerance=0.02)
    _assert_same(detector, hwc, white, value_range="0,1", tolerance=0.02)


def test_lists_mix_forms_and_sizes_in_order(detector, rgb_photos):
    mixed = [
        rgb_photos[0],
        np.array(rgb_photos[1]),
        torch.from_numpy(np.array(rgb_photos[2])).permute(2, 0, 1),
        torch.from_numpy(np.array(rgb_photos[3])).permute(2, 0, 1).float() / 127.5 - 1,
        rgb_photos[4].convert("L"),
    ]
    equivalent = [*rgb_photos[:4], rgb_photos[4].convert("L").convert("RGB")]
    _assert_same(detector, mixed, equivalent)
    per_image = torch.cat([detector.scores(image) for image in equivalent])
    torch.testing.assert_close(detector.scores(equivalent), per_image, atol=1e-5, rtol=0)


def test_single_image_vs_list_shapes(detector, photo):
    assert isinstance(detector.is_nsfw(photo), bool)
    assert isinstance(detector.is_nsfw(torch.rand(3, 8, 8)), bool)
    assert isinstance(detector.is_nsfw(np.zeros((8, 8), np.uint8)), bool)
    assert detector.is_nsfw([photo]) in ([True], [False])
    assert len(detector.is_nsfw(torch.rand(2, 3, 8, 8))) == 2
    assert len(detector.is_nsfw((photo, photo))) == 2
    assert is_single_image(photo) and not is_single_image(np.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        ("photo.jpg", TypeError, "images is a str; expected a PIL image, a numpy array"),
        ([Image.new("RGB", (4, 4)), 3], TypeError, "images\\[1\\] is a int"),
        (torch.rand(5, 8, 8), ValueError, "5 channels.*expected 1 \\(gray\\)"),
        (torch.rand(8, 8, 3), ValueError, "looks channels-last.*permute\\(2, 0, 1\\)"),
        (np.zeros((3, 8, 8), np.uint8), ValueError, "looks channels-first.*transpose\\(1, 2, 0\\)"),
        (
            torch.rand(1, 1, 3, 8, 8),
            ValueError,
            "shape \\(1, 1, 3, 8, 8\\); expected HW, CHW or BCHW",
        ),
        ([torch.rand(2, 3, 8, 8)], ValueError, "images\\[0\\] has shape .* expected HW, CHW\\.$"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), ValueError, "torch.int32; expected torch.uint8"),
        (np.zeros((8, 8), np.int64), ValueError, "numpy dtype int64; expected uint8, uint16"),
        (torch.zeros(3, 0, 8), ValueError, "is empty"),
    ],
)
def test_bad_input_is_a_clear_error(detector, images, error, match):
    with pytest.raises(error, match=match):
        detector.scores(images)


def test_bad_list_items_fail_before_any_image_is_decoded(detector):
    with Image.open(PHOTO_PATHS[0]) as lazy:
        for bad in (3, np.zeros((8, 8), np.int64), torch.zeros(8, 8, 3)):
            with pytest.raises((TypeError, ValueError), match="images\\[1\\]"):
                detector.scores([lazy, bad])
        assert lazy.tile  # still not decoded


def test_bad_value_range_is_a_clear_error(detector):
    with pytest.raises(ValueError, match="value_range='0,256' is not supported; use one of auto"):
        detector.scores(torch.rand(3, 8, 8), value_range="0,256")
    assert parse_value_range("[-1, 1]") == "-1,1"
    assert parse_value_range((0.0, 1.0)) == "0,1"
    assert parse_value_range((0, 255)) == parse_value_range("[0, 255]") == "0,255"


def test_tensor_path_keeps_device_and_copies_nothing():
    tensor = torch.rand(2, 3, 16, 16)
    (batch,) = to_image_batches(tensor)
    assert batch.pixels.data_ptr() == tensor.data_ptr()
    assert batch.value_range == "auto"
