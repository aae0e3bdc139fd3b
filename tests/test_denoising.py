"""The x0 estimate against its definition and against the schedulers' own x0, on random tensors."""

import diffusers
import pytest
import torch

from nsfw_guard.denoising import SCHEDULER_FAMILIES, scheduler_family, x0_estimate

STEPS = 10
CASES = [
    (name, prediction)
    for family, names in SCHEDULER_FAMILIES.items()
    for name in names
    for prediction in (("flow_prediction",) if family == "flow" else ("epsilon", "v_prediction"))
]


def _generator(scheduler, generator) -> dict:
    import inspect

    return (
        {"generator": generator}
        if "generator" in inspect.signature(scheduler.step).parameters
        else {}
    )


def _scheduler(name: str, prediction: str, **config):
    cls = getattr(diffusers, name)
    if cls.__module__.startswith("diffusers.utils.dummy"):
        pytest.skip(f"{name} needs a package this environment does not have (scipy, torchsde)")
    if prediction != "flow_prediction":
        config["prediction_type"] = prediction
    scheduler = cls(**config)
    scheduler.set_timesteps(STEPS)
    return scheduler


def _noisy(scheduler, index: int, clean, noise, prediction: str):
    """``(x_t, model output)`` at step ``index``, as the scheduler's family defines them."""
    family = scheduler_family(scheduler)
    if family == "flow":
        sigma = float(scheduler.sigmas[index])
        return (1 - sigma) * clean + sigma * noise, noise - clean
    if family == "vp_timestep":
        abar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[index])])
        alpha, sigma, scale = abar**0.5, (1 - abar) ** 0.5, 1.0
    else:
        s = float(scheduler.sigmas[index])
        alpha, sigma = 1 / (1 + s**2) ** 0.5, s / (1 + s**2) ** 0.5
        # Karras schedulers keep the sample unscaled: x_t = x0 + s eps = (alpha x0 + sigma eps)
        # / alpha; the model sees it scaled by alpha (scale_model_input).
        scale = 1 / alpha if family == "karras_sigma" else 1.0
    sample = (alpha * clean + sigma * noise) * scale
    output = noise if prediction == "epsilon" else alpha * noise - sigma * clean
    return sample, output


@pytest.mark.parametrize(("name", "prediction"), CASES)
def test_x0_estimate_inverts_the_schedulers_parametrisation(name, prediction):
    scheduler = _scheduler(name, prediction)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    for index in (0, 3, 7):
        sample, output = _noisy(scheduler, index, clean, noise, prediction)
        x0 = x0_estimate(scheduler, output, scheduler.timesteps[index], sample, index)
        assert torch.allclose(x0, clean, atol=2e-4, rtol=1e-4), (name, prediction, index)


@pytest.mark.parametrize(
    ("name", "prediction"),
    [
        ("DDIMScheduler", "epsilon"),
        ("DDIMScheduler", "v_prediction"),
        ("EulerDiscreteScheduler", "epsilon"),
        ("EulerDiscreteScheduler", "v_prediction"),
        ("EulerAncestralDiscreteScheduler", "epsilon"),
        ("DDPMScheduler", "epsilon"),
        ("HeunDiscreteScheduler", "epsilon"),
        ("CogVideoXDDIMScheduler", "v_prediction"),  # its SNR shift lives in alphas_cumprod
    ],
)
def test_the_formula_matches_pred_original_sample_where_the_step_returns_it(name, prediction):
    """Derived with no help from the step, the estimate equals the step's own
    ``pred_original_sample`` on random tensors, at the index the guard reads after the step."""
    clipping = {"clip_sample": False} if name in ("DDIMScheduler", "DDPMScheduler") else {}
    scheduler = _scheduler(name, prediction, **clipping)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator) * float(scheduler.init_noise_sigma)
    for t in scheduler.timesteps[:4]:
        output = torch.randn(sample.shape, generator=generator)
        result = scheduler.step(output, t, sample, **_generator(scheduler, generator))
        index = getattr(scheduler, "step_index", None)
        derived = x0_estimate(scheduler, output, t, sample, None if index is None else index - 1)
        assert torch.allclose(derived, result.pred_original_sample, atol=1e-4, rtol=1e-4), name
        sample = result.prev_sample


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_formula_matches_the_multistep_solvers_own_data_prediction(name, prediction):
    """DPM-Solver++ and UniPC keep the x0 each step converted the model output to (their
    ``model_outputs``); the estimate, at the index read after the step, is that."""
    scheduler = _scheduler(name, prediction)
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[:4]:
        output = torch.randn(sample.shape, generator=generator)
        before = sample.clone()
        sample = scheduler.step(output, t, sample).prev_sample
        x0 = x0_estimate(scheduler, output, t, before, scheduler.step_index - 1)
        assert torch.allclose(x0, scheduler.model_outputs[-1], atol=1e-4, rtol=1e-4), name


def test_flow_match_euler_step_moves_towards_the_estimate():
    """FlowMatchEuler returns no x0; its step is ``x + (s' - s) v``, which lands on the line from
    the estimate through the sample: ``x0 + s' (x - x0) / s``."""
    scheduler = _scheduler("FlowMatchEulerDiscreteScheduler", "flow_prediction")
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[:3]:
        output = torch.randn(sample.shape, generator=generator)
        after = scheduler.step(output, t, sample).prev_sample
        index = scheduler.step_index - 1
        x0 = x0_estimate(scheduler, output, t, sample, index)
        s, s_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        assert torch.allclose(after, x0 + s_next * (sample - x0) / s, atol=1e-4)
        sample = after


def test_flow_sigmas_on_a_multistep_solver_are_flow_matching():
    scheduler = _scheduler(
        "UniPCMultistepScheduler", "flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    assert scheduler_family(scheduler) == "flow"
    generator = torch.Generator().manual_seed(4)
    clean, noise = torch.randn(2, 1, 4, 4, generator=generator), torch.randn(2, 1, 4, 4)
    sigma = float(scheduler.sigmas[2])
    x0 = x0_estimate(
        scheduler, noise - clean, scheduler.timesteps[2], (1 - sigma) * clean + sigma * noise, 2
    )
    assert torch.allclose(x0, clean, atol=1e-5)


def test_unknown_schedulers_and_predictions_are_named_in_a_clear_error():
    with pytest.raises(ValueError, match=r"no x0 estimate is known for EDMEulerScheduler"):
        scheduler_family(diffusers.EDMEulerScheduler())
    with pytest.raises(ValueError, match=r"DDIMScheduler with prediction_type='x'"):
        scheduler_family(diffusers.DDIMScheduler(prediction_type="x"))


def test_sample_prediction_is_the_output_itself():
    scheduler = _scheduler("DPMSolverMultistepScheduler", "sample")
    output, sample = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    assert torch.equal(x0_estimate(scheduler, output, scheduler.timesteps[1], sample, 1), output)


def test_the_estimate_on_the_gpu_reads_nothing_back():
    """Timesteps on the device are indexed on the device (DDIM), sigmas on the CPU are read as
    Python numbers: no host sync either way."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    scheduler = _scheduler("DDIMScheduler", "epsilon")
    scheduler.set_timesteps(STEPS, device="cuda")
    sample = torch.randn(1, 4, 8, 8, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        x0_estimate(scheduler, torch.randn_like(sample), scheduler.timesteps[3], sample)
    finally:
        torch.cuda.set_sync_debug_mode("default")
