"""``save_censored``: a censored image in its own format where Pillow can write RGB in it, else
PNG (``serve``'s /v1/censor answers and ``scan --censor-to`` copies both come from it)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from nsfw_guard.check import CheckStep
from nsfw_guard.copies import save_censored

VERDICT = json.dumps({"level": "high", "flagged": True})


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
            if written == "PNG":
                assert json.loads(image.text["nsfw-guard"]) == json.loads(VERDICT)
