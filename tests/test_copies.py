"""``save_censored``: a censored image in its own format where Pillow can write RGB in it, else
PNG (``serve``'s /v1/censor answers and ``scan --censor-to`` copies both come from it)."""

from __future__ import annotations

import io

import pytest
from PIL import ExifTags, Image

from nsfw_guard.check import CheckStep
from nsfw_guard.copies import save_censored
from nsfw_guard.verdict_metadata import VERDICT_FORMATS, make_verdict, read_verdict

VERDICT = make_verdict(
    model="Freepik/nsfw_image_detector",
    level="high",
    scores={"neutral": 0.01, "low": 0.02, "medium": 0.03, "high": 0.94},
    flagged=True,
    check_level="medium",
    threshold=0.5,
    action="blank",
    frames=1,
    frames_checked=1,
)


@pytest.fixture(scope="module")
def blank(detector) -> CheckStep:
    return CheckStep(detector.scorer, action="blank")


@pytest.mark.parametrize(
    ("fmt", "mode", "written"),
    [
        # Pillow reads these, and writes them only in other modes (1-bit, palette): PNG.
        ("XBM", "1", "PNG"),
        ("MSP", "1", "PNG"),
        ("BLP", "P", "PNG"),
        # Pillow writes RGB in these: the image's own format, whatever its mode was.
        ("PNG", "RGBA", "PNG"),
        ("WEBP", "RGB", "WEBP"),
        ("BMP", "P", "BMP"),
        ("GIF", "L", "GIF"),
        ("TIFF", "1", "TIFF"),
        ("PCX", "P", "PCX"),
        ("JPEG", "L", "JPEG"),
        ("SPIDER", "F", "SPIDER"),  # a single image, whose decode refused seek(0)
    ],
)
def test_a_censored_image_keeps_its_format_where_pillow_can_write_rgb_in_it(
    blank, tmp_path, fmt, mode, written
):
    original = io.BytesIO()
    image = Image.new(mode, (40, 30), 1)
    if mode == "P":  # a whole palette: Pillow 10.1 writes a BMP of a short one it cannot read
        image.putpalette([0, 0, 0, 255, 0, 0] * 128)
    image.save(original, format=fmt)
    for target in (io.BytesIO(), tmp_path / f"copy.{fmt.lower()}"):  # serve's, scan's
        assert save_censored(original.getvalue(), target, blank, VERDICT) == written
        saved = target.getvalue() if isinstance(target, io.BytesIO) else target.read_bytes()
        with Image.open(io.BytesIO(saved)) as image:
            assert image.format == written and image.size == (40, 30)
            assert max(image.convert("L").getextrema()) <= 8  # blanked black
        # The verdict, in every format that can carry one (BMP, PCX, SPIDER cannot).
        assert read_verdict(saved) == (VERDICT if written in VERDICT_FORMATS else None)
    if written in ("JPEG", "WEBP", "TIFF"):  # EXIF UserComment, with its character code
        with Image.open(io.BytesIO(saved)) as image:
            comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[0x9286]
        assert comment.startswith(b"ASCII\0\0\0{")


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_every_frame_of_an_animation_is_censored_and_the_copy_carries_the_verdict(detector, fmt):
    blur = CheckStep(detector.scorer, action="blur")  # frames stay apart (blank ones merge)
    frames = [Image.new("RGB", (24, 16), (100 * i, 200, 100)) for i in range(3)]
    original = io.BytesIO()
    frames[0].save(original, format=fmt, save_all=True, append_images=frames[1:], duration=50)
    copy = io.BytesIO()
    assert save_censored(original.getvalue(), copy, blur, VERDICT) == fmt
    with Image.open(io.BytesIO(copy.getvalue())) as image:
        assert image.n_frames == 3
    assert read_verdict(copy.getvalue()) == VERDICT


def test_a_verdict_that_is_not_valid_is_refused_before_anything_is_written(blank):
    original = io.BytesIO()
    Image.new("RGB", (8, 8)).save(original, format="PNG")
    target = io.BytesIO()
    with pytest.raises(ValueError, match="level: 'extreme' is not one of"):
        save_censored(original.getvalue(), target, blank, {**VERDICT, "level": "extreme"})
    assert target.getvalue() == b""
