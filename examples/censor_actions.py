"""Render what each censor action does to one photo: docs/censor-actions.jpg.

python examples/censor_actions.py [photo] [--out docs/censor-actions.jpg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nsfw_guard import censor

ROOT = Path(__file__).parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photo", nargs="?", type=Path, default=ROOT / "tests/data/astronaut.jpg")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/censor-actions.jpg")
    parser.add_argument("--size", type=int, default=256, help="side of each tile")
    args = parser.parse_args()

    photo = Image.open(args.photo).convert("RGB").resize((args.size, args.size))
    images = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255
    flagged = torch.tensor([True])
    tiles = [images] + [censor.apply(images, flagged, a) for a in ("blur", "pixelate", "blank")]
    row = torch.cat(tiles, dim=3)[0].clamp(0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((row * 255).round().byte().permute(1, 2, 0).numpy()).save(args.out, quality=85)
    print(f"wrote {args.out}: none (flag only) | blur | pixelate | blank")


if __name__ == "__main__":
    main()
