"""Testing integrations offline: random-weight checkpoints in the Hub's exact format."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from .levels import NSFWLevel
from .model import ARCHITECTURE, LABELS, quiet_transformers

__all__ = [
    "ARCHITECTURE",
    "SQUARE_PATTERNS",
    "TINY_MODEL_ARGS",
    "make_checkpoint",
    "make_square_checkpoint",
    "make_tiny_decoder",
    "make_tiny_pipeline",
    "square_cells",
    "square_images",
]

PRETRAINED_TAG = "mim_in22k_ft_in22k_in1k"
TINY_MODEL_ARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2}
"""The real EVA02 architecture and 448x448 input, with one narrow block (65k parameters)."""

_FORCED_LOGIT = 30.0


def make_checkpoint(
    path: str | os.PathLike,
    *,
    size: Literal["tiny", "full"] = "tiny",
    level: NSFWLevel | str | int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint in the Hub's ``timm_wrapper`` format and return its folder.

    ``tiny`` keeps the real architecture, input size and preprocessing with one narrow block;
    ``full`` is the real size (86M parameters). ``level`` forces that class to win for every input
    (head weights zero, a large bias), while the rest of the network still runs. The global RNG is
    left untouched. ``model_args`` override the architecture's (an ``img_size`` also sets the
    checkpoint's input size).

    Example:
        >>> import tempfile
        >>> from nsfw_guard import NSFWDetector
        >>> folder = make_checkpoint(tempfile.mkdtemp(), level="high")
        >>> NSFWDetector.from_pretrained(folder, device="cpu").is_nsfw(torch.rand(3, 64, 64))
        True
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size={size!r}: expected 'tiny' or 'full'.")
    pretrained_cfg = timm.models.get_pretrained_cfg(f"{ARCHITECTURE}.{PRETRAINED_TAG}").to_dict()
    pretrained_cfg.pop("num_classes", None)
    args = {**(TINY_MODEL_ARGS if size == "tiny" else {}), **(model_args or {})}
    if "img_size" in args:
        pretrained_cfg["input_size"] = [3, args["img_size"], args["img_size"]]
    config = TimmWrapperConfig(
        architecture=ARCHITECTURE,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        pretrained_cfg=pretrained_cfg,
        model_args=args or None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TimmWrapperForImageClassification(config).eval()
    if level is not None:
        head = model.timm_model.head
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[NSFWLevel.parse(level).index] = _FORCED_LOGIT
    folder = Path(path)
    with quiet_transformers():
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
    _prefix_weight_keys(folder / "model.safetensors")
    return folder


SQUARE_MODEL_ARGS = {"img_size": 32, "patch_size": 8}
"""The toy classifier of :func:`make_square_checkpoint`: 32² input, a 4 x 4 patch grid."""


SQUARE_PATTERNS = ("magenta", "checker")
"""What fills a toy square: flat magenta (a colour, which a blur keeps), or a checkerboard of
4-pixel magenta and green squares (a texture of grey mean colour, which a blur removes)."""


def square_images(
    count: int, generator: torch.Generator, size: int = 64, pattern: str = "magenta"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` toy images in [0, 1], every other one (from the first) with a square filled with
    ``pattern`` (see :data:`SQUARE_PATTERNS`; a sixth to a third of the side) on a random flat,
    slightly noisy background, and their ``[count, 1, size, size]`` square masks (all false for
    the others).

    Example:
        >>> images, masks = square_images(4, torch.Generator().manual_seed(0))
        >>> images.shape, masks.flatten(1).any(dim=1).tolist()
        (torch.Size([4, 3, 64, 64]), [True, False, True, False])
    """
    if pattern not in SQUARE_PATTERNS:
        raise ValueError(f"pattern={pattern!r}: expected one of {SQUARE_PATTERNS}.")
    images = torch.rand(count, 3, 1, 1, generator=generator) * 0.8 + 0.1
    images = (images + 0.1 * torch.rand(count, 3, size, size, generator=generator)).clamp(0, 1)
    masks = torch.zeros(count, 1, size, size, dtype=torch.bool)
    for index in range(0, count, 2):
        side = int(torch.randint(size // 6, size // 3, (1,), generator=generator))
        top, left = torch.randint(0, size - side, (2,), generator=generator).tolist()
        masks[index, :, top : top + side, left : left + side] = True
    fill = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    if pattern == "checker":
        rows, columns = torch.arange(size)[:, None] // 4, torch.arange(size)[None, :] // 4
        green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
        fill = torch.where((rows + columns) % 2 == 0, fill, green)
    return torch.where(masks, fill, images), masks


def square_cells(masks: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of ``[B, 1, H, W]`` square masks and cell of a ``cells x cells`` grid: the
    share of the square the cell holds, and whether it touches the square.

    Example:
        >>> masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
        >>> masks[..., :2, :3] = True
        >>> share, touched = square_cells(masks, 2)
        >>> (share * 3).round().tolist(), touched.tolist()
        ([[[2.0, 1.0], [0.0, 0.0]]], [[[True, True], [False, False]]])
    """
    size = masks.shape[-1]
    index = torch.arange(size) * cells // size
    cell_of_pixel = index[:, None] * cells + index[None, :]
    in_cell = cell_of_pixel == torch.arange(cells * cells)[:, None, None]
    hits = (masks[:, 0, None] & in_cell).flatten(2).sum(dim=2).float()
    share = hits / hits.sum(dim=1, keepdim=True)
    return share.view(-1, cells, cells), (hits > 0).view(-1, cells, cells)


def make_square_checkpoint(
    path: str | os.PathLike, steps: int = 400, seed: int = 0, pattern: str = "magenta"
) -> Path:
    """Train a toy EVA02 (:data:`SQUARE_MODEL_ARGS`, one narrow block) on
    :func:`square_images` of ``pattern`` with image labels only (a square: "high", none:
    "neutral") for ``steps`` steps of 32 images on the CPU (about 5 s), and write it in the
    Hub's format.

    A model that learned what to flag, for testing what region maps find; the global RNG is
    left untouched.
    """
    from .model import load_model
    from .scoring import NSFWScorer

    folder = make_checkpoint(path, model_args=SQUARE_MODEL_ARGS, seed=seed)
    loaded = load_model(folder, device="cpu", dtype=torch.float32)
    scorer = NSFWScorer(loaded.model, loaded.data_config)
    model = loaded.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only contend (30x slower on 2 busy cores)
    try:
        _train(model, scorer, optimizer, generator, steps, pattern)
    finally:
        torch.set_num_threads(threads)
    weights = {f"timm_model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _train(model, scorer, optimizer, generator: torch.Generator, steps: int, pattern: str) -> None:
    from torch.nn import functional as F

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator.initial_seed())
        for _ in range(steps):
            images, masks = square_images(32, generator, pattern=pattern)
            labels = masks.flatten(1).any(dim=1).long() * NSFWLevel.HIGH.index
            pixels, _ = scorer.preprocess(images, "0,1")
            loss = F.cross_entropy(model(pixels), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _prefix_weight_keys(file: Path, prefix: str = "timm_model.") -> None:
    """Give every weight key the Hub's ``timm_model.`` prefix.

    transformers 4.x saves TimmWrapper weights without it (timm's own layout); 5.x, like the Hub
    file, with it. Both load; this keeps the checkpoint the Hub's exact format on either.
    """
    weights = load_file(file)
    if all(key.startswith(prefix) for key in weights):
        return
    weights = {key if key.startswith(prefix) else prefix + key: v for key, v in weights.items()}
    save_file(weights, file, metadata={"format": "pt"})


def make_tiny_pipeline(
    kind: Literal["sd", "sd-img2img", "sdxl"] = "sd",
    folder: str | os.PathLike | None = None,
    seed: int = 0,
):
    """A tiny random-weight diffusers pipeline, built offline, that makes 64x64 images.

    ``sd`` is a ``StableDiffusionPipeline`` (it has a ``safety_checker`` slot, left empty),
    ``sd-img2img`` its img2img sibling, ``sdxl`` a ``StableDiffusionXLPipeline`` (no checker of
    its own). Its CLIP tokenizer files are written to ``folder`` (a temporary one if ``None``).

    Example:
        >>> pipe = make_tiny_pipeline("sdxl")
        >>> pipe("a prompt", num_inference_steps=2, output_type="np").images.shape
        (1, 64, 64, 3)
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    pipeline_class = {
        "sd": diffusers.StableDiffusionPipeline,
        "sd-img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "sdxl": diffusers.StableDiffusionXLPipeline,
    }.get(kind)
    if pipeline_class is None:
        raise ValueError(f"kind={kind!r}: expected 'sd', 'sd-img2img' or 'sdxl'.")
    xl = kind == "sdxl"
    tokenizer = _tiny_tokenizer(Path(folder) if folder else Path(tempfile.mkdtemp()))
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        vocab_size=1000,
        hidden_size=32 if xl else 8,
        intermediate_size=37 if xl else 16,
        num_attention_heads=4 if xl else 2,
        num_hidden_layers=2,
        projection_dim=32,
    )
    # SDXL's UNet also takes the pooled text embedding and the size/crop conditioning.
    xl_unet_args = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # 6 time ids x 8 + 32 pooled
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=2,
            cross_attention_dim=64 if xl else 8,
            **(xl_unet_args if xl else {}),
        )
        vae = diffusers.AutoencoderKL(
            block_out_channels=[4, 8],
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            norm_num_groups=2,
        )
        components = {
            "unet": unet,
            "vae": vae,
            "scheduler": diffusers.EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
            ),
            "text_encoder": CLIPTextModel(text_config),
            "tokenizer": tokenizer,
            "feature_extractor": None,
            "image_encoder": None,
        }
        if xl:
            components["text_encoder_2"] = CLIPTextModelWithProjection(text_config)
            components["tokenizer_2"] = tokenizer
        else:
            components.update(safety_checker=None, requires_safety_checker=False)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_decoder(latent_channels: int = 4, seed: int = 0):
    """A random-weight ``diffusers.AutoencoderTiny`` (the TAESD architecture), a few hundred
    parameters: it decodes ``[B, latent_channels, h, w]`` latents to ``[B, 3, 2h, 2w]`` images.

    Example:
        >>> make_tiny_decoder().decode(torch.randn(1, 4, 8, 8)).sample.shape
        torch.Size([1, 3, 16, 16])
    """
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = AutoencoderTiny(
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
            latent_channels=latent_channels,
        )
    return decoder.eval()


def _tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", *letters, *(f"{c}</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # Named, so transformers does not guess a class from the folder's name.
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)
