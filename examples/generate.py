"""Generate images with any diffusers text-to-image model, guarded by nsfw-guard.

Each image is censored per --level / --action and saved as a PNG whose metadata holds the
prompt and nsfw-guard's verdict (level, scores, flagged, action, model: see the README's
"Verdicts in image files"; `nsfw-guard check` shows it). Examples:

    python examples/generate.py "a lighthouse at dusk" "a bowl of fruit" \
        --model-id stabilityai/sdxl-turbo --steps 1 --guidance 0 --out outputs/
    python examples/generate.py "a cat" --level low --action pixelate --checker ./nsfw_detector
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image
from PIL.PngImagePlugin import PngInfo

from nsfw_guard import DEFAULT_MODEL, guard, make_verdict, save_with_verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="+", help="one image per prompt (x --per-prompt)")
    parser.add_argument("--model-id", default="stabilityai/sdxl-turbo", help="diffusers model")
    parser.add_argument("--checker", default=DEFAULT_MODEL, help="NSFW model: Hub id or folder")
    parser.add_argument("--level", default="medium", choices=["low", "medium", "high"])
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--action", default="blur", choices=["blur", "pixelate", "blank", "none"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale")
    parser.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(args.model_id, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    checker = guard(
        pipe, level=args.level, threshold=args.threshold, action=args.action, model=args.checker
    )

    extra = {} if args.guidance is None else {"guidance_scale": args.guidance}
    images = pipe(
        args.prompts,
        num_inference_steps=args.steps,
        num_images_per_prompt=args.per_prompt,
        generator=torch.Generator(device).manual_seed(args.seed),
        **extra,
    ).images

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in args.prompts for _ in range(args.per_prompt)]
    for index, (image, prompt, result) in enumerate(
        zip(images, prompts, checker.last, strict=True)
    ):
        verdict = make_verdict(
            model=args.checker,
            level=result.level,
            scores=result.scores,
            flagged=result.flagged,
            check_level=checker.level,
            threshold=checker.threshold,
            action=args.action if result.flagged else None,
            reason=result.reason,
        )
        text = PngInfo()
        text.add_text("prompt", prompt)
        path = args.out / f"{index:04d}.png"
        save_with_verdict(image, path, verdict, pnginfo=text)
        mark = "FLAGGED" if result.flagged else "ok"
        print(f"{path}\t{result.level.value}\t{mark}\t{prompt}")


if __name__ == "__main__":
    main()
