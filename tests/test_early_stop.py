"""Checks while denoising on real tiny pipelines: early stop skips the rest of a clearly flagged
run and censors it; a neutral run is untouched (same images, same denoiser calls); previews are
censored; the early check step exports with no host sync."""

import warnings
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    CogVideoXDPMScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    EDMEulerScheduler,
    FluxPipeline,
)

from nsfw_guard import EarlyStop, GuardWarning, guard, unguard
from nsfw_guard.check import CheckStep
from nsfw_guard.early_stop import EarlyCheck, LatentDecoder
from nsfw_guard.latent_layouts import LatentLayout, layout_of
from nsfw_guard.model import load_model
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import make_tiny_decoder, make_tiny_pipeline

from .test_scoring import HOST_SYNC_OPS
from .tiny_pipelines import make_pipeline

STEPS = 10


class _Calls:
    """Counts a denoiser's forward calls (a forward hook on the real module)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self._seen)

    def _seen(self, *_):
        self.count += 1


def _run(pipe, denoiser, **kwargs):
    calls = _Calls(denoiser)
    try:
        kwargs.setdefault("num_inference_steps", STEPS)
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        output = pipe(**kwargs)
    finally:
        calls.handle.remove()
    return output, calls.count


@pytest.fixture
def sd():
    return make_tiny_pipeline("sd")


PROMPT = {"prompt": "a photo", "output_type": "np"}


def test_a_clearly_flagged_run_stops_at_the_first_check_and_is_censored(sd, level_checkpoints):
    early = EarlyStop(at=(0.3, 0.6), threshold=0.5, decoder=make_tiny_decoder())
    g = guard(sd, model=level_checkpoints["high"], action="blank", early_stop=early)
    output, calls = _run(sd, sd.unet, **PROMPT, num_images_per_prompt=2)
    assert calls == 3  # steps 0, 1, 2 of 10: stopped after step index 2 (30 %)
    assert (output.images == 0).all() and output.nsfw_content_detected == [True, True]
    assert [r.stopped_at for r in g.last] == [2, 2]
    assert all(r.flagged and r.reason == "stopped early at step 3 of 10" for r in g.last)
    assert all(list(r.early_scores) == [2] for r in g.last)
    assert all(r.early_scores[2]["high"] > 0.9 for r in g.last)
    assert sd.interrupt  # the pipeline's own interrupt did the skipping
    assert "step" not in sd.scheduler.__dict__  # the scheduler is given back after the call


def test_a_stopped_run_is_censored_whatever_the_final_check_says(sd, level_checkpoints):
    """Threshold 0 stops every run at its first check, even with a classifier that finds the
    images neutral: the output of a stopped run is censored all the same."""
    g = guard(
        sd,
        model=level_checkpoints["neutral"],
        action="blank",
        early_stop=EarlyStop(at=(0.5,), threshold=0.0),  # the pipeline's own VAE decodes
    )
    output, calls = _run(sd, sd.unet, **PROMPT)
    assert calls == 5
    assert (output.images == 0).all()
    assert g.last[0].flagged and g.last[0].stopped_at == 4
    assert g.last[0].scores["neutral"] > 0.9  # the final verdict is kept, the flag overrides it


def test_a_neutral_run_is_bit_identical_with_the_same_denoiser_calls(sd, level_checkpoints):
    g = guard(sd, model=level_checkpoints["neutral"])
    plain, plain_calls = _run(sd, sd.unet, **PROMPT, num_images_per_prompt=2)
    plain_last = g.last
    guard(sd, model=level_checkpoints["neutral"], early_stop=True)
    early, early_calls = _run(sd, sd.unet, **PROMPT, num_images_per_prompt=2)
    g = sd._nsfw_guard
    assert early_calls == plain_calls == STEPS
    assert np.array_equal(early.images, plain.images)
    assert [r.scores for r in g.last] == [r.scores for r in plain_last]
    assert all(r.stopped_at is None and sorted(r.early_scores) == [2, 4, 6] for r in g.last)


def test_a_batch_with_only_some_images_flagged_early_runs_to_the_end(sd, sharp_checkpoint):
    """Stopping needs every image of the batch: one sure image is not enough."""
    kwargs = {**PROMPT, "prompt": ["a photo", "a cat"], "generator": None}

    def run(early_stop):
        guard(sd, model=sharp_checkpoint, action="none", early_stop=early_stop)
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        output, calls = _run(sd, sd.unet, **{**kwargs, "generator": generators})
        return output, calls, sd._nsfw_guard.last

    _, _, probe = run(EarlyStop(at=(0.5,), threshold=1.0))
    high = sorted(r.early_scores[4]["medium"] for r in probe)
    assert high[0] < high[1]
    between = (high[0] + high[1]) / 2
    output, calls, last = run(EarlyStop(at=(0.5,), threshold=between))
    plain, plain_calls, plain_last = run(False)
    assert calls == plain_calls == STEPS
    assert np.array_equal(output.images, plain.images)
    assert [r.flagged for r in last] == [r.flagged for r in plain_last]
    assert all(r.stopped_at is None for r in last)
    assert sum(r.early_scores[4]["medium"] >= between for r in last) == 1


def test_previews_are_censored_when_flagged_and_the_plain_estimates_otherwise(
    sd, level_checkpoints
):
    decoder = make_tiny_decoder()
    # The x0 estimates the scheduler itself returns (Euler: pred_original_sample), decoded.
    estimates = []
    step = sd.scheduler.step

    def spy(*args, **kwargs):
        result = step(*args, **kwargs)
        estimates.append(result[1] if isinstance(result, tuple) else result.pred_original_sample)
        return result

    sd.scheduler.step = spy
    try:
        shown = {}
        g = guard(sd, model=level_checkpoints["neutral"], early_stop=EarlyStop(decoder=decoder))
        previews = g.previews(lambda step, images: shown.update({step: images}), every=4)
        _run(sd, sd.unet, **PROMPT, callback_on_step_end=previews)
    finally:
        del sd.scheduler.step
    assert sorted(shown) == [3, 7]
    for step_index, images in shown.items():
        with torch.no_grad():
            decoded = LatentDecoder(decoder)(estimates[step_index])
        expected = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        assert np.array_equal(np.asarray(images[0]), expected[0].permute(1, 2, 0).numpy())

    shown.clear()
    g = guard(sd, model=level_checkpoints["high"], action="blank", early_stop=False)
    _run(sd, sd.unet, **PROMPT, callback_on_step_end=g.previews(shown.__setitem__, every=5))
    assert sorted(shown) == [4, 9]
    assert all(np.asarray(image).max() == 0 for images in shown.values() for image in images)


def test_previews_compose_with_early_stop_and_the_users_own_callback(sd, level_checkpoints):
    seen, shown = [], []

    def mine(pipe, step, timestep, callback_kwargs):
        seen.append(step)
        return {"latents": callback_kwargs["latents"]}

    g = guard(sd, model=level_checkpoints["high"], early_stop=EarlyStop(at=(0.5,), threshold=0.5))
    previews = g.previews(lambda step, images: shown.append(step), every=2, callback=mine)
    _, calls = _run(sd, sd.unet, **PROMPT, callback_on_step_end=previews)
    assert calls == 5 and seen == [0, 1, 2, 3, 4] and shown == [1, 3]
    assert g.last[0].stopped_at == 4


def test_the_users_own_callback_keeps_working_with_early_stop(sd, level_checkpoints):
    seen = []
    guard(sd, model=level_checkpoints["neutral"], early_stop=True)

    def mine(pipe, step, timestep, callback_kwargs):
        seen.append(step)
        return {}

    _, calls = _run(sd, sd.unet, **PROMPT, callback_on_step_end=mine)
    assert seen == list(range(STEPS)) and calls == STEPS


def _pixels(output) -> np.ndarray:
    """An output's images, or its videos' frames, as one array."""
    images = getattr(output, "images", None)
    return np.asarray(output.frames if images is None else images)


def _tiny(kind: str, folder) -> tuple:
    """``(pipe, its denoiser, call arguments)`` of a tiny pipeline of ``kind``."""
    if kind == "sdxl":
        pipe = make_tiny_pipeline("sdxl")
        return pipe, pipe.unet, {"prompt": "a photo"}
    pipe, inputs = make_pipeline(kind, folder)
    return pipe, pipe.transformer, inputs


@pytest.mark.parametrize("kind", ["sd3", "sdxl", "flux", "flux-kontext", "wan", "cogvideox", "ltx"])
def test_early_stop_on_other_pipelines(kind, tmp_path, level_checkpoints):
    """SD3 (flow matching, FlowMatchEuler, its own VAE with a shift factor), SDXL, Flux (packed
    latents, unpacked at the call's size), Flux Kontext (whose size comes from its image and
    max_area, not from the call), Wan (5-D video latents, a causal 3-D VAE, UniPC with flow
    sigmas, two denoiser calls a step), CogVideoX (latents frames first, v-prediction DDIM) and
    LTX (patchified video tokens, its VAE's mean and std as buffers)."""
    pipe, denoiser, inputs = _tiny(kind, tmp_path)
    inputs = {**inputs, "num_inference_steps": STEPS, "output_type": "np"}
    g = guard(pipe, model=level_checkpoints["high"], action="blank", early_stop=True)
    output, calls = _run(pipe, denoiser, **inputs)
    guard(pipe, model=level_checkpoints["neutral"], early_stop=True)
    early, early_calls = _run(pipe, denoiser, **inputs)
    unguard(pipe)
    plain, plain_calls = _run(pipe, denoiser, **inputs)
    per_step = plain_calls // STEPS
    assert calls == 3 * per_step and (_pixels(output) == 0).all()  # stopped after step 3 of 10
    assert len(g.last) == np.prod(_pixels(output).shape[:-3])  # an image, or a frame, each
    assert all(r.stopped_at == 2 and r.flagged for r in g.last)
    assert early_calls == plain_calls == STEPS * per_step
    assert np.array_equal(_pixels(early), _pixels(plain))


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_a_batch_of_packed_images_or_videos_with_only_some_flagged_runs_to_the_end(
    kind, tmp_path, sharp_checkpoint
):
    """Stopping needs every image, every video (one of its frames) of the batch."""
    pipe, denoiser, inputs = _tiny(kind, tmp_path)
    per_prompt = "num_images_per_prompt" if kind == "flux" else "num_videos_per_prompt"
    inputs = {**inputs, per_prompt: 2, "output_type": "np", "num_inference_steps": STEPS}

    def run(early_stop):
        g = guard(pipe, model=sharp_checkpoint, action="none", early_stop=early_stop)
        output, calls = _run(pipe, denoiser, **inputs)
        return output, calls, g.last

    _, _, probe = run(EarlyStop(at=(0.5,), threshold=1.0))
    videos = np.asarray([r.early_scores[4]["medium"] for r in probe]).reshape(2, -1).max(axis=1)
    assert videos[0] != videos[1]
    between = float(videos.mean())
    output, calls, last = run(EarlyStop(at=(0.5,), threshold=between))
    plain, plain_calls, _ = run(False)
    assert calls == plain_calls and np.array_equal(_pixels(output), _pixels(plain))
    assert all(r.stopped_at is None for r in last)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_previews_of_packed_images_and_videos_are_censored(kind, tmp_path, level_checkpoints):
    """Every preview (every frame of a video's) comes censored when flagged."""
    pipe, denoiser, inputs = _tiny(kind, tmp_path)
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    shown = {}
    previews = g.previews(shown.__setitem__, every=1)
    inputs = {**inputs, "num_inference_steps": STEPS, "output_type": "np"}
    _run(pipe, denoiser, **inputs, callback_on_step_end=previews)
    assert sorted(shown) == list(range(STEPS))
    count = 2 if kind == "flux" else inputs["num_frames"]
    assert all(len(images) == count for images in shown.values())
    assert all(np.asarray(image).max() == 0 for images in shown.values() for image in images)


def test_img2img_counts_the_steps_it_runs(level_checkpoints):
    """With strength 0.5, img2img runs 5 of 10 steps: 50 % of them is step index 1 (2 steps)."""
    pipe = make_tiny_pipeline("sd-img2img")
    image = torch.rand(1, 3, 64, 64)
    g = guard(pipe, model=level_checkpoints["high"], early_stop=EarlyStop(at=(0.5,)))
    _, calls = _run(pipe, pipe.unet, **PROMPT, image=image, strength=0.5)
    assert calls == 2 and g.last[0].reason == "stopped early at step 2 of 5"


def test_a_ddim_scheduler_swapped_in_after_guard_is_used(sd, level_checkpoints):
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    g = guard(sd, model=level_checkpoints["high"], early_stop=EarlyStop(at=(0.2,)))
    _, calls = _run(sd, sd.unet, **PROMPT)
    assert calls == 2 and g.last[0].stopped_at == 1


def test_pipelines_that_cannot_be_stopped_early_are_refused(sd, tmp_path, level_checkpoints):
    model = level_checkpoints["neutral"]
    cogvideox, _ = make_pipeline("cogvideox", tmp_path / "cogvideox")
    tiny = EarlyStop(decoder=make_tiny_decoder())
    with pytest.raises(ValueError, match=r"CogVideoXPipeline makes videos, which AutoencoderTiny"):
        guard(cogvideox, model=model, early_stop=tiny)
    assert "_nsfw_guard" not in cogvideox.__dict__  # refused before anything was attached
    cogvideox.scheduler = CogVideoXDPMScheduler.from_config(cogvideox.scheduler.config)
    with pytest.raises(ValueError, match=r"no x0 estimate is known for CogVideoXDPMScheduler"):
        guard(cogvideox, model=model, early_stop=True)

    class OddlyPacked(FluxPipeline):
        @staticmethod
        def _unpack_latents(latents, tokens_per_row):
            return latents

    with pytest.raises(ValueError, match=r"OddlyPacked's latents are packed in a way nsfw-guard"):
        layout_of(OddlyPacked.__new__(OddlyPacked))
    ddpm, _ = make_pipeline("ddpm", tmp_path / "ddpm")
    with pytest.raises(ValueError, match=r"cannot stop DDPMPipeline early: .*interrupt"):
        guard(ddpm, model=model, early_stop=True)
    sd.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match=r"no x0 estimate is known for EDMEulerScheduler"):
        guard(sd, model=model, early_stop=True)
    with pytest.raises(TypeError, match=r"early_stop='yes'"):
        guard(sd, model=model, early_stop="yes")
    with pytest.raises(ValueError, match=r"fractions in \(0, 1\]"):
        EarlyStop(at=(0.0, 0.5))
    with pytest.raises(TypeError, match=r"decode\(\) method"):
        EarlyStop(decoder=torch.nn.Linear(2, 2))


def test_a_scheduler_swapped_to_one_without_an_estimate_warns_and_still_checks(
    sd, level_checkpoints
):
    g = guard(sd, model=level_checkpoints["high"], action="blank", early_stop=True)
    sd.scheduler = EDMEulerScheduler()
    with pytest.warns(GuardWarning, match=r"no checks while denoising in this call"):
        output, calls = _run(sd, sd.unet, **PROMPT, num_inference_steps=3)
    assert calls == 3 and (output.images == 0).all() and g.last[0].stopped_at is None


def test_previews_of_another_guard_are_refused(sd, level_checkpoints):
    other = make_tiny_pipeline("sd")
    g_other = guard(other, model=level_checkpoints["neutral"])
    guard(sd, model=level_checkpoints["neutral"])
    with pytest.raises(Exception, match=r"another pipeline's guard"):
        _run(sd, sd.unet, **PROMPT, callback_on_step_end=g_other.previews(print))
    with pytest.raises(ValueError, match=r"every=0"):
        g_other.previews(print, every=0)


class _PackedEarlyCheck(torch.nn.Module):
    """What the guard runs on Flux's packed x0 estimate: unpack at the call's size, then check."""

    def __init__(self, check: EarlyCheck, height: int, width: int):
        super().__init__()
        self.check, self.size = check, {"height": height, "width": width}

    def forward(self, latents):
        pipe = SimpleNamespace(vae_scale_factor=2)  # the tiny VAE's
        return self.check(LatentLayout("packed", FluxPipeline).to_vae(latents, pipe, self.size))


@pytest.mark.parametrize("layout", ["image", "packed", "video"])
def test_the_early_check_step_exports_with_no_host_sync(layout, level_checkpoints):
    """TAESD on image latents, the Flux unpacking in front of a VAE, a Wan video VAE."""
    loaded = load_model(level_checkpoints["high"], device="cpu", dtype=torch.float32)
    step = CheckStep(NSFWScorer(loaded.model, loaded.data_config), action="blur")
    if layout == "video":
        if not hasattr(diffusers, "AutoencoderKLWan"):
            pytest.skip(f"diffusers {diffusers.__version__} has no AutoencoderKLWan")
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )  # fmt: skip
        check, latents = (
            EarlyCheck(LatentDecoder(vae.eval()), step, 0.8),
            torch.randn(2, 16, 2, 4, 4),
        )
    else:
        check = EarlyCheck(LatentDecoder(make_tiny_decoder()), step, threshold=0.8)
        latents = torch.randn(2, 4, 16, 16)
    if layout == "packed":  # 4 channels of 16x16 as Flux packs them: 8x8 tokens of 16
        check, latents = _PackedEarlyCheck(check, 32, 32), torch.randn(2, 64, 16)
    check.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(check, (latents,))
    ops = {
        node.target.__name__.split(".")[0]
        for node in exported.graph.nodes
        if node.op == "call_function" and hasattr(node.target, "__name__")
    }
    assert not ops & HOST_SYNC_OPS, ops & HOST_SYNC_OPS
    previews, scores, stop = exported.module()(latents)
    expected = check(latents)
    assert torch.equal(stop, expected.stop) and bool(stop)
    assert torch.allclose(scores, expected.scores) and torch.allclose(previews, expected.previews)
    assert previews.shape[0] == (10 if layout == "video" else 2)  # 5 frames of 2 videos


def test_stop_false_records_the_early_scores_and_never_stops(sd, level_checkpoints):
    g = guard(sd, model=level_checkpoints["high"], early_stop=EarlyStop(threshold=0.0, stop=False))
    _, calls = _run(sd, sd.unet, **PROMPT)
    assert calls == STEPS and g.last[0].stopped_at is None
    assert sorted(g.last[0].early_scores) == [2, 4, 6] and g.last[0].reason is None


def test_save_pretrained_keeps_the_early_stop_settings(tmp_path, level_checkpoints):
    """Saved with the checker's other settings; guard() of the reloaded pipeline uses them all
    (its own checker, its decoder loaded by name) and stops as the saved guard did."""
    import nsfw_guard.safety_checker  # noqa: F401 - lets diffusers load the checker

    make_tiny_decoder().save_pretrained(tmp_path / "taesd")
    decoder = AutoencoderTiny.from_pretrained(tmp_path / "taesd")
    pipe = make_tiny_pipeline("sd")
    early = EarlyStop(at=(0.3,), threshold=0.5, decoder=decoder)
    guard(pipe, model=level_checkpoints["high"], action="blank", early_stop=early)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.safety_checker.config.early_stop == {
        "at": [0.3], "threshold": 0.5, "stop": True, "decoder": str(tmp_path / "taesd"),
    }  # fmt: skip
    g = guard(reloaded)
    assert isinstance(g.early_stop.decoder, AutoencoderTiny) and g.early_stop.at == (0.3,)
    output, calls = _run(reloaded, reloaded.unet, **PROMPT)
    assert calls == 3 and (output.images == 0).all() and g.last[0].stopped_at == 2
    again = guard(reloaded, model=reloaded.safety_checker, early_stop=False)  # given ones win
    assert again.early_stop is None and again.checker.config.action == "blank"
    # A decoder that has no name to be loaded by: saving says what the reloaded guard does.
    guard(pipe, model=level_checkpoints["high"], early_stop=EarlyStop(decoder=make_tiny_decoder()))
    with pytest.warns(GuardWarning, match="decodes with its VAE unless given"):
        pipe.save_pretrained(tmp_path / "again")
