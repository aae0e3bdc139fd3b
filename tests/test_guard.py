"""guard(pipe) on real (tiny, offline) diffusers pipelines: SD txt2img and img2img through the
safety-checker slot, SDXL through the universal postprocess hook."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DanceDiffusionPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet1DModel,
)
from PIL import Image

from nsfw_guard import GuardWarning, NSFWDetector, NSFWSafetyChecker, guard, unguard
from nsfw_guard.preprocess import Preprocess
from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline

from .conftest import make_brightness_checkpoint
from .tiny_pipelines import make_pipeline

KINDS = ("sd", "sd-img2img", "sdxl")
OUTPUT_TYPES = ("pil", "np", "pt")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return {kind: make_tiny_pipeline(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


def _run(pipe, kind, output_type="np", count=2, **kwargs):
    inputs = {"num_inference_steps": 2, "output_type": output_type, "num_images_per_prompt": count}
    if kind == "sd-img2img":
        inputs["image"] = torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    inputs.update(kwargs)
    return pipe("a photo", generator=torch.Generator().manual_seed(0), **inputs)


def _as_array(images, output_type) -> np.ndarray:
    """Pipeline images as a float array BHWC in [0, 1]."""
    if output_type == "pil":
        return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    if output_type == "pt":
        return images.permute(0, 2, 3, 1).numpy()
    return images


def _smoothness(array: np.ndarray) -> float:
    return float(np.abs(np.diff(array, axis=2)).mean())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output_type", OUTPUT_TYPES)
def test_censors_flagged_and_leaves_clean_images_bit_identical(
    pipes, level_checkpoints, kind, output_type
):
    pipe = pipes[kind]
    baseline = _as_array(_run(pipe, kind, output_type).images, output_type)
    try:
        guard(pipe, model=level_checkpoints["low"], level="medium", action="blank")
        out = _run(pipe, kind, output_type)
        np.testing.assert_array_equal(_as_array(out.images, output_type), baseline)
        if kind != "sdxl":
            assert out.nsfw_content_detected == [False, False]

        guard(pipe, model=level_checkpoints["high"], level="medium", action="blank")
        out = _run(pipe, kind, output_type)
        blanked = _as_array(out.images, output_type)
        assert blanked.shape == baseline.shape and (blanked == 0).all()
        if kind != "sdxl":
            assert out.nsfw_content_detected == [True, True]
        results = pipe._nsfw_guard.last
        assert [r.flagged for r in results] == [True, True]
        assert results[0].level.value == "high" and results[0].scores["high"] > 0.99

        guard(pipe, model=level_checkpoints["high"], action="blur")
        blurred = _as_array(_run(pipe, kind, output_type).images, output_type)
        assert np.abs(blurred - baseline).mean() > 1e-3
        assert _smoothness(blurred) < _smoothness(baseline)
    finally:
        unguard(pipe)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_partly_flagged_batch(pipes, kind, tmp_path):
    pipe = pipes[kind]
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    latents += torch.tensor([3.0, -3.0, 1.5, -1.5])[:, None, None, None]
    baseline = _run(pipe, kind, "pt", count=4, latents=latents).images
    # The checker's own view of each image: its mean normalized pixel. Flag the brighter half.
    data_config = NSFWDetector(str(make_checkpoint(tmp_path / "c")), device="cpu").data_config
    pixels, _ = Preprocess(data_config)(baseline, "0,1")
    brightness = pixels.mean(dim=(1, 2, 3))
    low, high = brightness.sort().values[1:3].tolist()
    assert high - low > 1e-3
    expected = (brightness > (low + high) / 2).tolist()
    assert sum(expected) == 2

    folder = make_brightness_checkpoint(tmp_path / "b", (low + high) / 2)
    model = NSFWDetector(str(folder), device="cpu", dtype=torch.float32)
    g = guard(pipe, model=model, action="blank")
    try:
        out = _run(pipe, kind, "pt", count=4, latents=latents)
        assert [r.flagged for r in g.last] == expected
        for i, flagged in enumerate(expected):
            if flagged:
                assert out.images[i].eq(0).all()
            else:
                assert torch.equal(out.images[i], baseline[i])
        if kind == "sd":
            assert out.nsfw_content_detected == expected
    finally:
        g.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_the_pipeline_exactly(pipes, level_checkpoints, kind):
    pipe = pipes[kind]
    class_before = type(pipe)
    baseline = _run(pipe, kind).images  # a first call sets the pipeline's per-call attributes
    config_before = dict(pipe.config)
    dict_before = dict(pipe.__dict__)
    processor_before = dict(pipe.image_processor.__dict__)
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    assert (_run(pipe, kind).images == 0).all()
    g.remove()
    assert type(pipe) is class_before
    assert dict(pipe.config) == config_before
    assert pipe.__dict__.keys() == dict_before.keys()
    assert all(pipe.__dict__[k] is v for k, v in dict_before.items() if k != "_internal_dict")
    assert pipe.image_processor.__dict__.keys() == processor_before.keys()
    np.testing.assert_array_equal(_run(pipe, kind).images, baseline)
    unguard(pipe)  # no guard: nothing to do


def test_guarding_again_replaces_the_guard(pipes, level_checkpoints):
    pipe = pipes["sdxl"]
    baseline = _run(pipe, "sdxl").images
    first = guard(pipe, model=level_checkpoints["high"], action="blank")
    second = guard(pipe, model=level_checkpoints["neutral"], action="blank")
    assert pipe._nsfw_guard is second and first.pipe is pipe
    np.testing.assert_array_equal(_run(pipe, "sdxl").images, baseline)  # not blanked twice
    second.remove()
    assert "postprocess" not in pipe.image_processor.__dict__


def test_sd_family_registers_the_checker_in_the_config(pipes, level_checkpoints):
    pipe = pipes["sd"]
    g = guard(pipe, model=level_checkpoints["high"])
    try:
        assert pipe.safety_checker is g.checker
        assert pipe.config.safety_checker == ("nsfw_guard.safety_checker", "NSFWSafetyChecker")
        # The pipeline's own class, with the tensor-native run_safety_checker: nothing patched
        # onto the instance.
        assert isinstance(pipe, StableDiffusionPipeline)
        assert type(pipe) is not StableDiffusionPipeline
        assert type(pipe).__name__ == "StableDiffusionPipeline"
        assert type(pipe).run_safety_checker is not StableDiffusionPipeline.run_safety_checker
        assert "run_safety_checker" not in pipe.__dict__
    finally:
        g.remove()
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.safety_checker is None and pipe.config.safety_checker == (None, None)


def test_pt_output_calls_no_pil(pipes, level_checkpoints):
    calls = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith("PIL"):
            calls.append(frame.f_code.co_name)

    for kind in KINDS:
        pipe = pipes[kind]
        g = guard(pipe, model=level_checkpoints["high"], action="blur")
        try:
            sys.setprofile(profiler)
            out = _run(pipe, kind, "pt")
        finally:
            sys.setprofile(None)
            g.remove()
        assert out.images.shape == (2, 3, 64, 64)
        assert calls == [], f"{kind}: PIL called: {sorted(set(calls))}"


def test_saved_guarded_pipeline_reloads_with_its_checker(pipes, level_checkpoints, tmp_path):
    pipe = pipes["sd"]
    g = guard(pipe, model=level_checkpoints["high"], level="low", threshold=0.7, action="pixelate")
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        g.remove()
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["safety_checker"] == ["nsfw_guard.safety_checker", "NSFWSafetyChecker"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    checker = reloaded.safety_checker
    assert isinstance(checker, NSFWSafetyChecker)
    settings = (checker.config.level, checker.config.threshold, checker.config.action)
    assert settings == ("low", 0.7, "pixelate")
    reloaded.set_progress_bar_config(disable=True)
    # The stock run_safety_checker (PIL + feature extractor) drives the reloaded checker.
    out = _run(reloaded, "sd", "np")
    assert out.nsfw_content_detected == [True, True]
    assert np.abs(out.images - _run(pipe, "sd", "np").images).mean() > 1e-3


def test_saved_pipeline_reloads_in_a_fresh_process(pipes, level_checkpoints, tmp_path):
    g = guard(pipes["sd"], model=level_checkpoints["high"], action="blank")
    try:
        pipes["sd"].save_pretrained(tmp_path)
    finally:
        g.remove()
    code = (
        "import nsfw_guard.safety_checker, numpy as np\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r})\n"
        "out = pipe('a photo', num_inference_steps=2, output_type='np')\n"
        "print(type(pipe.safety_checker).__name__, out.nsfw_content_detected, out.images.max())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NSFWSafetyChecker", "[True]", "0.0"]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_fails_closed_when_the_check_raises(pipes, level_checkpoints, kind):
    def broken(images):
        raise RuntimeError("censor exploded")

    pipe = pipes[kind]
    g = guard(pipe, model=level_checkpoints["neutral"], action=broken, fill_color=(1, 1, 1))
    try:
        # Even clean images are blocked when their check failed.
        with pytest.warns(GuardWarning, match="check failed \\(RuntimeError: censor exploded\\)"):
            out = _run(pipe, kind, "np")
        assert (out.images == 1).all()
        assert all(r.flagged and "censor exploded" in r.reason for r in g.last)
        if kind == "sd":
            assert out.nsfw_content_detected == [True, True]
        g_raise = guard(pipe, model=level_checkpoints["neutral"], action=broken, on_error="raise")
        with pytest.raises(RuntimeError, match="censor exploded"):
            _run(pipe, kind, "np")
        g_raise.remove()
    finally:
        unguard(pipe)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_nan_latents_are_blanked_and_flagged(pipes, level_checkpoints, kind):
    pipe = pipes[kind]
    latents = torch.randn(2, 4, 32, 32)
    latents[1] = float("nan")
    g = guard(pipe, model=level_checkpoints["neutral"], action="none")
    try:
        with pytest.warns(GuardWarning, match="1 image\\(s\\) had NaN or Inf pixels"):
            out = _run(pipe, kind, "np", latents=latents)
        assert [r.flagged for r in g.last] == [False, True]
        assert g.last[1].reason == "NaN or Inf pixels"
        assert (out.images[1] == 0).all() and np.isfinite(out.images).all()
    finally:
        g.remove()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_latent_output_warns_every_time_that_nothing_was_checked(pipes, level_checkpoints, kind):
    pipe = pipes[kind]
    g = guard(pipe, model=level_checkpoints["high"])
    try:
        _run(pipe, kind, "np")
        assert len(g.last) == 2
        for _ in range(2):  # every time, not once per guard
            with pytest.warns(GuardWarning, match="returned latents.*cannot be checked"):
                _run(pipe, kind, "latent")
            assert g.last == []
        with warnings.catch_warnings():
            warnings.simplefilter("error", GuardWarning)
            _run(pipe, kind, "np")
        assert len(g.last) == 2
    finally:
        g.remove()


def test_results_per_image_and_originals(pipes, level_checkpoints):
    pipe = pipes["sdxl"]
    baseline = _run(pipe, "sdxl", "pt", count=3).images
    g = guard(pipe, model=level_checkpoints["medium"], action="blank", keep_originals=True)
    try:
        out = _run(pipe, "sdxl", "pt", count=3)
    finally:
        g.remove()
    assert len(g.last) == 3 and (out.images == 0).all()
    for result, original in zip(g.last, baseline, strict=True):
        assert result.original.shape == (3, 64, 64) and result.original.device.type == "cpu"
        torch.testing.assert_close(result.original, original, atol=1e-6, rtol=0)
        assert result.level.value == "medium" and result.flagged


def test_detector_weights_are_shared(pipes, level_checkpoints):
    detector = NSFWDetector(str(level_checkpoints["high"]), device="cpu")
    g = guard(pipes["sdxl"], model=detector, action="blank")
    try:
        assert g.checker.check_step.scorer.model is detector.model
        assert (_run(pipes["sdxl"], "sdxl").images == 0).all()
    finally:
        g.remove()


def test_bad_arguments_are_clear_errors(pipes, level_checkpoints, tmp_path):
    with pytest.raises(TypeError, match="takes a diffusers pipeline, not a str"):
        guard("pipe")
    with pytest.raises(ValueError, match="on_error='ignore'"):
        guard(pipes["sd"], on_error="ignore")
    with pytest.raises(ValueError, match="level must be"):
        guard(pipes["sd"], level="neutral", model=level_checkpoints["high"])
    with pytest.raises(ValueError, match="action='smudge'"):
        guard(pipes["sd"], action="smudge", model=level_checkpoints["high"])
    # Censor settings fail at guard(), not at generation time, whatever the action.
    bad_settings = [
        ({"fill_color": (255, 0, 0)}, "color=\\(255, 0, 0\\): expected one number or 3"),
        ({"blur_radius": -1}, "blur radius=-1"),
        ({"pixelate_block_size": 0, "action": "blur"}, "pixelate block_size=0"),
    ]
    for settings, message in bad_settings:
        with pytest.raises(ValueError, match=message):
            guard(pipes["sd"], model=level_checkpoints["high"], **settings)
    assert "_nsfw_guard" not in pipes["sd"].__dict__
    # A pipeline that makes no images is refused in one line, before any model is loaded.
    unet = UNet1DModel(
        block_out_channels=(8, 8),
        in_channels=2,
        out_channels=2,
        down_block_types=("DownBlock1DNoSkip", "DownBlock1D"),
        up_block_types=("UpBlock1D", "UpBlock1DNoSkip"),
    )
    audio = DanceDiffusionPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="^nsfw-guard cannot guard DanceDiffusionPipeline: it ret"):
        guard(audio, model="no/such-model")
    assert type(audio) is DanceDiffusionPipeline and "_nsfw_guard" not in audio.__dict__


def test_pil_output_is_real_images(pipes, level_checkpoints):
    g = guard(pipes["sdxl"], model=level_checkpoints["high"], action="pixelate")
    try:
        images = _run(pipes["sdxl"], "sdxl", "pil").images
    finally:
        g.remove()
    assert all(isinstance(image, Image.Image) and image.size == (64, 64) for image in images)


def test_pipeline_dtype_changes_leave_the_checker_dtype(pipes, level_checkpoints):
    from nsfw_guard.model import default_dtype

    pipe = pipes["sd"]
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    try:
        pipe.to(torch.bfloat16)
        assert pipe.unet.dtype == torch.bfloat16
        assert g.checker.dtype == default_dtype("cpu")
        pipe.to(torch.float32)
        assert g.checker.dtype == default_dtype("cpu")
        assert (_run(pipe, "sd").images == 0).all()
    finally:
        g.remove()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_works_under_model_cpu_offload(level_checkpoints, kind, tmp_path):
    # No accelerator here: diffusers' offload machinery runs for real with the CPU as its device.
    pipe = make_tiny_pipeline(kind, tmp_path)
    baseline = _run(pipe, kind).images
    pipe.enable_model_cpu_offload(device="cpu")
    guard(pipe, model=level_checkpoints["neutral"], action="blank")
    try:
        for _ in range(2):  # the re-enable at the end of each call moves components around
            np.testing.assert_array_equal(_run(pipe, kind).images, baseline)
        guard(pipe, model=level_checkpoints["high"], action="blank")
        out = _run(pipe, kind)
        assert (out.images == 0).all() and len(pipe._nsfw_guard.last) == 2
    finally:
        unguard(pipe)


def test_video_frames_are_checked_one_by_one(tmp_path):
    video, inputs = make_pipeline("video", tmp_path)
    inputs = {**inputs, "num_frames": 3}
    baseline = video(output_type="np", generator=torch.manual_seed(0), **inputs).frames
    # A pivot far below any frame: every frame is flagged, each checked as an image.
    g = guard(video, model=make_brightness_checkpoint(tmp_path, -10.0), action="blank")
    try:
        frames = video(output_type="np", generator=torch.manual_seed(0), **inputs).frames
    finally:
        g.remove()
    assert frames.shape == baseline.shape == (1, 3, 64, 64, 3)
    assert len(g.last) == 3 and all(r.flagged for r in g.last)
    assert (frames == 0).all()


def test_every_frame_of_a_long_video_is_checked(tmp_path):
    """One bright frame, the 25th of 40, of a decoded video: it alone is flagged and blanked;
    every other frame is the unguarded output, bit for bit."""
    video, _ = make_pipeline("video", tmp_path)
    decoded = torch.full((1, 3, 40, 32, 32), -0.8)  # [B, C, F, H, W] as the VAE decodes it
    decoded[:, :, 25] = 0.9
    baseline = video.video_processor.postprocess_video(decoded, output_type="np")
    g = guard(video, model=make_brightness_checkpoint(tmp_path, 0.0), action="blank")
    try:
        frames = video.video_processor.postprocess_video(decoded, output_type="np")
    finally:
        g.remove()
    assert [result.flagged for result in g.last] == [i == 25 for i in range(40)]
    assert (frames[0, 25] == 0).all() and (baseline[0, 25] > 0.9).all()
    np.testing.assert_array_equal(np.delete(frames, 25, axis=1), np.delete(baseline, 25, axis=1))
