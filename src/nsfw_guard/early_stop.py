"""Checks during denoising: decode the x0 estimate cheaply, classify it, stop or preview safely.

:class:`EarlyStop` says when to look (fractions of the denoising steps) and how sure the check must
be to stop a run. :class:`LatentDecoder` turns a pipeline's latents into ``[-1, 1]`` images with
its VAE or a small ``AutoencoderTiny`` (TAESD), and :class:`EarlyCheck` runs decode → check step
→ stop decision as one module: in-graph, on the pipeline's device, no host sync
(``torch.export`` proves it). The guard (:mod:`nsfw_guard.pipelines`) calls it from the
scheduler's step and reads back one boolean at the steps ``at`` asks for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .check import CheckStep
from .levels import check_threshold

__all__ = ["EarlyCheck", "EarlyCheckOutput", "EarlyStop", "LatentDecoder"]


@dataclass(frozen=True)
class EarlyStop:
    """When a guarded pipeline checks its images while denoising, and when it stops.

    At each fraction ``at`` of the denoising steps, the guard decodes the x0 estimate (with
    ``decoder``, e.g. a diffusers ``AutoencoderTiny``; ``None``: the pipeline's own VAE) and
    classifies it. When every image of the batch scores ``>= threshold`` at the guard's level,
    the rest of the denoising is skipped and the output is censored. ``stop=False`` only records
    the early scores (``GuardResult.early_scores``), to see how early verdicts agree with final
    ones before trusting them to stop runs.

    Example:
        >>> EarlyStop(at=(0.5,), threshold=0.9).steps(30)
        {14: 0.5}
        >>> EarlyStop().steps(10)
        {2: 0.3, 4: 0.5, 6: 0.7}
    """

    at: Sequence[float] = (0.3, 0.5, 0.7)
    threshold: float = 0.8
    decoder: nn.Module | None = None
    stop: bool = True

    def __post_init__(self) -> None:
        at = (self.at,) if isinstance(self.at, int | float) else tuple(self.at)
        if not at or not all(isinstance(a, int | float) and 0 < a <= 1 for a in at):
            raise ValueError(
                f"EarlyStop(at={self.at!r}): expected fractions in (0, 1], e.g. (0.3, 0.5)"
            )
        object.__setattr__(self, "at", tuple(sorted(set(map(float, at)))))
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        if self.decoder is not None and not callable(getattr(self.decoder, "decode", None)):
            raise TypeError(
                f"EarlyStop(decoder=...) takes an autoencoder with a decode() method, such as "
                f"diffusers.AutoencoderTiny, not a {type(self.decoder).__name__}"
            )

    def to_config(self) -> dict[str, Any]:
        """Settings to save (JSON): ``at``, ``threshold``, ``stop`` and the decoder's Hub id or
        folder (``None`` for the pipeline's own VAE, or a decoder with no name to load it by).

        Example:
            >>> EarlyStop(at=(0.5,)).to_config()
            {'at': [0.5], 'threshold': 0.8, 'stop': True, 'decoder': None}
        """
        name = (getattr(self.decoder, "config", None) or {}).get("_name_or_path")
        name = os.fspath(name) if name else None
        at, threshold, stop = list(self.at), self.threshold, self.stop
        return {"at": at, "threshold": threshold, "stop": stop, "decoder": name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EarlyStop:
        """The settings :meth:`to_config` saved; a named decoder is loaded with diffusers'
        ``AutoencoderTiny.from_pretrained``.

        Example:
            >>> EarlyStop.from_config({"at": [0.5], "threshold": 0.9, "stop": False})
            EarlyStop(at=(0.5,), threshold=0.9, decoder=None, stop=False)
        """
        decoder = config.get("decoder")
        if decoder is not None:
            from diffusers import AutoencoderTiny

            decoder = AutoencoderTiny.from_pretrained(decoder).eval()
        return cls(config["at"], config["threshold"], decoder, config["stop"])

    def steps(self, total: int) -> dict[int, float]:
        """The step indices (0-based) after which a run of ``total`` steps is checked."""
        steps: dict[int, float] = {}
        for fraction in self.at:
            steps.setdefault(min(total - 1, max(0, round(fraction * total) - 1)), fraction)
        return steps


class LatentDecoder(nn.Module):
    """A pipeline's latents as its VAE takes them, ``[B, C, h, w]`` (or ``[B, C, F, h, w]`` for
    a video VAE) → images ``[B, 3, H, W]`` (videos ``[B, 3, F, H, W]``) in ``[-1, 1]``.

    Undoes the latent scaling the way the pipelines do before ``vae.decode``, with the
    autoencoder's own config: ``latents * std / scaling_factor + mean`` where it has
    ``latents_mean``/``latents_std`` (in its config, as Wan's, or as buffers, as LTX's), else
    ``latents / scaling_factor + shift_factor``. A TAESD ``AutoencoderTiny`` (scaling factor 1)
    takes the latents as they are. A VAE conditioned on a timestep (LTX 0.9.1 and later)
    decodes at timestep 0, as its pipelines do by default.

    Example:
        >>> from nsfw_guard.testing import make_tiny_decoder
        >>> LatentDecoder(make_tiny_decoder())(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        config = getattr(autoencoder, "config", {})
        self.scaling_factor = float(config.get("scaling_factor") or 1.0)
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        mean, std = config.get("latents_mean"), config.get("latents_std")
        self.latents_mean = None if mean is None or std is None else torch.tensor(mean)
        self.latents_std = None if mean is None or std is None else torch.tensor(std)
        self.timestep_conditioning = bool(config.get("timestep_conditioning"))

    def forward(self, latents: Tensor) -> Tensor:
        parameter = next(self.autoencoder.parameters())
        z = latents.to(parameter.dtype)
        mean, std = self.latents_mean, self.latents_std
        if mean is None:  # LTX keeps them as buffers of its own
            buffers = dict(self.autoencoder.named_buffers(recurse=False))
            mean, std = buffers.get("latents_mean"), buffers.get("latents_std")
        if mean is not None:
            shape = (1, -1) + (1,) * (z.ndim - 2)
            mean = mean.to(z.device, z.dtype).view(shape)
            std = std.to(z.device, z.dtype).view(shape)
            z = z * std / self.scaling_factor + mean
        else:
            z = z / self.scaling_factor + self.shift_factor
        if self.timestep_conditioning:
            return self.autoencoder.decode(z, z.new_zeros(z.shape[0]), return_dict=False)[0]
        return self.autoencoder.decode(z, return_dict=False)[0]


class EarlyCheckOutput(NamedTuple):
    """One early check's results, on the latents' device. For videos, every frame of each video
    in turn is an image."""

    previews: Tensor
    """``[N, 3, H, W]`` float in [0, 1]: the decoded estimates, the flagged ones censored."""
    scores: Tensor
    """``[N, 4]`` float32 level scores of the estimates."""
    stop: Tensor
    """0-d bool: every image (every video, in one of its frames) reached the early-stop
    threshold at the check level."""


class EarlyCheck(nn.Module):
    """x0 latents → censored previews, scores and the stop decision, in-graph.

    ``step`` censors the previews at the guard's level and threshold (its action, or a blur
    where the guard only flags: a preview is never shown uncensored); ``stop`` asks that every
    image, verifiable, score ``>= threshold`` at that level; a video, that one of its frames
    does (its final check censors every frame once a run is stopped). Images with NaN or Inf
    pixels are blanked and never stop a run.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.scoring import NSFWScorer
        >>> from nsfw_guard.testing import make_checkpoint, make_tiny_decoder
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp(), level="high"), device="cpu")
        >>> step = CheckStep(NSFWScorer(loaded.model, loaded.data_config))
        >>> check = EarlyCheck(LatentDecoder(make_tiny_decoder()), step, threshold=0.8)
        >>> bool(check(torch.randn(2, 4, 8, 8)).stop)
        True
    """

    def __init__(self, decoder: LatentDecoder, step: CheckStep, threshold: float):
        super().__init__()
        self.decoder = decoder
        if step.action == "none":
            step = CheckStep(step.scorer, level=step.level, threshold=step.threshold, action="blur")
        self.step = step
        self.threshold = check_threshold(threshold)

    def forward(self, latents: Tensor) -> EarlyCheckOutput:
        images = self.decoder(latents)
        frames = 1
        if images.ndim == 5:  # videos [B, 3, F, H, W]: each frame an image, video by video
            frames = images.shape[2]
            images = images.transpose(1, 2).flatten(0, 1)
        output = self.step.run(images, "-1,1", "input")
        previews = (output.images.float() / 2 + 0.5).clamp(0, 1)
        sure = (output.scores[:, self.step.level.index] >= self.threshold) & output.verifiable
        stop = sure.view(-1, frames).any(dim=1).all()
        return EarlyCheckOutput(previews, output.scores, stop)


def decoder_for(pipe: Any, decoder: nn.Module | None) -> LatentDecoder | None:
    """``decoder``, else the pipeline's own VAE, as a :class:`LatentDecoder`; ``None`` without
    either."""
    autoencoder = decoder if decoder is not None else getattr(pipe, "vae", None)
    if autoencoder is None or not callable(getattr(autoencoder, "decode", None)):
        return None
    return LatentDecoder(autoencoder)
