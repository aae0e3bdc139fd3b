"""Region maps from the classifier's own forward pass, and censoring only the regions they mark."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from nsfw_guard import NSFWDetector, NSFWSafetyChecker, censor, guard, unguard
from nsfw_guard.censor import censor_regions, region_alpha
from nsfw_guard.check import CheckStep
from nsfw_guard.cli import EXIT_OK, EXIT_USAGE, main
from nsfw_guard.copies import save_censored
from nsfw_guard.model import load_model
from nsfw_guard.preprocess import to_unit_range
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline, square_cells, square_images
from nsfw_guard.verdict_metadata import make_verdict, read_verdict

from .conftest import make_brightness_checkpoint
from .test_scoring import assert_no_host_sync

SQUARE = (slice(16, 32), slice(24, 40))  # rows, columns of the bright square in a 64x64 image


@pytest.fixture(scope="module")
def bright_folder(tmp_path_factory):
    """Each patch token is its patch's brightness: 'high' where brighter than the pivot (in
    normalized units), 'neutral' where darker. The pivot lies between the mean of a dark image
    (-1.30) and of one with a bright square on 1/16 of it (-1.10)."""
    return make_brightness_checkpoint(tmp_path_factory.mktemp("bright"), -1.2)


@pytest.fixture(scope="module")
def step(bright_folder) -> CheckStep:
    loaded = load_model(bright_folder, device="cpu", dtype=torch.float32)
    scorer = NSFWScorer(loaded.model, loaded.data_config)
    return CheckStep(scorer, level="high", threshold=0.5, action="blur").eval()


def _images() -> torch.Tensor:
    """[-1, 1] images: dark with a bright square, all dark, and one with a NaN pixel."""
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.9
    images[0, :, SQUARE[0], SQUARE[1]] = 0.9
    images[2, 0, 5, 5] = float("nan")
    return images


def _far_from_square(pixels: int) -> torch.Tensor:
    """[64, 64] bool: the pixels more than ``pixels`` away from the square (in rows or columns)."""
    rows, columns = torch.arange(64)[:, None], torch.arange(64)[None, :]
    return (
        (rows < SQUARE[0].start - pixels)
        | (rows >= SQUARE[0].stop + pixels)
        | (columns < SQUARE[1].start - pixels)
        | (columns >= SQUARE[1].stop + pixels)
    )


def test_map_marks_the_square_from_the_same_forward_pass(step):
    images = _images()
    with torch.inference_mode():
        output = step.run(images, with_map=True)
        plain = step.run(images)
    assert torch.equal(output.scores, plain.scores) and torch.equal(output.images, plain.images)
    assert output.flags.tolist() == [True, False, True]
    region_map = output.region_map[:, 0]
    assert region_map.shape == (3, 64, 64) and region_map.dtype == torch.float32
    inside = region_map[0, SQUARE[0].start + 2 : SQUARE[0].stop - 2, 26:38]
    assert inside.min() > 0.9
    assert region_map[0][_far_from_square(3)].max() < 0.1
    assert region_map[1].max() < 0.1  # a dark image: nothing marked
    assert region_map[2].eq(1).all()  # NaN pixels: unverifiable, the worst case everywhere


def test_detector_region_map_fits_each_image(bright_folder):
    detector = NSFWDetector(bright_folder, device="cpu", dtype=torch.float32, level="high")
    images = _images()
    pair = [images[0], images[1, :, :40]]
    maps = detector.region_map(pair, value_range="-1,1", map="cam")
    assert [tuple(m.shape) for m in maps] == [(64, 64), (40, 64)]
    assert maps[0][20, 30] > 0.9 and maps[1].max() < 0.1
    # The default, the occlusion map. The square (rows 16-31, columns 24-39) fills cells
    # (1, 1) and (1, 2) of the 4 x 4 grid; either half alone flags the image, so only the
    # 2 x 2 blocks holding both lower the score: the square's cells and those blocks' other
    # cells (rows 0 and 2) score highest, every other cell lower.
    maps = detector.region_map([*pair, images[2]], value_range="-1,1")
    assert [tuple(m.shape) for m in maps] == [(64, 64), (40, 64), (64, 64)]
    cells = maps[0][::16, ::16]
    square, blocks = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    square[1, 1:3], blocks[0:3, 1:3] = True, True
    assert cells[square].min() == cells.max() > 0.1
    assert cells[square].min() > cells[~blocks].max()
    assert maps[1].abs().max() < 0.05  # nothing to hide
    assert maps[2].eq(1).all()  # NaN pixels: the worst case
    with pytest.raises(ValueError, match="region_map='grad'"):
        detector.region_map(pair, map="grad")


class _RegionsCheck(torch.nn.Module):
    """The check step with its map output, then only the marked regions censored."""

    def __init__(self, step: CheckStep):
        super().__init__()
        self.step = step

    def forward(self, images):
        output = self.step.run(images, flagged_range="unit", with_map=True)
        alpha = region_alpha(output.region_map, self.step.threshold, images.shape[-2:])
        unit = to_unit_range(images, "-1,1")
        # Unverifiable images come back blanked whole, as from the check step.
        alpha = torch.where(output.verifiable[:, None, None, None], alpha, torch.ones_like(alpha))
        regions = censor_regions(unit, output.images, alpha)
        return torch.where(output.flags[:, None, None, None], regions, images), output.region_map


def test_regions_censor_only_pixels_near_the_square_and_export_without_host_sync(step):
    module = _RegionsCheck(step)
    exported = torch.export.export(module, (_images(),))
    assert_no_host_sync(exported)
    images = _images()
    with torch.inference_mode():
        out, region_map = exported.module()(images)
        expected = module(images)
    torch.testing.assert_close(out, expected[0], equal_nan=True)
    torch.testing.assert_close(region_map, expected[1])
    unit = to_unit_range(images, "-1,1")
    # The default margin (5% of 64 px: 3 px), plus the patch (2 px here) along the square's
    # edge, which the bicubic resize's overshoot brightens.
    far = _far_from_square(5)
    assert torch.equal(out[0][:, far], unit[0][:, far])  # untouched, bit for bit
    changed = (out[0] - unit[0]).abs().amax(dim=0) > 1e-3
    assert changed[SQUARE].float().mean() > 0.9  # the square is blurred
    assert torch.equal(out[1], images[1])  # not flagged: the input, bit for bit
    assert out[2].eq(0).all()  # unverifiable: blanked whole


def test_region_alpha_grows_by_the_margin_in_its_shape():
    region_map = torch.zeros(1, 1, 8, 8)
    region_map[0, 0, 4, 4] = 0.9  # one cell: pixels 64-79 of 128
    rect = region_alpha(region_map, 0.5, (128, 128), margin=0.0)[0, 0]
    assert rect[64:80, 64:80].eq(1).all() and rect.sum() == 16 * 16
    grown = region_alpha(region_map, 0.5, (128, 128), margin=0.1)[0, 0]  # 13 px
    assert grown[51:93, 51:93].eq(1).all() and grown.sum() == 42 * 42
    ellipse = region_alpha(region_map, 0.5, (128, 128), margin=0.1, shape="ellipse")[0, 0]
    assert ellipse[72, 51:93].eq(1).all() and ellipse[51, 51] == 0  # round: no corners
    assert ellipse.sum() < grown.sum()
    feathered = region_alpha(region_map, 0.5, (128, 128), margin=0.1, feather=0.05)[0, 0]
    assert feathered[51:93, 51:93].eq(1).all()  # the soft edge lies outside, never inside
    assert 0 < feathered[72, 45] < 1 and feathered[0, 0] < 1e-3


def test_a_flagged_image_with_no_marked_region_is_censored_whole():
    region_map = torch.full((2, 1, 4, 4), 0.2)
    region_map[1, 0, 0, 0] = float("nan")  # a map that cannot be read marks its cell
    alpha = region_alpha(region_map, 0.5, (32, 48))
    assert alpha[0].eq(1).all()
    assert alpha[1, 0, :8, :12].eq(1).all() and alpha[1].mean() < 0.5


def test_bad_region_settings_are_clear_errors():
    region_map = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"region margin=2: .*\[0, 1\]"):
        region_alpha(region_map, 0.5, (8, 8), margin=2)
    with pytest.raises(ValueError, match="region shape='box'"):
        region_alpha(region_map, 0.5, (8, 8), shape="box")
    with pytest.raises(ValueError, match="region feather=-0.1"):
        region_alpha(region_map, 0.5, (8, 8), feather=-0.1)


# action="regions", on a toy EVA02 trained to flag a magenta square (image labels only) ---------

LOCALIZED_SHARE = 0.25  # a cell holding a quarter of the square or more is one of "its" cells


@pytest.fixture(scope="module")
def square_scorer(square_checkpoint) -> NSFWScorer:
    loaded = load_model(square_checkpoint, device="cpu", dtype=torch.float32)
    return NSFWScorer(loaded.model, loaded.data_config).eval()


def _regions_step(scorer, **params) -> CheckStep:
    # A strong blur: the toy flags magenta, which the default blur leaves magenta.
    params = {"radius": 0.25, "margin": 0.1, **params}
    return CheckStep(scorer, level="high", threshold=0.5, action="regions", censor_params=params)


def _localized(values: torch.Tensor, masks: torch.Tensor) -> list[bool]:
    """Per image: do all the square's cells score above every cell it does not touch?"""
    share, touched = square_cells(masks, values.shape[-1])
    return [
        bool(value[own >= LOCALIZED_SHARE].min() > value[~near].max())
        for value, own, near in zip(values, share, touched, strict=True)
    ]


@pytest.mark.trained
def test_the_occlusion_map_localizes_the_square_where_the_patch_map_does_not(square_scorer):
    images, masks = square_images(40, torch.Generator().manual_seed(1))
    images, masks = images[::2], masks[::2]  # the 20 with a square
    with torch.inference_mode():
        drops = square_scorer.occlusion_map(images, level=3, cells=4)[:, 0]
        scores, patches = square_scorer.classify_with_map(*square_scorer.preprocess(images, "0,1"))
    flagged = scores[:, 3] >= 0.5
    assert flagged.sum() >= 18  # the toy learned to flag them (19 of 20: one small square not)
    occlusion = _localized(drops[flagged], masks[flagged])
    cam = _localized(patches[flagged, 3], masks[flagged])  # 4 x 4 patches: the same cells
    # 18 of 19 here; 97 of 97 in benchmarks/bench_regions.py (single cells alone: 74%)
    assert sum(occlusion) >= 0.9 * len(occlusion), occlusion
    _, touched = square_cells(masks[flagged], 4)
    pairs = zip(drops[flagged], touched, strict=True)
    tops = [bool(t.flatten()[d.flatten().argmax()]) for d, t in pairs]
    assert all(tops)  # the cell whose hiding lowers the score most is always on the square
    assert sum(cam) <= 0.25 * len(cam), cam  # the patch map inverts as the model learns


def test_the_occlusion_map_weighs_each_cells_drop_its_best_blocks_and_its_gain_alone(
    square_scorer,
):
    """Each cell, by hand: hide it (then each 2 x 2 block covering it) with the image's mean
    colour and rescore; show it alone (the rest hidden); the map weighs the three."""
    from nsfw_guard.scoring import OCCLUSION_WEIGHTS

    images, _ = square_images(4, torch.Generator().manual_seed(5), size=32)  # the model's size
    fill = images.mean(dim=(-2, -1), keepdim=True)
    with torch.inference_mode():
        drops = square_scorer.occlusion_map(images, level=3, cells=4)
        base = square_scorer(images, "0,1")[:, 3]
        blank = square_scorer(fill.expand(-1, -1, 32, 32), "0,1")[:, 3]

        def hidden_score(top: int, left: int, side: int) -> torch.Tensor:
            variant = images.clone()
            patch = fill.expand(-1, -1, 8 * side, 8 * side)
            variant[..., 8 * top : 8 * (top + side), 8 * left : 8 * (left + side)] = patch
            return base - square_scorer(variant, "0,1")[:, 3]

        def shown_alone(top: int, left: int) -> torch.Tensor:
            variant = fill.expand(-1, -1, 32, 32).clone()
            rows, columns = slice(8 * top, 8 * top + 8), slice(8 * left, 8 * left + 8)
            variant[..., rows, columns] = images[..., rows, columns]
            return square_scorer(variant, "0,1")[:, 3] - blank

        blocks = {(r, c): hidden_score(r, c, 2) for r in range(3) for c in range(3)}
        for row, column in np.ndindex(4, 4):
            covering = [
                blocks[r, c] for (r, c) in blocks if r <= row <= r + 1 and c <= column <= c + 1
            ]
            parts = (
                hidden_score(row, column, 1),
                torch.stack(covering).amax(dim=0),
                shown_alone(row, column),
            )
            expected = sum(w * part for w, part in zip(OCCLUSION_WEIGHTS, parts, strict=True))
            torch.testing.assert_close(drops[:, 0, row, column], expected, atol=1e-5, rtol=0)
    nan_image = images[:1].clone()
    nan_image[0, 1, 3, 3] = float("inf")
    assert square_scorer.occlusion_map(nan_image, level=3).isnan().all()  # cannot be scored


@pytest.mark.trained
def test_regions_censor_only_near_the_square_and_leave_the_rest_bit_identical(square_scorer):
    images, masks = square_images(8, torch.Generator().manual_seed(2))
    with torch.inference_mode():
        output = _regions_step(square_scorer).run(images, value_range="0,1")
        rescored = square_scorer(output.images, "0,1")
    assert output.flags.tolist() == [True, False] * 4
    assert rescored[:, 3].max() < 0.5  # what comes out is not flagged
    assert torch.equal(output.images[1::2], images[1::2])  # neutral: bit-identical
    # Within a cell (16 px) and the margin (10%: 6 px) of the square: the map's resolution.
    near = torch.nn.functional.max_pool2d(masks.float(), 2 * 22 + 1, stride=1, padding=22) > 0
    changed = (output.images != images).any(dim=1, keepdim=True)
    for index in range(0, 8, 2):
        assert not changed[index][~near[index]].any()  # far from it: bit for bit
        # Most of the square is censored: its edges past the margin may be left, as long as
        # what is left is no longer flagged (the re-check above).
        assert changed[index][masks[index]].float().mean() > 0.75
        assert changed[index].float().mean() < 0.75  # not the whole image (19-58% here)


@pytest.mark.trained
def test_the_default_blur_censors_a_textured_flag_in_regions_only(checker_checkpoint):
    """A toy that flags a texture (a checkerboard square), which the default blur removes: with
    every regions setting at its default, each flagged image comes back censored near the
    square only and no longer flagged (the magenta toy flags a colour, which a blur keeps)."""
    loaded = load_model(checker_checkpoint, device="cpu", dtype=torch.float32)
    scorer = NSFWScorer(loaded.model, loaded.data_config).eval()
    images, masks = square_images(8, torch.Generator().manual_seed(2), pattern="checker")
    step = CheckStep(scorer, level="high", threshold=0.5, action="regions")
    with torch.inference_mode():
        output = step.run(images, value_range="0,1")
        rescored = scorer(output.images, "0,1")
    assert output.flags.tolist() == [True, False] * 4
    assert rescored[:, 3].max() < 0.5
    assert torch.equal(output.images[1::2], images[1::2])
    near = torch.nn.functional.max_pool2d(masks.float(), 2 * 19 + 1, stride=1, padding=19) > 0
    changed = (output.images != images).any(dim=1, keepdim=True)
    for index in range(0, 8, 2):  # within a cell (16 px) and the margin (5%: 3 px)
        assert not changed[index][~near[index]].any()
        assert changed[index].float().mean() < 0.75


def test_regions_censor_whole_where_the_regions_do_not_clear_the_flag(square_scorer, tmp_path):
    images, _ = square_images(2, torch.Generator().manual_seed(3))
    two = images[:1].clone()
    two[..., :8, :8] = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)  # a second square
    two[..., 56:, 56:] = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)  # and a third
    step = _regions_step(square_scorer, radius=0.08)  # the default blur leaves magenta
    with torch.inference_mode():
        output = step.run(torch.cat([images[:1], two]), value_range="0,1")
        whole = CheckStep(square_scorer, level="high", action="blur").run(
            torch.cat([images[:1], two]), value_range="0,1"
        )
    assert output.flags.all()
    assert torch.equal(output.images, whole.images)  # censored whole, as by action="blur"
    forced = load_model(make_checkpoint(tmp_path, level="high"), device="cpu")
    forced_step = _regions_step(NSFWScorer(forced.model, forced.data_config))
    with torch.inference_mode():
        output = forced_step.run(images, value_range="0,1")
    blurred = censor.blur(images, radius=0.25)
    assert torch.equal(output.images, blurred)  # no cell lowers the score: all of it


@pytest.mark.parametrize("region_map", ["occlusion", "cam"])
def test_regions_action_exports_without_host_sync_and_blanks_unverifiable(
    square_scorer, region_map
):
    images, _ = square_images(4, torch.Generator().manual_seed(4))
    images[3, 0, 5, 5] = float("nan")
    step = _regions_step(square_scorer, map=region_map)
    exported = torch.export.export(step, (images, "0,1"))
    assert_no_host_sync(exported)
    with torch.inference_mode():
        out, flags, _ = exported.module()(images, "0,1")
        expected, _, _ = step(images, "0,1")
    assert torch.equal(out, expected)
    assert flags.tolist() == [True, False, True, True]
    assert out[3].eq(0).all()  # NaN pixels: blanked whole


def test_regions_settings_are_checked():
    with pytest.raises(ValueError, match="region_map='grad'"):
        censor.check_params("regions", {"map": "grad"})
    with pytest.raises(ValueError, match="block_size= is not a parameter of region_censor='blur'"):
        censor.check_params("regions", {"block_size": 8})
    with pytest.raises(ValueError, match="region margin=3"):
        censor.check_params("regions", {"margin": 3})
    with pytest.raises(ValueError, match="needs the classifier"):
        censor.apply(torch.rand(1, 3, 4, 4), torch.tensor([True]), "regions")


def test_the_checker_saves_and_reloads_its_region_settings(square_checkpoint, tmp_path):
    settings = {
        "region_margin": 0.1,
        "region_shape": "ellipse",
        "region_feather": 0.02,
        "region_censor": "pixelate",
        "region_map": "cam",
        "region_cells": 6,
        "pixelate_block_size": 4,
    }
    checker = NSFWSafetyChecker.from_pretrained(square_checkpoint, action="regions", **settings)
    checker.save_pretrained(tmp_path)
    reloaded = NSFWSafetyChecker.from_pretrained(tmp_path)
    assert reloaded.config.action == "regions"
    assert {name: getattr(reloaded.config, name) for name in settings} == settings
    expected = {"margin": 0.1, "shape": "ellipse", "feather": 0.02, "censor": "pixelate"}
    expected |= {"map": "cam", "cells": 6, "block_size": 4}
    assert reloaded.check_step.censor_params == expected
    with pytest.raises(ValueError, match="region_map='grad'"):
        NSFWSafetyChecker.from_pretrained(square_checkpoint, action="blur", region_map="grad")


def test_guard_censors_regions_and_whole_where_no_region_clears(tmp_path):
    pipe = make_tiny_pipeline("sd", tmp_path / "pipe")
    forced = make_checkpoint(tmp_path / "high", level="high")
    outputs = {}
    for action in ("regions", "blur"):
        attached = guard(pipe, model=forced, action=action, region_margin=0.2)
        generator = torch.Generator().manual_seed(0)
        outputs[action] = pipe(
            "a photo", num_inference_steps=2, output_type="pt", generator=generator
        ).images
    assert attached.checker.config.region_margin == 0.2
    assert torch.equal(outputs["regions"], outputs["blur"])  # no cell lowers the score: whole
    unguard(pipe)


@pytest.mark.trained
def test_scan_censor_to_with_regions_censors_near_the_square_only(
    square_checkpoint, square_scorer, tmp_path, capsys
):
    images, masks = square_images(2, torch.Generator().manual_seed(2))
    source, target = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    Image.fromarray(pixels[0]).save(source / "square.png")
    Image.fromarray(pixels[1]).save(source / "plain.png")
    command = ["scan", "--device", "cpu", "--workers", "0", "--quiet", "--model"]
    command += [str(square_checkpoint), "--level", "high", "--output", str(tmp_path / "r.jsonl")]
    command += ["--censor-to", str(target), "--action", "regions", "--region-margin", "0.1"]
    command.append(str(source))
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--region-margin", "2"])
    assert stopped.value.code == EXIT_USAGE
    assert "--region-margin 2.0: expected a fraction" in capsys.readouterr().err
    # The toy flags magenta, which the default blur leaves magenta: so the regions' censor
    # does not clear the flag, and the copy is censored whole.
    assert main(command) == EXIT_OK
    with Image.open(target / "square.png") as image:
        copy = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    original = torch.from_numpy(pixels[0]).permute(2, 0, 1)
    changed = (copy != original).any(dim=0)
    assert changed.float().mean() > 0.95  # whole
    assert not (target / "plain.png").exists()  # not flagged: no copy (without --copy-clean)
    region = CheckStep(
        square_scorer,
        level="high",
        action="regions",
        censor_params={"margin": 0.1, "radius": 0.25},
    )
    written = io.BytesIO()
    verdict = make_verdict(
        model=None,
        level="high",
        scores={"neutral": 0.0, "low": 1.0, "medium": 1.0, "high": 1.0},
        flagged=True,
        check_level="high",
        threshold=0.5,
        action="regions",
    )
    save_censored((source / "square.png").read_bytes(), written, region, verdict)
    assert read_verdict(written.getvalue())["action"] == "regions"
    with Image.open(written) as image:
        copy = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    near = torch.nn.functional.max_pool2d(masks[:1].float(), 45, stride=1, padding=22)[0, 0] > 0
    changed = (copy != original).any(dim=0)
    assert changed[masks[0, 0]].float().mean() > 0.75 and not changed[~near].any()


def test_the_overlay_is_the_occlusion_map_of_the_file_and_holds_none_of_its_pixels(square_scorer):
    """What the pages draw (serve's /v1/map, review's /map/N): the file's occlusion map, hot on
    the square's cells, as a PNG of one colour whose alpha is the map, the image's shape."""
    from nsfw_guard.overlay import OVERLAY_COLOR, overlay_png, region_overlay_map

    images, masks = square_images(8, torch.Generator().manual_seed(1))
    for image, mask in zip(images[::2], masks[::2], strict=True):
        buffer = io.BytesIO()
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).resize((128, 128), Image.NEAREST).save(buffer, "PNG")
        region_map = region_overlay_map(square_scorer, buffer.getvalue(), "high").values
        assert region_map.shape == (128, 128)
        unit = to_unit_range(torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1))
        with torch.inference_mode():
            drops = square_scorer.occlusion_map(unit[None], level=3, cells=4)[0, 0]
        assert torch.allclose(region_map[::32, ::32], drops.clamp(0, 1), atol=1e-5)
        _, touched = square_cells(mask[None], 4)
        hottest = drops[touched[0]].max()
        assert hottest == drops.max(), drops  # the hottest cells include one on the square
        flagged = bool(square_scorer(unit[None], "0,1")[0, 3] >= 0.5)
        assert not flagged or hottest >= 0.02, drops  # and it shows
        with Image.open(io.BytesIO(overlay_png(region_map))) as overlay:
            assert overlay.mode == "RGBA" and overlay.size == (128, 128)
            rgb = np.asarray(overlay)[..., :3].reshape(-1, 3)
            assert (rgb == OVERLAY_COLOR).all()  # not one of the image's pixels
            alpha = torch.from_numpy(np.asarray(overlay)[..., 3].copy())
        assert torch.equal(alpha, (region_map * 255).round().byte())


def test_an_animations_overlay_maps_its_worst_frame(square_scorer):
    """Every frame is scored; the map is of the frame that scores highest (a square in frame 5
    of 8 alone), not the first."""
    from nsfw_guard.overlay import region_overlay_map

    images, masks = square_images(16, torch.Generator().manual_seed(6))
    frames = [images[1::2][index] for index in range(8)]  # no square
    frames[5] = images[4]
    pixels = [(f * 255).round().byte().permute(1, 2, 0).numpy() for f in frames]
    gif = [Image.fromarray(p).resize((128, 128), Image.NEAREST) for p in pixels]
    buffer = io.BytesIO()
    gif[0].save(buffer, "PNG", save_all=True, append_images=gif[1:])  # APNG: lossless
    with torch.inference_mode():
        scores = square_scorer(torch.stack(frames), "0,1")[:, 3]
    assert int(scores.argmax()) == 5 and scores[5] >= 0.5  # the toy flags frame 5 alone
    overlay = region_overlay_map(square_scorer, buffer.getvalue(), "high")
    assert overlay.frame == 5
    still = io.BytesIO()
    gif[5].save(still, "PNG")
    alone = region_overlay_map(square_scorer, still.getvalue(), "high")
    assert torch.equal(overlay.values, alone.values) and alone.frame == 0
    _, touched = square_cells(masks[4:5], 4)
    cells = overlay.values[::32, ::32]
    assert cells[touched[0]].max() == cells.max() > 0  # hot on the square


@pytest.mark.parametrize("command", ["scan", "serve"])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--region-cells", "17", "--region-cells 17: expected a grid size from 1 to 16"),
        ("--region-feather", "1.5", "--region-feather 1.5: expected a fraction"),
        ("--region-shape", "star", "invalid choice: 'star'"),
    ],
)
def test_region_options_are_checked_before_any_work(
    command, option, value, message, tmp_path, capsys
):
    argv = [command, "--action", "regions", option, value, "--model", str(tmp_path / "none")]
    if command == "scan":
        argv += ["--censor-to", str(tmp_path / "out"), str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        main(argv)  # before looking for the model (there is none)
    assert stopped.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_region_options_reach_the_settings():
    from nsfw_guard.cli import _parser, _region_params

    parser = _parser()
    argv = ["serve", "--action", "regions", "--region-cells", "6", "--region-shape", "ellipse"]
    args = parser.parse_args([*argv, "--region-feather", "0.02", "--region-map", "cam"])
    params = _region_params(args, parser)
    assert params == {"cells": 6, "shape": "ellipse", "feather": 0.02, "map": "cam"}


def test_scan_refuses_region_options_without_the_regions_action(tmp_path, capsys):
    argv = ["scan", "--censor-to", str(tmp_path / "out"), "--region-cells", "6", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == EXIT_USAGE
    assert "the --region-* options are for --action regions" in capsys.readouterr().err


def test_region_candidates_are_the_top_cells_nested_smallest_first():
    from nsfw_guard.check import _top_cells, region_sizes

    ranking = torch.tensor([[0.1, 0.9, -0.2], [0.5, 0.0, 0.3], [0.2, 0.6, 0.0]]).view(1, 1, 3, 3)
    worst = ranking.clone()
    worst[0, 0, 2, 2] = 1.0  # what region_grid gives where an image cannot be scored
    tied = torch.ones_like(ranking)
    sizes = region_sizes(3)
    assert sizes == [1, 2, 3, 4, 6]
    top = _top_cells(torch.cat([ranking, worst, tied]), sizes)
    assert top.shape == (3, 5, 1, 3, 3)
    assert top.flatten(2).sum(dim=2).tolist() == [sizes] * 3
    assert torch.equal(top[0, 0, 0], ranking[0, 0] == 0.9)
    assert torch.equal(top[0, 2, 0], ranking[0, 0] >= 0.5)  # 0.9, 0.6, 0.5
    assert bool(top[1, 0, 0, 2, 2]) and bool(top[1, 1, 0, 0, 1])
    assert top[2, 2, 0].flatten().tolist() == [True] * 3 + [False] * 6  # ties: grid order
    assert (top[:, 1:] >= top[:, :-1]).all()  # each set holds the one before it


@pytest.mark.parametrize(
    "crop", [{"crop_mode": "center", "crop_pct": 0.875}, {"crop_mode": "border", "crop_pct": 1.0}]
)
def test_the_occlusion_map_runs_for_every_crop_mode(bright_folder, crop):
    """The cells lie over the image as resized before the crop (``center`` resizes the shorter
    side to one number): the map has the grid's shape whatever the image's."""
    from dataclasses import replace

    loaded = load_model(bright_folder, device="cpu", dtype=torch.float32)
    config = replace(loaded.data_config, **crop)
    scorer = NSFWScorer(loaded.model, config)
    with torch.inference_mode():
        drops = scorer.occlusion_map(_images()[:2, :, :, :48], level=3, value_range="-1,1")
    assert drops.shape == (2, 1, 4, 4) and drops.isfinite().all()
