"""The x0 estimate: the clean latents a denoising step predicts, from the scheduler's own numbers.

At step ``t`` a denoiser's output and the noisy sample ``x_t`` determine the clean latents it
predicts (``x0``). Schedulers whose ``step`` returns it (DDIM, DDPM, Euler, Euler ancestral,
Heun, LMS, ...: ``pred_original_sample``; LCM, TCD: ``denoised``) are taken at their word; for
the others :func:`x0_estimate` derives it from the scheduler's own sigmas or alphas:

- **VP timestep** schedulers (DDIM, DDPM, PNDM, ...): ``abar = alphas_cumprod[t]``,
  ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``.
- **VP sigma** schedulers (DPM-Solver, UniPC, DEIS, SA-Solver): ``alpha = 1 / sqrt(1 + s^2)``,
  ``x_t = alpha x0 + alpha s eps`` with ``s = sigmas[step_index]``.
- **Karras sigma** schedulers (Euler, Heun, LMS, KDPM2, DPM-SDE): ``x_t = x0 + s eps`` on the
  unscaled sample.
- **Flow matching** (FlowMatchEuler, FlowMatchHeun; any scheduler with flow sigmas or
  ``prediction_type="flow_prediction"``): ``x_t = (1 - s) x0 + s noise``, the model predicting
  ``v = noise - x0``.

Then by ``prediction_type``: ``epsilon`` (noise), ``v_prediction`` (``alpha eps - sigma x0``),
``sample`` (x0 itself) or ``flow_prediction``. Every estimate is ``a * x_t + b * output``
(:func:`x0_coefficients`), plain arithmetic on the sample's device: no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SCHEDULER_FAMILIES", "scheduler_family", "x0_coefficients", "x0_estimate"]

SCHEDULER_FAMILIES: dict[str, tuple[str, ...]] = {
    "vp_timestep": (
        "DDIMScheduler",
        "DDIMParallelScheduler",
        "DDPMScheduler",
        "DDPMParallelScheduler",
        "PNDMScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "CogVideoXDDIMScheduler",
    ),
    "vp_sigma": (
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "SASolverScheduler",
    ),
    "karras_sigma": (
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler",
    ),
    "flow": ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"),
}
"""The scheduler classes whose x0 estimate is known, by how their sample is parametrised."""

_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")


def scheduler_family(scheduler: Any) -> str:
    """The parametrisation of ``scheduler``'s samples (a key of :data:`SCHEDULER_FAMILIES`).

    Raises ``ValueError`` naming the scheduler where no x0 estimate is known for it.

    Example:
        >>> from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
        >>> scheduler_family(DPMSolverMultistepScheduler())
        'vp_sigma'
        >>> scheduler_family(DPMSolverMultistepScheduler(use_flow_sigmas=True))
        'flow'
        >>> scheduler_family(FlowMatchEulerDiscreteScheduler())
        'flow'
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {})
    family = next((key for key, names in SCHEDULER_FAMILIES.items() if name in names), None)
    if family is None:
        known = ", ".join(
            n.removesuffix("Scheduler") for ns in SCHEDULER_FAMILIES.values() for n in ns
        )
        raise ValueError(f"no x0 estimate is known for {name}; early checks work with {known}")
    prediction = config.get("prediction_type", "epsilon" if family != "flow" else "flow_prediction")
    if family == "vp_sigma" and (config.get("use_flow_sigmas") or prediction == "flow_prediction"):
        return "flow"
    if family != "flow" and prediction not in _PREDICTIONS[:3]:
        raise ValueError(f"{name} with prediction_type={prediction!r}: no x0 estimate is known")
    return family


def x0_coefficients(
    scheduler: Any, timestep: Tensor | float, step_index: int | None
) -> tuple[Tensor | float, Tensor | float]:
    """``(a, b)`` such that ``x0 = a * sample + b * model_output`` at this step.

    ``step_index`` is the index into ``scheduler.sigmas`` of the step (for the sigma families);
    the VP timestep family reads ``alphas_cumprod`` at ``timestep`` instead (on its device).

    Example:
        >>> from diffusers import EulerDiscreteScheduler
        >>> scheduler = EulerDiscreteScheduler()
        >>> scheduler.set_timesteps(10)
        >>> a, b = x0_coefficients(scheduler, scheduler.timesteps[0], 0)
        >>> a, round(b, 4) == -round(float(scheduler.sigmas[0]), 4)
        (1.0, True)
    """
    family = scheduler_family(scheduler)
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if family == "flow":
        sigma = _scalar(scheduler.sigmas, step_index)
        return 1.0, -sigma
    if family == "karras_sigma":
        sigma = _scalar(scheduler.sigmas, step_index)
        if prediction == "epsilon":
            return 1.0, -sigma
        if prediction == "v_prediction":  # as EulerDiscreteScheduler.step computes it
            return 1.0 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
        return 0.0, 1.0
    if family == "vp_sigma":
        sigma = _scalar(scheduler.sigmas, step_index)
        alpha = 1.0 / (sigma**2 + 1) ** 0.5
        sigma = sigma * alpha
    else:  # vp_timestep
        alphas_cumprod = scheduler.alphas_cumprod
        if torch.is_tensor(timestep):  # indexed where the timestep is: no read-back
            alphas_cumprod = _on(alphas_cumprod, timestep.device)
            abar = alphas_cumprod.gather(0, timestep.long().reshape(1))[0]  # no index check
        else:
            abar = float(alphas_cumprod[int(timestep)])
        alpha, sigma = abar**0.5, (1 - abar) ** 0.5
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v_prediction":
        return alpha, -sigma
    return 0.0, 1.0


def x0_estimate(
    scheduler: Any,
    model_output: Tensor,
    timestep: Tensor | float,
    sample: Tensor,
    step_index: int | None = None,
    step_output: Any = None,
) -> Tensor:
    """The clean latents predicted at this step, in the sample's dtype and device.

    ``step_output`` is what ``scheduler.step`` returned, if at hand: its ``pred_original_sample``
    (or ``denoised``) is used where it has one.

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> scheduler = FlowMatchEulerDiscreteScheduler()
        >>> scheduler.set_timesteps(4)
        >>> clean, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
        >>> sigma = float(scheduler.sigmas[1])
        >>> noisy = (1 - sigma) * clean + sigma * noise
        >>> x0 = x0_estimate(scheduler, noise - clean, scheduler.timesteps[1], noisy, step_index=1)
        >>> torch.allclose(x0, clean, atol=1e-5)
        True
    """
    own = _predicted_by_step(step_output)
    if own is not None and own.shape == sample.shape:
        return own.to(sample.dtype)
    a, b = x0_coefficients(scheduler, timestep, step_index)
    estimate = a * sample.float() + b * model_output.float()
    return estimate.to(sample.dtype)


def _predicted_by_step(step_output: Any) -> Tensor | None:
    for name in ("pred_original_sample", "denoised"):
        value = getattr(step_output, name, None)
        if torch.is_tensor(value):
            return value
    return None


def _on(values: Tensor, device: torch.device) -> Tensor:
    """``values`` on ``device``; to CUDA through pinned memory, so the copy does not wait."""
    if values.device == device:
        return values
    if device.type == "cuda" and values.device.type == "cpu":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _scalar(values: Tensor, index: int | None) -> Tensor | float:
    """``values[index]``: a Python float where ``values`` is on the CPU (diffusers keeps its
    sigmas there), else a 0-d tensor on their device, so reading it never waits for the GPU."""
    if index is None:
        raise ValueError("the scheduler has no step index yet: call it after its first step")
    value = values[index]
    return float(value) if value.device.type == "cpu" else value.float()
