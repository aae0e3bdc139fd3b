"""Region maps: what the map costs on top of the scores, and whether it finds what was flagged.

    python benchmarks/bench_regions.py            # cost (tiny and full size) + localization
    python benchmarks/bench_regions.py --quick    # tiny only, a short training: mechanics only

- **cost**: extra ms per image of :meth:`NSFWScorer.classify_with_map` (the per-patch map from the
  same forward pass, upsampled to 512²) over :meth:`NSFWScorer.classify`, and of turning the map
  into a censor mask and blending it (:func:`region_alpha` + :func:`censor_regions`, 512²).
  Random weights of the real architecture, tiny and full size.
- **localization**: a tiny EVA02 (64² input, 8-pixel patches, one block) trained here on
  synthetic images, a magenta square on a random background = "high", none = "neutral" (image
  labels only, as the real model was trained), saved in the Hub's format and loaded by the real
  loader. Per held-out "high" image: does every patch the square covers (a quarter or more) score
  above every patch it does not touch? The fraction of images where it does is the figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, machine, measure, print_table, write_json
from safetensors.torch import save_file
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from nsfw_guard.censor import censor_regions, region_alpha
from nsfw_guard.model import load_model
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import make_checkpoint

TOY = {"img_size": 64, "patch_size": 8}
HIGH = 3


def cost_row(device: str, size: str, repeats: int) -> dict:
    folder = make_checkpoint(tempfile.mkdtemp(), size=size)
    loaded = load_model(folder, device=device)
    scorer = NSFWScorer(loaded.model, loaded.data_config).to(device)
    images = torch.rand(1, 3, 512, 512, device=device)
    pixels, ok = scorer.preprocess(images, "0,1")

    def plain():
        scorer.classify(pixels, ok)

    def with_map():
        _, patches = scorer.classify_with_map(pixels, ok)
        TF.resize(patches[:, HIGH, None], [512, 512], interpolation=InterpolationMode.BILINEAR)

    _, patches = scorer.classify_with_map(pixels, ok)

    def mask_and_blend():
        alpha = region_alpha(patches[:, HIGH, None], 0.5, (512, 512), feather=0.02)
        censor_regions(images, torch.zeros_like(images), alpha)

    with torch.inference_mode():
        base = measure(plain, device, repeats)[0]
        mapped = measure(with_map, device, repeats)[0]
        censor = measure(mask_and_blend, device, repeats)[0]
    return {
        "size": size,
        "device": device,
        "dtype": str(loaded.model.patch_embed.proj.weight.dtype).removeprefix("torch."),
        "scores_ms": base * 1e3,
        "scores_and_map_ms": mapped * 1e3,
        "map_extra_ms": (mapped - base) * 1e3,
        "mask_and_blend_ms": censor * 1e3,
    }


def toy_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` 64² images in [0, 1] and their square masks (all false for "neutral" ones)."""
    images = torch.rand(count, 3, 1, 1, generator=generator) * 0.8 + 0.1
    images = (images + 0.1 * torch.rand(count, 3, 64, 64, generator=generator)).clamp(0, 1)
    masks = torch.zeros(count, 1, 64, 64, dtype=torch.bool)
    for index in range(0, count, 2):  # every other image is "high"
        side = int(torch.randint(10, 20, (1,), generator=generator))
        top, left = torch.randint(0, 64 - side, (2,), generator=generator).tolist()
        masks[index, :, top : top + side, left : left + side] = True
    magenta = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    return torch.where(masks, magenta, images), masks


def localization(steps: int) -> dict:
    folder = make_checkpoint(tempfile.mkdtemp(), model_args=TOY)
    loaded = load_model(folder, device="cpu", dtype=torch.float32)
    scorer = NSFWScorer(loaded.model, loaded.data_config)
    model = loaded.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        images, masks = toy_images(32, generator)
        labels = masks.flatten(1).any(dim=1).long() * HIGH
        pixels, _ = scorer.preprocess(images, "0,1")
        loss = F.cross_entropy(model(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    weights = {f"timm_model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, Path(folder) / "model.safetensors", metadata={"format": "pt"})
    trained = load_model(folder, device="cpu", dtype=torch.float32)  # the real loader
    scorer = NSFWScorer(trained.model, trained.data_config)
    images, masks = toy_images(200, torch.Generator().manual_seed(1))
    with torch.inference_mode():
        scores, patches = scorer.classify_with_map(*scorer.preprocess(images, "0,1"))
    high = masks.flatten(1).any(dim=1)
    cover = F.avg_pool2d(masks.float(), TOY["patch_size"])[:, 0]
    patch_high = patches[:, HIGH]
    found = [
        bool(patch_high[i][cover[i] >= 0.25].min() > patch_high[i][cover[i] == 0].max())
        for i in high.nonzero()[:, 0].tolist()
    ]
    return {
        "map": "cam (fc_norm + head per patch token)",
        "train_steps": steps,
        "train_s": seconds,
        "accuracy": float(((scores[:, HIGH] >= 0.5) == high).float().mean()),
        "high_images": len(found),
        "localized_fraction": sum(found) / len(found),
        "square_patch_mean": float(patch_high[cover >= 0.25].mean()),
        "background_patch_mean_high_images": float(patch_high[high][cover[high] == 0].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny only, a short training")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the toy model")
    parser.add_argument("--output", type=Path, help="JSON path (default: results/standalone/)")
    args = parser.parse_args()
    sizes = ["tiny"] if args.quick else ["tiny", "full"]
    cost = [cost_row(args.device, size, 1 if args.quick else 5) for size in sizes]
    print_table("Region map cost, batch 1, 512² input", cost)
    found = localization(10 if args.quick else args.steps)
    print_table("Does the map find the square? (toy EVA02, image labels only)", [found])
    results = {"machine": machine(), "cost": cost, "localization": found}
    output = args.output
    if output is None:
        info = results["machine"]
        slug = (info["gpu"] or f"cpu-{info['cpu_cores']}-cores").lower().replace(" ", "-")
        output = RESULTS / "standalone" / f"regions-{slug}.json"
    print(f"\nwrote {write_json('bench_regions', results, output)}")


if __name__ == "__main__":
    main()
