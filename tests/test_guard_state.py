"""A guard's state belongs to one pipeline: copies, pickles, from_pipe and reloads either have a
guard of their own or say they are not guarded, and each call's state opens and closes with it."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from nsfw_guard import GuardWarning, NSFWSafetyChecker, guard, unguard
from nsfw_guard.testing import make_tiny_pipeline

from .test_guard import _run
from .tiny_pipelines import make_pipeline


@pytest.fixture
def sd(tmp_path):
    return make_tiny_pipeline("sd", tmp_path)


@pytest.fixture
def sdxl(tmp_path):
    return make_tiny_pipeline("sdxl", tmp_path)


def _blank(pipe, kind="sd") -> bool:
    return bool((_run(pipe, kind).images == 0).all())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_deep_copy_has_its_own_guard(sd, sdxl, level_checkpoints, kind):
    pipe = {"sd": sd, "sdxl": sdxl}[kind]
    baseline = _run(pipe, kind).images
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    copied = copy.deepcopy(pipe)
    assert copied._nsfw_guard is not g and copied._nsfw_guard.pipe is copied
    assert copied._nsfw_guard.checker is not g.checker
    assert _blank(copied, kind) and len(copied._nsfw_guard.last) == 2

    unguard(copied)  # the reproducer: this used to unguard the original
    np.testing.assert_array_equal(_run(copied, kind).images, baseline)
    assert _blank(pipe, kind) and pipe._nsfw_guard is g and len(g.last) == 2

    guard(copied, model=level_checkpoints["neutral"], action="blank")
    assert _blank(pipe, kind)
    np.testing.assert_array_equal(_run(copied, kind).images, baseline)
    g.remove()  # and removing the original's guard leaves the copy's
    assert copied._nsfw_guard.pipe is copied and type(copied) is not type(pipe)
    np.testing.assert_array_equal(_run(copied, kind).images, baseline)
    assert len(copied._nsfw_guard.last) == 2


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_shallow_copy_has_its_own_guard(sd, sdxl, level_checkpoints, kind):
    pipe = {"sd": sd, "sdxl": sdxl}[kind]
    baseline = _run(pipe, kind).images
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    copied = copy.copy(pipe)
    assert copied._nsfw_guard is not g and copied._nsfw_guard.checker is g.checker  # shared
    assert _blank(copied, kind)
    _run(copied, kind, count=1)
    assert len(g.last) == 0 and len(copied._nsfw_guard.last) == 1  # per-pipeline results
    unguard(copied)
    # Unguarded, it shares the guarded pipeline's decoder: it says so.
    with pytest.warns(GuardWarning, match="is not guarded, but it runs the vae.decoder"):
        np.testing.assert_array_equal(_run(copied, kind).images, baseline)
    assert _blank(pipe, kind) and len(g.last) == 2
    # A copy made by hand, carrying the original's guard, gets a guard of its own when called.
    by_hand = object.__new__(type(pipe))
    by_hand.__dict__.update(pipe.__dict__)
    assert (_run(by_hand, kind, count=1).images == 0).all()
    assert by_hand._nsfw_guard is not g and by_hand._nsfw_guard.pipe is by_hand
    assert len(g.last) == 2 and len(by_hand._nsfw_guard.last) == 1
    g.remove()
    # Unguarded now, the original runs a decoder it shares with the guarded copy: it says so.
    with pytest.warns(GuardWarning, match="is not guarded, but it runs the vae.decoder"):
        np.testing.assert_array_equal(_run(pipe, kind).images, baseline)


def test_a_pickled_guarded_pipeline_is_guarded(sd, level_checkpoints):
    g = guard(sd, model=level_checkpoints["high"], action="blank", threshold=0.7)
    loaded = pickle.loads(pickle.dumps(sd))
    assert type(loaded).__name__ == "StableDiffusionPipeline" and isinstance(loaded, type(sd))
    restored = loaded._nsfw_guard
    assert restored is not g and restored.pipe is loaded and restored.threshold == 0.7
    out = _run(loaded, "sd")
    assert out.nsfw_content_detected == [True, True] and (out.images == 0).all()
    unguard(loaded)
    assert type(loaded) is StableDiffusionPipeline and _blank(sd)


def test_last_holds_exactly_the_images_of_the_last_call(sd, level_checkpoints):
    g = guard(sd, model=level_checkpoints["high"], action="blank")
    _run(sd, "sd", count=2)
    assert len(g.last) == 2

    def interrupt(pipe, step, timestep, tensors):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during denoising
        _run(sd, "sd", count=2, callback_on_step_end=interrupt)
    assert g.last == []
    _run(sd, "sd", count=1)
    assert len(g.last) == 1


def test_a_call_that_raises_after_checking_leaves_no_results(level_checkpoints, tmp_path):
    """A video of two clips is checked clip by clip: the second check fails after the first
    clip's verdicts were recorded; with on_error='raise' the call raises and ``last`` is empty."""
    video, inputs = make_pipeline("video", tmp_path)
    calls = []

    def fails_on_second_clip(images):
        calls.append(images.shape[0])
        if len(calls) == 2:
            raise MemoryError("out of memory in the censor")
        return images * 0

    inputs = {key: value for key, value in inputs.items() if key != "prompt"}
    g = guard(video, model=level_checkpoints["high"], action=fails_on_second_clip, on_error="raise")
    with pytest.raises(MemoryError):
        video(["a", "b"], output_type="np", generator=torch.manual_seed(0), **inputs)
    assert calls == [2, 2] and g.last == []
    calls.clear()
    video("a", output_type="np", generator=torch.manual_seed(0), **inputs)
    assert [r.flagged for r in g.last] == [True, True]


def test_from_pipe_of_a_guarded_sd_pipeline_stays_guarded(sd, level_checkpoints):
    g = guard(sd, model=level_checkpoints["high"], action="blank")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuardWarning)
        img2img = StableDiffusionImg2ImgPipeline.from_pipe(sd)  # raised a TypeError before
        img2img.set_progress_bar_config(disable=True)
        assert img2img.safety_checker is g.checker
        out = _run(img2img, "sd-img2img")
    assert out.nsfw_content_detected == [True, True] and (out.images == 0).all()
    g.remove()  # the derived pipeline keeps the checker: it is its own component now
    assert _run(img2img, "sd-img2img").nsfw_content_detected == [True, True]


@pytest.mark.parametrize("made_with", ["from_pipe", "components"])
def test_a_pipeline_derived_from_a_guarded_sdxl_warns_on_its_first_call(
    sdxl, level_checkpoints, made_with
):
    guard(sdxl, model=level_checkpoints["high"], action="blank")
    if made_with == "from_pipe":
        img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    else:
        img2img = StableDiffusionXLImg2ImgPipeline(**sdxl.components)
    img2img.set_progress_bar_config(disable=True)
    with pytest.warns(GuardWarning, match="this StableDiffusionXLImg2ImgPipeline is not guarded"):
        _run(img2img, "sd-img2img", strength=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuardWarning)
        _run(img2img, "sd-img2img", strength=1.0)  # once
        g = guard(img2img, model=level_checkpoints["high"], action="blank")
        out = _run(img2img, "sd-img2img", strength=1.0)
        assert (out.images == 0).all() and len(g.last) == 2
        assert _blank(sdxl, "sdxl")  # the guarded original never warns about itself


def test_a_pipeline_of_a_guarded_class_without_a_guard_says_so(sd, level_checkpoints):
    guard(sd, model=level_checkpoints["high"], action="blank")
    made = type(sd).from_pipe(sd)  # a guarded pipeline's class, but no guard of its own
    made.set_progress_bar_config(disable=True)
    with pytest.warns(GuardWarning, match="no guard of its own"):
        _run(made, "sd")
    guard(made, model=level_checkpoints["neutral"])
    assert type(made).__mro__.count(StableDiffusionPipeline) == 1


def test_decoding_outside_a_guarded_call_warns(sdxl, level_checkpoints):
    guard(sdxl, model=level_checkpoints["high"], action="blank")
    with pytest.warns(GuardWarning, match="returned latents"):
        latents = _run(sdxl, "sdxl", "latent").images
    with pytest.warns(GuardWarning, match="vae.decoder of a guarded StableDiffusionXLPipeline"):
        sdxl.vae.decode(latents / sdxl.vae.config.scaling_factor)


def test_saving_says_whether_the_guard_is_saved(sd, sdxl, level_checkpoints, tmp_path):
    guard(sdxl, model=level_checkpoints["high"], action="blank")
    with pytest.warns(GuardWarning, match="not guarded when it is loaded again"):
        sdxl.save_pretrained(tmp_path / "sdxl")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "sdxl")
    assert type(reloaded) is StableDiffusionXLPipeline and "_nsfw_guard" not in reloaded.__dict__

    guard(sd, model=level_checkpoints["high"], action="blank")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuardWarning)
        sd.save_pretrained(tmp_path / "sd")  # the checker is saved with it
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert isinstance(reloaded.safety_checker, NSFWSafetyChecker)
