"""decode.py: regular files only, any mode and size, orientation, frame sampling, bad files."""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from nsfw_guard.decode import (
    DecodedImage,
    NotARegularFile,
    decode_file,
    decode_image,
    iter_frames,
    read_file,
)
from nsfw_guard.inputs import ImageBatch, to_image_batches
from nsfw_guard.preprocess import WHITE, composite_alpha, to_unit_range

from .conftest import PHOTO_PATHS, jpeg_with_exif_thumbnail, tiny_frames_on_a_huge_canvas

CHELSEA = next(path for path in PHOTO_PATHS if path.name == "chelsea.jpg")
MODES = [
    *("1", "L", "LA", "La", "P", "PA", "I", "I;16", "I;16B", "F"),
    *("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"),
]


def seen(batch: ImageBatch) -> torch.Tensor:
    """What the detector sees of a batch: [0, 1], alpha composited over white."""
    return composite_alpha(to_unit_range(batch.pixels, batch.value_range), WHITE)


def save_keeping_mode(image: Image.Image, stem: Path) -> Path:
    """``image`` saved in a format that reads back in its mode (PNG or TIFF)."""
    for fmt, suffix in (("PNG", ".png"), ("TIFF", ".tif")):
        path = stem.with_suffix(suffix)
        try:
            image.save(path, fmt)
            with Image.open(path) as back:
                if back.mode == image.mode:
                    return path
        except (OSError, ValueError, KeyError):
            pass
        path.unlink(missing_ok=True)
    raise AssertionError(f"no format this Pillow writes reads back in mode {image.mode}")


def in_mode(mode: str, size: tuple[int, int]) -> Image.Image:
    """A photo in ``mode``, with varying alpha where the mode has alpha."""
    with Image.open(CHELSEA) as photo:
        rgb = photo.convert("RGB").resize(size)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        alpha = Image.linear_gradient("L").resize(size)
        rgba = rgb.convert("RGBA")
        rgba.putalpha(alpha)
        if mode == "PA":
            image = rgb.convert("P")
            image = image.convert("PA")
            image.putalpha(alpha)
            return image
        return rgba.convert(mode) if mode != "La" else rgba.convert("LA").convert("La")
    for route in ((), ("L",), ("L", "I")):
        try:
            image = rgb
            for step in (*route, mode):
                image = image.convert(step)
            return image
        except ValueError:
            continue
    raise AssertionError(f"cannot make a {mode} image")


def _in_a_file(mode: str) -> bool:
    """Whether an image in ``mode`` can come from a file this Pillow writes (PNG or TIFF)."""
    image = in_mode(mode, (4, 4))
    for fmt in ("PNG", "TIFF"):
        data = io.BytesIO()
        try:
            image.save(data, fmt)
            with Image.open(data) as back:
                if back.mode == mode:
                    return True
        except (OSError, ValueError, KeyError):
            continue
    return False


# Modes no file holds (La, RGBa, HSV, ...: in memory only) never reach the decoder.
FILE_MODES = [mode for mode in MODES if _in_a_file(mode)]


@pytest.fixture
def deadline():
    """Fail, rather than hang, if the test blocks (a FIFO opened for reading waits forever)."""

    if not hasattr(signal, "SIGALRM"):  # Windows: no FIFOs, sockets or devices tested there
        yield
        return

    def expire(signum, frame):
        raise TimeoutError("blocked: a special file was opened or read")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# Any mode, any size ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", FILE_MODES)
def test_every_mode_decodes_as_to_image_batches_reads_it(mode, tmp_path):
    path = save_keeping_mode(in_mode(mode, (24, 16)), tmp_path / "image")
    decoded = decode_file(path)
    with Image.open(path) as image:
        expected = to_image_batches(image)[0]
    assert (decoded.width, decoded.height, decoded.frame_count) == (24, 16, 1)
    assert decoded.frames[0].pixels.shape[-2:] == (16, 24)
    torch.testing.assert_close(seen(decoded.frames[0]), seen(expected))


@pytest.mark.parametrize("mode", FILE_MODES)
def test_every_mode_reduces_to_the_box_average_of_what_is_seen(mode, tmp_path):
    # target_size=2: the shorter side (16) is >= 4x it, so the frame is reduced 16 // 4 = 4x.
    path = save_keeping_mode(in_mode(mode, (24, 16)), tmp_path / "image")
    decoded = decode_file(path, target_size=2)
    with Image.open(path) as image:
        expected = F.avg_pool2d(seen(to_image_batches(image)[0]), 4)
    assert (decoded.width, decoded.height) == (24, 16)
    assert decoded.frames[0].pixels.shape[-2:] == (4, 6)
    torch.testing.assert_close(seen(decoded.frames[0]), expected, atol=3 / 255, rtol=0)


def large(mode: str) -> Image.Image:
    """2000x2000 content that a wrong reduce gets visibly wrong."""
    checker = (np.indices((2000, 2000)).sum(0) % 2).astype(np.uint8)
    if mode in ("P", "PA"):
        # Indices 0 and 2 are both near black; averaging the indices would give 1, white.
        image = Image.fromarray(checker * 2, "L").convert("P")
        image.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 64] + [128] * (256 * 3 - 9))
        if mode == "PA":
            image = image.convert("PA")
            image.putalpha(Image.fromarray(np.where(checker, 255, 128).astype(np.uint8), "L"))
        return image
    if mode == "1":
        return Image.fromarray(checker * 255, "L").convert("1")
    # 16-bit: one pixel in four at 1000, so every 2x2 average (250) is below 256.
    sparse = np.zeros((2000, 2000), np.int32)
    sparse[::2, ::2] = 1000
    return Image.fromarray(sparse, "I").convert(mode) if mode != "I" else Image.fromarray(sparse)


@pytest.mark.parametrize("mode", ["P", "PA", "1", "I;16", "I"])
def test_large_palette_bilevel_and_16_bit_frames_are_reduced(mode, tmp_path):
    """Regression: Image.reduce raised "image has wrong mode" for P, 1 and I;16 frames, averaged
    PA's palette indices, and the reduce of a 16-bit frame could read as 8-bit."""
    path = tmp_path / ("large.png" if mode in ("P", "1") else "large.tif")
    large(mode).save(
        path, **({"compression": "tiff_adobe_deflate"} if path.suffix == ".tif" else {})
    )
    with Image.open(path) as image:
        assert image.mode == mode
        expected = F.avg_pool2d(seen(to_image_batches(image)[0]), 2)
    decoded = decode_file(path, target_size=448)  # 2000 // (2 * 448) = 2
    assert (decoded.width, decoded.height) == (2000, 2000)
    assert decoded.frames[0].pixels.shape[-2:] == (1000, 1000)
    torch.testing.assert_close(seen(decoded.frames[0]), expected, atol=2 / 255, rtol=0)


@pytest.mark.parametrize(
    ("mode", "background", "sparse"),
    [("F", 0.5, -0.1), ("F", 0.5, 2.0), ("I", 0, 1000), ("I;16", 0, 1000)],
    ids=["F -1,1", "F 0-255", "I 16-bit", "I;16 16-bit"],
)
def test_value_scales_are_decided_on_the_full_frame(mode, background, sparse, tmp_path):
    """The scale to_image_batches picks rests on extreme values that averaging can hide: a few
    negatives ([-1, 1]), values over 1 (0-255) or over 255 (16-bit)."""
    array = np.full((16, 16), background, np.float32 if mode == "F" else np.int32)
    array[::2, ::2] = sparse  # one pixel in four: every 4x4 average is 0.35, 0.875 or 250
    image = Image.fromarray(array)
    path = save_keeping_mode(image if mode != "I;16" else image.convert(mode), tmp_path / "x")
    with Image.open(path) as image:
        expected = F.avg_pool2d(seen(to_image_batches(image)[0]), 4)
    decoded = decode_file(path, target_size=2)
    assert decoded.frames[0].pixels.shape[-2:] == (4, 4)
    torch.testing.assert_close(seen(decoded.frames[0]), expected, atol=1e-4, rtol=0)


def test_small_frames_and_no_target_size_are_not_reduced():
    assert decode_file(CHELSEA).frames[0].pixels.shape[-2:] == (300, 451)
    assert decode_file(CHELSEA, target_size=76).frames[0].pixels.shape[-2:] == (300, 451)
    assert decode_file(CHELSEA, target_size=75).frames[0].pixels.shape[-2:] == (150, 226)


# Orientation and frames --------------------------------------------------------------------------


@pytest.mark.parametrize("target_size", [None, 64])
def test_exif_orientation_is_applied(target_size, tmp_path):
    path = tmp_path / "rotated.jpg"
    with Image.open(CHELSEA) as photo:
        exif = photo.getexif()
        exif[0x0112] = 6
        photo.save(path, exif=exif, quality=95)
    decoded = decode_file(path, target_size=target_size)
    assert (decoded.width, decoded.height) == (300, 451)
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        assert upright.size == image.transpose(Image.Transpose.ROTATE_270).size == (300, 451)
        if target_size:
            upright = upright.reduce(2)
        assert torch.equal(decoded.frames[0].pixels, to_image_batches(upright)[0].pixels)


def animation(tmp_path: Path, count: int) -> Path:
    path = tmp_path / f"animated{count}.gif"
    frames = [Image.new("L", (16, 12), 6 * i) for i in range(count)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40)
    return path


def gray_levels(decoded: DecodedImage) -> list[int]:
    return [round(seen(frame).mean().item() * 255) for frame in decoded.frames]


def test_animations_are_checked_frame_by_frame_or_sampled(tmp_path):
    path = animation(tmp_path, 40)
    every = decode_file(path)
    assert (every.format, every.frame_count, len(every.frames)) == ("GIF", 40, 40)
    assert every.frame_indices == tuple(range(40)) and every.all_frames_checked
    assert gray_levels(every) == [6 * i for i in range(40)]

    sampled = decode_file(path, max_frames=16)
    indices = sampled.frame_indices
    assert (sampled.frame_count, len(indices), len(sampled.frames)) == (40, 16, 16)
    assert indices[0] == 0 and indices[-1] == 39 and list(indices) == sorted(set(indices))
    assert not sampled.all_frames_checked
    assert gray_levels(sampled) == [6 * i for i in indices]
    assert (sampled.width, sampled.height) == (16, 12)

    short = decode_file(animation(tmp_path, 3), max_frames=16)
    assert short.frame_indices == (0, 1, 2) and short.all_frames_checked
    assert decode_file(path, max_frames=1).frame_indices == (0,)


def test_frame_arguments_are_checked():
    data = CHELSEA.read_bytes()
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        decode_image(data, max_frames=0)
    with pytest.raises(ValueError, match="target_size must be at least 1"):
        decode_image(data, target_size=0)


# The exact bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PHOTO_PATHS, ids=lambda path: path.name)
def test_data_is_the_file_and_decoding_it_is_decoding_the_file(path):
    from_file = decode_file(path, target_size=64)
    assert from_file.data == path.read_bytes() and from_file.format == "JPEG"
    from_bytes = decode_image(bytearray(from_file.data), target_size=64)
    assert from_bytes.data == from_file.data and isinstance(from_bytes.data, bytes)
    assert (from_bytes.width, from_bytes.height) == (from_file.width, from_file.height)
    assert all(
        torch.equal(a.pixels, b.pixels)
        for a, b in zip(from_bytes.frames, from_file.frames, strict=True)
    )


# Regular files only ------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(tmp_path, deadline):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFile, match=r"x\.jpg: a FIFO, not a regular file"):
        read_file(fifo)
    link = tmp_path / "link.jpg"
    link.symlink_to(fifo)
    with pytest.raises(NotARegularFile, match="a FIFO"):
        decode_file(link)


def test_folders_sockets_and_devices_are_refused(tmp_path, deadline):
    with pytest.raises(NotARegularFile, match="a folder, not a regular file") as caught:
        read_file(tmp_path)
    assert isinstance(caught.value, OSError)
    if os.path.exists("/dev/null"):
        with pytest.raises(NotARegularFile, match="a character device"):
            read_file("/dev/null")
    if hasattr(socket, "AF_UNIX"):
        path = tmp_path / "s.jpg"
        with socket.socket(socket.AF_UNIX) as server:
            try:
                server.bind(str(path))
            except OSError:
                pytest.skip("cannot bind a Unix socket here")
            with pytest.raises(NotARegularFile, match="a socket"):
                read_file(path)


def test_links_to_files_are_followed_and_bad_links_raise(tmp_path):
    link = tmp_path / "link.jpg"
    link.symlink_to(CHELSEA)
    chain = tmp_path / "chain.jpg"
    chain.symlink_to(link)
    assert read_file(chain) == read_file(link) == CHELSEA.read_bytes()
    assert decode_file(chain).width == 451

    loop_a, loop_b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(OSError) as caught:
        read_file(loop_a)
    assert caught.value.errno == errno.ELOOP
    broken = tmp_path / "broken.jpg"
    broken.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(FileNotFoundError):
        read_file(broken)
    with pytest.raises(FileNotFoundError):
        decode_file(tmp_path / "missing.jpg")


# Bad images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [10_000, 14_000])  # past the limit (a warning), past twice it
def test_decompression_bombs_are_errors(side, tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)
    assert path.stat().st_size < 50_000
    with pytest.raises(Image.DecompressionBombError, match=r"exceeds limit of \d+ pixels"):
        decode_file(path)


def test_a_small_file_of_many_frames_on_a_huge_canvas_is_a_bomb_too():
    """Every frame is decoded whole: 4,000 frames of 6000x6000 (each under Pillow's limit) would
    take a quarter of an hour. It is an error at once, whether decoded or streamed."""
    data = tiny_frames_on_a_huge_canvas(6000, 4000)
    assert len(data) < 100_000 and Image.MAX_IMAGE_PIXELS > 6000 * 6000
    message = r"4000 frames of 6000x6000 are 144000000000 pixels to decode, more than a file"
    with pytest.raises(Image.DecompressionBombError, match=message):
        decode_image(data, max_frames=4)
    with pytest.raises(Image.DecompressionBombError, match=message):
        next(iter_frames(data, [3999]))
    image = decode_image(tiny_frames_on_a_huge_canvas(600, 400), max_frames=2)
    assert image.frame_count == 400 and (image.width, image.height) == (600, 600)


def test_an_exif_thumbnail_unlike_its_image_is_checked_with_it():
    """Viewers and file browsers show a file's EXIF thumbnail: a camera's (the image in small,
    rotated with it) adds nothing; another picture there is checked as part of the image."""
    dark = Image.new("RGB", (640, 480), (20, 20, 20))
    for orientation in (1, 6):
        camera = decode_image(jpeg_with_exif_thumbnail(dark, dark.resize((160, 120)), orientation))
        assert len(camera.frames) == 1
    inserted = dark.resize((160, 120))
    inserted.paste((255, 255, 255), (60, 40, 100, 80))  # 40 x 40 of another picture
    image = decode_image(jpeg_with_exif_thumbnail(dark, inserted, 6))
    assert (image.width, image.height, image.frame_count, image.all_frames_checked) == (
        480,
        640,
        1,
        True,
    )
    assert len(image.frames) == 2 and image.frames[1].pixels.shape[-2:] == (160, 120)  # rotated
    assert image.frames[1].pixels.float().mean() > image.frames[0].pixels.float().mean()


def test_a_psd_is_checked_as_its_composite_image():
    """Pillow opens a PSD on its composite (what viewers show) and counts only layers as
    frames: none in a flattened file, which decoded to no frame at all."""
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0] = 200
    header = b"8BPS" + struct.pack(">H6sHIIHH", 1, b"\0" * 6, 3, 30, 40, 8, 3)
    data = header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0)  # raw, no layers
    data += b"".join(rgb[..., channel].tobytes() for channel in range(3))
    image = decode_image(data)
    assert (image.format, image.frame_count, image.width, image.height) == ("PSD", 1, 40, 30)
    assert image.frames[0].pixels.flatten(2).float().mean(2).tolist() == [[200.0, 0.0, 0.0]]
    assert [frame.size for frame in iter_frames(data)] == [(40, 30)]


def test_empty_truncated_and_non_image_files_raise(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UnidentifiedImageError, match="it is empty"):
        decode_file(empty)
    with pytest.raises(UnidentifiedImageError, match="not an image") as caught:
        decode_image(b"just some text\n")
    assert "BytesIO" not in str(caught.value)

    data = CHELSEA.read_bytes()
    with pytest.raises(OSError, match="truncated"):
        decode_image(data[: len(data) // 2])
    png = tmp_path / "whole.png"
    with Image.open(CHELSEA) as photo:
        photo.save(png)
    cut = png.read_bytes()
    with pytest.raises(OSError, match="truncated"):
        decode_image(cut[: len(cut) // 2], target_size=32)


def test_every_picture_of_an_icon_is_a_frame(tmp_path):
    """An icon holds a picture per size, and a small one need not be the large one scaled."""
    path = tmp_path / "icon.ico"
    large, small = Image.new("RGB", (64, 64), (0, 255, 0)), Image.new("RGB", (16, 16), (255, 0, 0))
    large.save(path, sizes=[(16, 16), (64, 64)], append_images=[small])
    decoded = decode_file(path)
    assert decoded.frame_count == 2 and decoded.all_frames_checked
    colours = [frame.pixels[0, :3, 0, 0].tolist() for frame in decoded.frames]
    assert colours == [[255, 0, 0], [0, 255, 0]]  # the red 16x16 picture is checked too
    assert decode_image(path.read_bytes(), max_frames=1).frame_indices == (0,)


def test_every_size_of_a_mac_icon_and_a_single_spider_image_decode(tmp_path):
    """ICNS sizes carry a scale (a 16x16@2x picture is 32x32 pixels); a SPIDER file that is not
    a stack refuses even a seek to its only image. Both decode whole."""
    icns, spider = io.BytesIO(), io.BytesIO()
    Image.new("RGBA", (64, 64), (255, 0, 0, 255)).save(icns, "ICNS")
    Image.new("F", (24, 16), 0.5).save(spider, "SPIDER")
    icon = decode_image(icns.getvalue())
    sizes = [frame.pixels.shape[-1] for frame in icon.frames]
    assert icon.all_frames_checked and sizes == sorted(sizes) and sizes[-1] == 1024
    assert all(frame.pixels[0, :, 0, 0].tolist() == [255, 0, 0, 255] for frame in icon.frames)
    single = decode_image(spider.getvalue())
    assert single.frame_count == 1 and single.frames[0].pixels.shape == (1, 1, 16, 24)
