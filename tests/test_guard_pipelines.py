"""Guarded diffusers pipelines, one of each family, built tiny and offline: with a checkpoint forced
to "high" every returned image is censored, with one forced to "neutral" every output is
bit-identical to the unguarded one, for output types pil, np and pt; latents warn every time.
Pixel-space pipelines (DeepFloyd IF, DDPM, PRXPixel) have no latents: what they return for
"latent" is images, and those are checked too."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import PipelineCallback
from PIL import Image

from nsfw_guard import GuardError, GuardWarning, guard, unguard
from nsfw_guard.pipeline_support import IMAGE_FIELDS, NSFW_FIELDS, pipeline_support

from .tiny_pipelines import KINDS, make_pipeline

OUTPUT_TYPES = ("pil", "np", "pt")


@pytest.fixture(scope="module", params=KINDS)
def built(request, tmp_path_factory):
    pipe, inputs = make_pipeline(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, pipe, inputs


def _call(pipe, inputs, output_type, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(**inputs, output_type=output_type, generator=generator, **kwargs)


def _images(output):
    """The output's images (its first image field with a value)."""
    return next(output[name] for name in IMAGE_FIELDS if output.get(name) is not None)


def _pixels(images) -> np.ndarray:
    """Images in any output form as one float64 array, in their own value range."""
    if isinstance(images, torch.Tensor):
        return images.double().cpu().numpy()
    if isinstance(images, Image.Image):
        return np.asarray(images, dtype=np.float64)
    if isinstance(images, list | tuple):
        return np.stack([_pixels(item) for item in images])
    return np.asarray(images, dtype=np.float64)


def _count(images) -> int:
    """How many images (video frames) ``images`` holds."""
    if isinstance(images, list | tuple):
        return (
            sum(_count(item) for item in images)
            if not isinstance(images[0], Image.Image)
            else len(images)
        )
    return int(np.prod(images.shape[:-3]))


def test_every_image_is_censored_or_left_bit_identical(built, level_checkpoints):
    kind, pipe, inputs = built
    support = pipeline_support(type(pipe))
    has_latents = support.latent_output
    output_types = OUTPUT_TYPES if has_latents else (*OUTPUT_TYPES, "latent")
    baselines = {kind_: _pixels(_images(_call(pipe, inputs, kind_))) for kind_ in output_types}
    latents = _images(_call(pipe, inputs, "latent"))

    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    try:
        for output_type in output_types:
            output = _call(pipe, inputs, output_type)
            images = _images(output)
            pixels = _pixels(images)
            assert pixels.shape == baselines[output_type].shape, (kind, output_type)
            # Blank is black in the output's own range: IF's and Kandinsky's "pt" is [-1, 1], as
            # are PRXPixel's "pt" and "latent".
            raw = isinstance(images, torch.Tensor) and support.pt_value_range == "-1,1"
            black = -1.0 if raw else 0.0
            assert (pixels == black).all(), (kind, output_type)
            assert len(g.last) == _count(images) and all(r.flagged for r in g.last)
            for name in NSFW_FIELDS:
                if name in output:
                    assert output[name] == [True] * len(output[name]), (kind, output_type)
        if has_latents:
            with pytest.warns(GuardWarning, match="returned latents"):
                _call(pipe, inputs, "latent")
            assert g.last == []

        g = guard(pipe, model=level_checkpoints["neutral"], action="blank")
        with warnings.catch_warnings():
            warnings.simplefilter("error", GuardWarning)
            for output_type in output_types:
                images = _images(_call(pipe, inputs, output_type))
                np.testing.assert_array_equal(_pixels(images), baselines[output_type])
                assert len(g.last) == _count(images) and not any(r.flagged for r in g.last)
        if has_latents:
            with pytest.warns(GuardWarning, match="returned latents"):
                guarded_latents = _images(_call(pipe, inputs, "latent"))
            torch.testing.assert_close(guarded_latents, latents, rtol=0, atol=0)
    finally:
        unguard(pipe)


@pytest.mark.parametrize(("kind", "output_type"), [("if", "pt"), ("ddpm", "np"), ("sdxl", "pil")])
def test_tuple_outputs_are_checked_in_place(kind, output_type, level_checkpoints, tmp_path):
    """With return_dict=False the images are the tuple's image field; DeepFloyd IF's "pt" output
    skips its run_safety_checker, so its flags are filled in where its nsfw_detected goes."""
    pipe, inputs = make_pipeline(kind, tmp_path)
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    output = _call(pipe, inputs, output_type, return_dict=False)
    assert isinstance(output, tuple)
    black = -1.0 if kind == "if" else 0.0
    assert (_pixels(output[0]) == black).all() and len(g.last) == _count(output[0])
    if kind == "if":
        assert output[1] == [True] * _count(output[0]) and output[2] is None


class _Preview(PipelineCallback):
    """A step callback showing previews through the pipeline's own image processor (after its VAE
    where it has one): a common recipe, checked by the guard on the way."""

    tensor_inputs = ("latents",)

    def callback_fn(self, pipe, step, timestep, callback_kwargs):
        pixels = callback_kwargs["latents"]
        if getattr(pipe, "vae", None) is not None:
            pixels = pipe.vae.decode(pixels / pipe.vae.config.scaling_factor, return_dict=False)[0]
        self.shown = [*getattr(self, "shown", []), *pipe.image_processor.postprocess(pixels)]
        return callback_kwargs


@pytest.mark.parametrize("form", ["function", "PipelineCallback"])
def test_what_a_step_callback_checks_is_not_the_calls_output(form, level_checkpoints, tmp_path):
    """Previews a callback makes through the guarded image processor come out censored, and do not
    count as the call's images: PRXPixel's "pt" images, checked only on their way out, are still
    censored, and SDXL's latents still warn."""
    high = level_checkpoints["high"]
    for kind, output_type in (("prx-pixel", "pt"), ("sdxl", "latent")):
        pipe, inputs = make_pipeline(kind, tmp_path / kind)
        g = guard(pipe, model=high, action="blank")
        preview = _Preview()
        callback = preview if form == "PipelineCallback" else preview.callback_fn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = _call(pipe, inputs, output_type, callback_on_step_end=callback)
        assert len(preview.shown) == 2 * inputs["num_inference_steps"]
        assert not any(np.asarray(image).any() for image in preview.shown)  # blanked
        said = [str(w.message) for w in caught if issubclass(w.category, GuardWarning)]
        if output_type == "latent":
            assert g.last == [] and any("returned latents" in message for message in said)
        else:
            assert (_pixels(_images(output)) == -1.0).all() and len(g.last) == 2


class _CustomPipeline(DiffusionPipeline):
    """A user's own pipeline (no model needed here): it returns what ``output_type`` asks for."""

    def __call__(self, output_type: str = "pil") -> ImagePipelineOutput:
        pixels = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        if output_type == "np":
            return ImagePipelineOutput(images=pixels.numpy())
        if output_type == "pil":
            images = [Image.fromarray((image * 255).byte().numpy()) for image in pixels]
            return ImagePipelineOutput(images=images)
        return ImagePipelineOutput(images={"unknown": pixels})  # not a form nsfw-guard can read


def test_a_custom_pipeline_is_checked_on_its_output_or_returns_nothing(level_checkpoints):
    pipe = _CustomPipeline()
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    assert (pipe(output_type="np").images == 0).all() and len(g.last) == 2
    assert all(not np.asarray(image).any() for image in pipe(output_type="pil").images)
    with pytest.raises(GuardError, match="found no images it can check in what _CustomPipeline"):
        pipe(output_type="dict")
    assert g.last == []
