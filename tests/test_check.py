"""The in-graph check step: flags, censoring, fail-closed on NaN, and a torch.export proof."""

import io

import pytest
import torch
from PIL import Image

from nsfw_guard.check import CheckStep
from nsfw_guard.model import load_model
from nsfw_guard.prepared import FRAME_CHUNK, check_prepared, prepare_bytes
from nsfw_guard.scoring import NSFWScorer

from .conftest import make_brightness_checkpoint
from .test_scoring import HOST_SYNC_OPS


def _step(folder, **kwargs) -> CheckStep:
    loaded = load_model(folder, device="cpu", dtype=torch.float32)
    return CheckStep(NSFWScorer(loaded.model, loaded.data_config), **kwargs).eval()


@pytest.fixture(scope="module")
def bright_step(tmp_path_factory):
    """Flags images brighter than the dataset mean (high), passes darker ones (neutral)."""
    return _step(make_brightness_checkpoint(tmp_path_factory.mktemp("bright"), 0.0), action="blur")


def _batch() -> torch.Tensor:
    """[-1, 1] images: dark, bright, bright with a NaN pixel, dark."""
    images = torch.rand(4, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 0.4
    images[0] -= 0.8
    images[1] += 0.4
    images[2] += 0.4
    images[2, 1, 5, 5] = float("nan")
    images[3] -= 0.8
    return images


def test_flags_and_censors_only_flagged_images(bright_step):
    images = _batch()
    out, flags, scores = bright_step(images)
    assert flags.tolist() == [False, True, True, False]
    assert torch.equal(out[0], images[0]) and torch.equal(out[3], images[3])
    assert scores.shape == (4, 4) and scores.dtype == torch.float32
    # Flagged images come back in [0, 1] (diffusers' contract); blurred, not the original.
    assert out[1].min() >= 0 and out[1].max() <= 1
    assert (out[1] - (images[1] * 0.5 + 0.5)).abs().mean() > 0.01
    # The NaN image cannot be verified: worst-case scores, blanked whatever the action.
    assert scores[2].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert out[2].eq(0).all()


def test_flagged_images_can_keep_the_input_range(bright_step):
    images = _batch()
    out = bright_step.run(images, "-1,1", flagged_range="input")
    assert out.verifiable.tolist() == [True, True, False, True]
    assert out.images[2].eq(-1).all()  # black in [-1, 1]
    unit = bright_step.run(images, "-1,1").images
    torch.testing.assert_close(out.images[1], unit[1] * 2 - 1)


def test_keeps_dtype_and_leaves_unflagged_half_images_bit_identical(bright_step):
    images = _batch().half()
    out, flags, _ = bright_step(images)
    assert out.dtype == torch.float16
    assert torch.equal(out[~flags], images[~flags])


@pytest.mark.parametrize("action", ["blur", "pixelate", "blank", "none"])
def test_actions(tmp_path, action):
    step = _step(make_brightness_checkpoint(tmp_path, 0.0), action=action, fill_color=(1, 0, 0))
    images = _batch()[1:2]
    out, flags, _ = step(images)
    assert flags.tolist() == [True]
    unit = images * 0.5 + 0.5
    if action == "none":
        torch.testing.assert_close(out, unit)
    elif action == "blank":
        assert out[0, 0].eq(1).all() and out[0, 1:].eq(0).all()
    else:
        assert (out - unit).abs().mean() > 0.01


def test_bad_settings_are_clear_errors(bright_step):
    scorer = bright_step.scorer
    with pytest.raises(ValueError, match="level must be 'low', 'medium' or 'high'"):
        CheckStep(scorer, level="neutral")
    with pytest.raises(ValueError, match="threshold=1.5"):
        CheckStep(scorer, threshold=1.5)
    with pytest.raises(ValueError, match="action='erase'"):
        CheckStep(scorer, action="erase")
    with pytest.raises(ValueError, match="flagged_range='pil'"):
        bright_step.run(_batch(), flagged_range="pil")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_check_step_exports_without_host_sync(bright_step, dtype):
    images = _batch().to(dtype)
    exported = torch.export.export(bright_step, (images,))
    ops = {
        node.target.__name__.split(".")[0]
        for node in exported.graph.nodes
        if node.op == "call_function" and hasattr(node.target, "__name__")
    }
    assert not ops & HOST_SYNC_OPS, ops & HOST_SYNC_OPS
    assert {"where", "_upsample_bicubic2d_aa", "scaled_dot_product_attention"} <= ops
    fresh = _batch().to(dtype)
    with torch.inference_mode():
        for got, expected in zip(exported.module()(fresh), bright_step(fresh), strict=True):
            torch.testing.assert_close(got, expected, equal_nan=True)


class _ScanVerdicts(torch.nn.Module):
    """What nsfw-guard scan runs on a batch: frames' scores → per-image verdicts."""

    def __init__(self, step: CheckStep, count: int):
        super().__init__()
        self.step, self.count = step, count

    def forward(self, pixels, verifiable, owners):
        scores = self.step.scorer.classify(pixels, verifiable)
        return tuple(self.step.verdicts(scores, verifiable, owners, self.count))


def test_scan_verdicts_take_the_worst_frame_and_export_without_host_sync(bright_step):
    images = _batch()  # dark, bright, bright with NaN, dark
    pixels, verifiable = bright_step.scorer.preprocess(images, "-1,1")
    owners = torch.tensor([0, 0, 1, 2])  # image 0: a dark and a bright frame
    module = _ScanVerdicts(bright_step, count=3)
    exported = torch.export.export(module, (pixels, verifiable, owners))
    ops = {
        node.target.__name__.split(".")[0]
        for node in exported.graph.nodes
        if node.op == "call_function" and hasattr(node.target, "__name__")
    }
    assert not ops & HOST_SYNC_OPS, ops & HOST_SYNC_OPS
    with torch.inference_mode():
        scores, levels, flags, ok = exported.module()(pixels, verifiable, owners)
        frame_scores = bright_step.scorer.classify(pixels, verifiable)
    assert flags.tolist() == [True, True, False] and ok.tolist() == [True, False, True]
    torch.testing.assert_close(scores[0, 1:], frame_scores[:2, 1:].amax(dim=0))
    torch.testing.assert_close(scores[0, 0], frame_scores[:2, 0].amin())
    assert levels.tolist() == [3, 3, 0]


# Animations: every frame, streamed a chunk at a time ----------------------------------------------


def _gif(bright: set[int], count: int) -> bytes:
    frames = [
        Image.new("RGB", (48, 32), (250, 250, 250) if i in bright else (i, 0, 0))
        for i in range(count)
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40)
    return buffer.getvalue()


def test_long_animations_are_checked_whole_a_chunk_at_a_time(bright_step):
    """One bright frame, the 77th of 100: only the first chunk is prepared up front, the rest
    is classified a chunk at a time, and the verdict is the whole animation's worst frame (the
    same as preparing every frame at once). A sample that misses it is flagged anyway."""
    preprocess = bright_step.scorer.preprocess
    late, dark = _gif({77}, 100), _gif(set(), 3)
    image = prepare_bytes(late, preprocess)
    assert image.pixels.shape[0] == FRAME_CHUNK and image.later == tuple(range(FRAME_CHUNK, 100))
    assert (image.frame_count, image.frames_checked, image.sampled) == (100, 100, False)
    sizes = []
    hook = bright_step.scorer.model.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0])
    )
    try:
        sample = prepare_bytes(late, preprocess, max_frames=4)  # frames 0, 33, 66, 99
        images = [image, prepare_bytes(dark, preprocess), sample]
        verdicts = check_prepared(images, bright_step, batch_size=8)
    finally:
        hook.remove()
    assert max(sizes) <= 8 and sum(sizes) == 100 + 3 + 4  # every frame once, 8 at most at a time
    assert [(v.level.value, v.flagged) for v in verdicts] == [
        ("high", True),
        ("neutral", False),
        ("neutral", True),  # its frame 77 was never looked at: not cleared
    ]
    at_once = prepare_bytes(late, preprocess, chunk=1000)
    assert at_once.pixels.shape[0] == 100 and not at_once.later
    # Within float tolerance: other batch sizes take other GEMM paths.
    assert check_prepared([at_once], bright_step)[0].scores == pytest.approx(verdicts[0].scores)
