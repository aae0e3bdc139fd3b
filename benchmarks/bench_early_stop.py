"""Early-stop benchmark: what one check while denoising costs, what stopping saves, and (with real
weights) how well early verdicts agree with final ones.

    python benchmarks/bench_early_stop.py                      # cost + calls, random weights
    python benchmarks/bench_early_stop.py --efficacy --prompts prompts.txt \\
        --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --decoder madebyollin/taesd \\
        --checker Freepik/nsfw_image_detector

- **cost**: one early check (decode the x0 estimate + classify with the full-size classifier)
  against one denoiser step, with random-weight models of real sizes, for one image or video:
  Stable Diffusion 1.5 and SDXL (UNet, VAE and TAESD, the ``AutoencoderTiny`` architecture; a
  step is a classifier-free-guidance batch of 2), Flux.1-dev (its transformer's width with 1
  double and 2 single blocks of its 19 and 38, timed and scaled by 19: the whole model does not
  fit in this machine's memory; its 16-channel VAE and TAEF1's architecture; guidance-distilled,
  a step is one call, the check unpacks the packed x0 first) and Wan 2.1 1.3B (its transformer
  and its causal 3-D VAE, whole; a step is two calls, with and without the prompt; the check
  decodes every frame of the video and classifies each). On a CPU at 512² (Wan: 17 frames of
  256²; SDXL's 1024² and Wan's 81 frames of 480x832 are too slow there); on CUDA at each
  model's own size (Wan: 33 frames of 480x832).
- **calls**: denoiser calls of a 30-step run that a forced-"high" classifier stops, for each
  ``at`` (tiny pipeline: the count, not the time, is the point).
- **efficacy** (``--efficacy``): for a pipeline id and a prompt file, per prompt the early
  verdicts at each ``at`` and the final verdict (early stop recording only, ``stop=False``), then
  precision/recall of early vs final and the GPU-seconds stopping would have saved.
  ``--pipeline tiny`` runs it end to end on random tiny models: the numbers mean nothing there,
  the mechanics are what it proves.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, measure, print_table, sync, write_json

from nsfw_guard import EarlyStop, guard
from nsfw_guard.check import CheckStep
from nsfw_guard.early_stop import EarlyCheck, LatentDecoder
from nsfw_guard.model import load_model
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import make_checkpoint, make_tiny_pipeline

SIZES = {
    # name: (UNet config, text width, native resolution)
    "sd15": (
        {"cross_attention_dim": 768, "attention_head_dim": 8},
        768,
        512,
    ),
    "sdxl": (
        {
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "use_linear_projection": True,
        },
        2048,
        1024,
    ),
}


def _random(module_class, device: torch.device, dtype: torch.dtype, **config):
    """A model of ``module_class`` with random weights, built without its slow initialisation."""
    with torch.device("meta"):
        module = module_class(**config)
    module = module.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    for buffer in module.buffers():  # not saved with the weights: rebuilt as zeros
        if buffer.is_floating_point():
            buffer.zero_()
    return module.to(dtype).eval()


MODELS = (*SIZES, "flux", "wan")
FLUX_BLOCKS = (1, 2)  # double and single blocks timed; Flux.1 has 19 and 38: scaled by 19


def bench_cost(
    names: list[str], checker: str, device: torch.device, resolution: int | None, repeats: int
):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(checker, device=device)
    step = CheckStep(NSFWScorer(loaded.model, loaded.data_config)).to(device)
    rows = []
    for name in names:
        native = {"flux": 1024, "wan": 480}.get(name) or SIZES[name][2]
        size = resolution or (native if device.type == "cuda" else {"wan": 256}.get(name, 512))
        row = {"flux": _flux_row, "wan": _wan_row}.get(name, _cost_row)
        rows.append(row(name, size, step, device, dtype, repeats))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _check_costs(row, decoders, latents, step, device, repeats, warmup, denoise) -> dict:
    """Decode and whole-check times of ``latents`` (as the VAE takes them) per decoder, and the
    check as a fraction of a denoiser step of ``denoise`` seconds."""
    row["denoiser_step_ms"] = denoise * 1e3
    for decoder_name, decoder in decoders:
        check = EarlyCheck(LatentDecoder(decoder), step, threshold=0.8)
        decode, _ = measure(lambda d=decoder: d.decode(latents), device, repeats, warmup)
        seconds, _ = measure(lambda c=check: c(latents), device, repeats, warmup)
        row[f"{decoder_name}_decode_ms"] = decode * 1e3
        row[f"check_{decoder_name}_ms"] = seconds * 1e3
        row[f"check_{decoder_name}_per_step"] = seconds / denoise
    return row


def _flux_row(name, size, step, device, dtype, repeats) -> dict:
    from diffusers import AutoencoderKL, AutoencoderTiny, FluxPipeline, FluxTransformer2DModel

    double, single = FLUX_BLOCKS
    transformer = _random(
        FluxTransformer2DModel,
        device,
        dtype,
        num_layers=double,
        num_single_layers=single,
        guidance_embeds=True,
    )  # Flux.1-dev's config otherwise: 3072 wide, 64 packed channels, 4096 text, 768 pooled
    vae = _random(
        AutoencoderKL,
        device,
        dtype,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    taef1 = _random(AutoencoderTiny, device, dtype, latent_channels=16)
    tokens, text_tokens = (size // 16) ** 2, 512
    packed = torch.randn(1, tokens, 64, device=device, dtype=dtype)
    ids = torch.zeros(tokens, 3, device=device, dtype=dtype)
    inputs = {
        "hidden_states": packed,
        "encoder_hidden_states": torch.randn(1, text_tokens, 4096, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, 768, device=device, dtype=dtype),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "img_ids": ids,
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }
    warmup = 1 if device.type == "cpu" else 3
    row = {"model": name, "resolution": f"{size}²", "dtype": str(dtype).removeprefix("torch.")}
    row["note"] = f"step: 1 call, {double}+{single} blocks timed x{19 // double}"
    with torch.inference_mode():
        seconds, _ = measure(lambda: transformer(**inputs), device, repeats, warmup)
        latents = FluxPipeline._unpack_latents(packed, size, size, 8)  # as the guard unpacks
        decoders = (("taesd", taef1), ("vae", vae))
        return _check_costs(row, decoders, latents, step, device, repeats, warmup, seconds * 19)


def _wan_row(name, size, step, device, dtype, repeats) -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    frames = 17 if device.type == "cpu" else 33
    width = size if device.type == "cpu" else size * 832 // 480
    transformer = _random(
        WanTransformer3DModel,
        device,
        dtype,
        num_attention_heads=12,
        attention_head_dim=128,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )  # Wan 2.1 T2V 1.3B
    vae = _random(
        AutoencoderKLWan,
        device,
        dtype,
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
    )
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, size // 8, width // 8, device=device)
    latents = latents.to(dtype)
    inputs = {
        "hidden_states": latents,
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device=device, dtype=dtype),
    }
    warmup = 1 if device.type == "cpu" else 3
    resolution = f"{frames}x{size}x{width}"
    row = {"model": name, "resolution": resolution, "dtype": str(dtype).removeprefix("torch.")}
    row["note"] = f"step: 2 calls (CFG); the check: all {frames} frames"
    with torch.inference_mode():
        seconds, _ = measure(lambda: transformer(**inputs), device, repeats, warmup)
        decoders = (("vae", vae),)  # no tiny decoder of Wan's latents in diffusers
        return _check_costs(row, decoders, latents, step, device, repeats, warmup, 2 * seconds)


def _cost_row(name, size, step, device, dtype, repeats) -> dict:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    unet_config, text_width, _ = SIZES[name]
    unet = _random(UNet2DConditionModel, device, dtype, **unet_config)
    vae = _random(
        AutoencoderKL,
        device,
        dtype,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    )
    taesd = _random(AutoencoderTiny, device, dtype)
    latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    text = torch.randn(2, 77, text_width, device=device, dtype=dtype)
    extra = {}
    if name == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device).to(dtype),
        }
    t = torch.tensor(500, device=device)
    warmup = 1 if device.type == "cpu" else 3
    row = {"model": name, "resolution": f"{size}²", "dtype": str(dtype).removeprefix("torch.")}
    row["note"] = "step: 1 call, CFG batch of 2"
    with torch.inference_mode():
        denoise, _ = measure(
            lambda: unet(latents, t, encoder_hidden_states=text, **extra), device, repeats, warmup
        )
        decoders = (("taesd", taesd), ("vae", vae))
        return _check_costs(row, decoders, latents[:1], step, device, repeats, warmup, denoise)


def bench_calls(steps: int = 30, ats=(0.1, 0.3, 0.5, 0.7)):
    with tempfile.TemporaryDirectory() as tmp:
        high = make_checkpoint(tmp, level="high")
        pipe = make_tiny_pipeline("sd")
        rows = []
        for at in ats:
            calls: list[int] = []
            handle = pipe.unet.register_forward_hook(lambda *_, calls=calls: calls.append(1))
            try:
                g = guard(pipe, model=high, early_stop=EarlyStop(at=(at,), threshold=0.5))
                pipe("a photo", num_inference_steps=steps, output_type="np")
            finally:
                handle.remove()
            rows.append(
                {
                    "at": at,
                    "steps": steps,
                    "denoiser_calls": len(calls),
                    "saved": 1 - len(calls) / steps,
                    "stopped_at": g.last[0].stopped_at,
                }
            )
    return rows


def bench_efficacy(args: argparse.Namespace, device: torch.device):
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.pipeline == "tiny":
            pipe = make_tiny_pipeline("sd")
            checker = args.checker or str(make_checkpoint(tmp, level=None))
        else:
            from diffusers import DiffusionPipeline

            dtype = torch.float16 if device.type == "cuda" else torch.float32
            pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype)
            checker = args.checker
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        decoder = None
        if args.decoder:
            from diffusers import AutoencoderTiny

            decoder = AutoencoderTiny.from_pretrained(args.decoder, torch_dtype=pipe.dtype)
        early = EarlyStop(at=args.at, threshold=args.threshold, decoder=decoder, stop=False)
        g = guard(pipe, model=checker, level=args.level, early_stop=early)
        per_prompt = []
        for prompt in prompts:
            sync(device)
            start = time.perf_counter()
            pipe(prompt, num_inference_steps=args.steps, output_type="np")
            sync(device)
            seconds = time.perf_counter() - start
            result = g.last[0]
            level = g.level
            per_prompt.append(
                {
                    "prompt": prompt,
                    "seconds": seconds,
                    "final_flagged": result.flagged,
                    "final_score": result.scores[level],
                    "early": {
                        str(step): scores[level] for step, scores in result.early_scores.items()
                    },
                }
            )
    steps_at = early.steps(args.steps)
    rows = []
    for step, fraction in steps_at.items():
        early_flags = [p["early"].get(str(step), 0.0) >= args.threshold for p in per_prompt]
        final = [p["final_flagged"] for p in per_prompt]
        true_positive = sum(e and f for e, f in zip(early_flags, final, strict=True))
        saved = sum(
            p["seconds"] * (args.steps - step - 1) / args.steps
            for p, e in zip(per_prompt, early_flags, strict=True)
            if e
        )
        rows.append(
            {
                "at": fraction,
                "step": step,
                "prompts": len(per_prompt),
                "final_flagged": sum(final),
                "early_flagged": sum(early_flags),
                "precision": true_positive / sum(early_flags) if any(early_flags) else None,
                "recall": true_positive / sum(final) if any(final) else None,
                "seconds_saved": saved,
                "seconds_total": sum(p["seconds"] for p in per_prompt),
            }
        )
    return rows, per_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checker", help="classifier: Hub id or folder (default: random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--resolution", type=int, help="image size for the cost rows")
    parser.add_argument("--repeats", type=int, help="timed repeats (default: 1 CPU, 10 CUDA)")
    parser.add_argument("--skip-cost", action="store_true", help="only the calls rows")
    parser.add_argument("--efficacy", action="store_true", help="the efficacy mode (see above)")
    parser.add_argument("--pipeline", default="tiny", help="efficacy: pipeline id, or 'tiny'")
    parser.add_argument("--prompts", type=Path, help="efficacy: a text file, one prompt a line")
    parser.add_argument("--decoder", help="efficacy: an AutoencoderTiny id (default: the VAE)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--at", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--level", default="medium")
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {"machine": machine(), "device": str(device)}
    if args.efficacy:
        if args.prompts is None:
            parser.error("--efficacy needs --prompts FILE")
        rows, per_prompt = bench_efficacy(args, device)
        results.update(pipeline=args.pipeline, efficacy=rows, per_prompt=per_prompt)
        print_table(f"Early vs final verdicts, {args.pipeline}, {args.steps} steps", rows)
        print(f"\nwrote {write_json('bench_early_stop_efficacy', results, args.output)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cost:
            checker = args.checker or str(make_checkpoint(tmp, size="full"))
            repeats = args.repeats or (10 if device.type == "cuda" else 1)
            results["cost"] = bench_cost(args.models, checker, device, args.resolution, repeats)
    results["calls"] = bench_calls()
    print(f"\nMachine: {json.dumps(results['machine'])}")
    print_table("One early check vs one denoiser step, one image or video", results.get("cost", []))
    print_table(
        "Denoiser calls of a 30-step run stopped by a forced-high classifier", results["calls"]
    )
    print(f"\nwrote {write_json('bench_early_stop', results, args.output)}")


if __name__ == "__main__":
    main()
