"""Region maps: what the map costs on top of the scores, and whether it finds what was flagged.

    python benchmarks/bench_regions.py            # cost (tiny and full size) + localization
    python benchmarks/bench_regions.py --quick    # tiny only, a short training: mechanics only

- **cost**: extra ms per image of :meth:`NSFWScorer.classify_with_map` (the per-patch map from the
  same forward pass, upsampled to 512²) over :meth:`NSFWScorer.classify`, of turning the map
  into a censor mask and blending it (:func:`region_alpha` + :func:`censor_regions`, 512²), of
  the occlusion map ``action="regions"`` uses by default (4 x 4 cells hidden and shown alone,
  3 x 3 blocks hidden, the image and its mean: 43 forwards at the classifier's size), and of the
  whole regions step (the map, then 7 candidate sets of cells censored and rescored at 512²).
  Random weights of the real architecture, tiny and full size.
- **localization**: the toy EVA02 of :func:`make_square_checkpoint` (32² input, 8-pixel
  patches, one block) trained here on 64² synthetic images, a square on a random background =
  "high", none = "neutral" (image labels only, as the real model was trained), twice: a flat
  magenta square (a colour) and a magenta-and-green checkerboard (a texture),
  loaded by the real loader. Per held-out square image it flags: do all the cells holding a
  quarter of the square or more (and: all the cells it touches) score above every cell it does
  not touch (4 x 4 cells: the patch grid), for the patch map (cam) and the occlusion map? And
  ``action="regions"`` on the same images: how many are censored in regions rather than whole,
  against how many the whole-image blur itself clears (the most regions can), and how much of
  the image is censored (the default blur for the checkerboard; radius 0.25 for magenta, which
  the default blur leaves magenta).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, machine, measure, print_table, write_json
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from nsfw_guard.censor import DEFAULT_BLUR_RADIUS, blur, censor_regions, region_alpha
from nsfw_guard.check import CheckStep, region_sizes
from nsfw_guard.model import load_model
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import (
    SQUARE_PATTERNS,
    make_checkpoint,
    make_square_checkpoint,
    square_cells,
    square_images,
)

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

    def occlusion():
        scorer.occlusion_map(images, HIGH, cells=4)

    step = CheckStep(scorer, level="high", action="regions")

    def regions():
        step.censor_regions(images, ok)

    with torch.inference_mode():
        base = measure(plain, device, repeats)[0]
        mapped = measure(with_map, device, repeats)[0]
        censor = measure(mask_and_blend, device, repeats)[0]
        occluded = measure(occlusion, device, 1 if size == "full" else repeats)[0]
        regioned = measure(regions, device, 1 if size == "full" else repeats)[0]
    return {
        "size": size,
        "device": device,
        "dtype": str(loaded.model.patch_embed.proj.weight.dtype).removeprefix("torch."),
        "scores_ms": base * 1e3,
        "scores_and_map_ms": mapped * 1e3,
        "map_extra_ms": (mapped - base) * 1e3,
        "mask_and_blend_ms": censor * 1e3,
        "occlusion_map_4x4_ms": occluded * 1e3,
        "occlusion_forwards": 2 + 2 * 16 + 9,
        "regions_step_ms": regioned * 1e3,
        "regions_forwards": 2 + 2 * 16 + 9 + len(region_sizes(4)),
    }


def localization(steps: int, pattern: str) -> tuple[list[dict], dict]:
    folder = make_square_checkpoint(tempfile.mkdtemp(), steps=steps, pattern=pattern)
    trained = load_model(folder, device="cpu", dtype=torch.float32)  # the real loader
    scorer = NSFWScorer(trained.model, trained.data_config)
    images, masks = square_images(200, torch.Generator().manual_seed(1), pattern=pattern)
    with torch.inference_mode():
        scores, patches = scorer.classify_with_map(*scorer.preprocess(images, "0,1"))
        drops = scorer.occlusion_map(images, HIGH, cells=4)
    flagged = scores[:, HIGH] >= 0.5
    high = masks.flatten(1).any(dim=1)
    keep = flagged & high
    share, touched = square_cells(masks[keep], 4)
    rows = []
    for name, values in (("cam", patches[keep, HIGH]), ("occlusion", drops[keep, 0])):
        cells = list(zip(values, share, touched, strict=True))
        found = [bool(v[own >= 0.25].min() > v[~near].max()) for v, own, near in cells]
        every = [bool(v[near].min() > v[~near].max()) for v, _, near in cells]
        pairs = zip(values, touched, strict=True)
        top = [bool(near.flatten()[v.flatten().argmax()]) for v, near in pairs]
        rows.append(
            {
                "square": pattern,
                "map": name,
                "train_steps": steps,
                "accuracy": float((flagged == high).float().mean()),
                "flagged_square_images": len(found),
                "localized_fraction": sum(found) / max(1, len(found)),
                "every_touched_cell_fraction": sum(every) / max(1, len(every)),
                "top_cell_on_square": sum(top) / max(1, len(top)),
            }
        )
    radius = 0.25 if pattern == "magenta" else DEFAULT_BLUR_RADIUS
    regions = regions_selectivity(scorer, images[flagged], masks[flagged], radius)
    return rows, {"square": pattern, **regions}


def regions_selectivity(
    scorer: NSFWScorer, images: torch.Tensor, masks: torch.Tensor, radius: float
) -> dict:
    """``action="regions"`` (blurring with ``radius``) on flagged images: how many come back
    censored in regions, how many the whole-image blur clears at all, and the share of the
    image censored."""
    if len(images) == 0:  # a toy that flags nothing (--quick's short training)
        return {"blur_radius": radius, "flagged_images": 0, "censored_in_regions": 0}
    step = CheckStep(scorer, level="high", action="regions", censor_params={"radius": radius})
    with torch.inference_mode():
        output = step.run(images, value_range="0,1")
        whole = scorer(blur(images, radius=radius), "0,1")[:, HIGH]
    changed = (output.images != images).any(dim=1).flatten(1).float().mean(dim=1)
    in_regions = changed < 0.99
    return {
        "blur_radius": radius,
        "flagged_images": len(images),
        "whole_blur_clears": int((whole < 0.5).sum()),
        "censored_in_regions": int(in_regions.sum()),
        "censored_share_in_regions": float(changed[in_regions].mean()),
        "square_share": float(masks[in_regions].flatten(1).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny only, a short training")
    parser.add_argument(
        "--steps", type=int, help="training steps of the toy model (default: 400; --quick: 10)"
    )
    parser.add_argument("--output", type=Path, help="JSON path (default: results/standalone/)")
    args = parser.parse_args()
    sizes = ["tiny"] if args.quick else ["tiny", "full"]
    cost = [cost_row(args.device, size, 1 if args.quick else 5) for size in sizes]
    print_table("Region map cost, batch 1, 512² input", cost)
    steps = args.steps or (10 if args.quick else 400)
    found, selective = [], []
    for pattern in SQUARE_PATTERNS:
        rows, regions = localization(steps, pattern)
        found.extend(rows)
        selective.append(regions)
    print_table("Does the map find the square? (toy EVA02, image labels only)", found)
    print_table("action='regions' on the flagged toy images", selective)
    results = {"machine": machine(), "cost": cost, "localization": found, "regions": selective}
    output = args.output
    if output is None:
        info = results["machine"]
        slug = (info["gpu"] or f"cpu-{info['cpu_cores']}-cores").lower().replace(" ", "-")
        output = RESULTS / "standalone" / f"regions-{slug}.json"
    print(f"\nwrote {write_json('bench_regions', results, output)}")


if __name__ == "__main__":
    main()
