"""Tiny random-weight diffusers pipelines of many kinds, built offline, for the guard's tests.

``make_pipeline(kind, folder)`` returns a real pipeline class with tiny models and the keyword
arguments of a call that makes two images (one video of two frames for ``video``) in a fraction
of a second on a CPU. ``sd``, ``sd-img2img`` and ``sdxl`` are
:func:`nsfw_guard.testing.make_tiny_pipeline`; the inpainting, upscaling and video kinds reuse its
components. The T5 kinds (IF, SD3, Flux, PixArt) put its offline CLIP tokenizer in front of a tiny
``T5EncoderModel``: their pipelines only need token ids from it. ``kandinsky22`` is a pipeline
with neither a safety checker nor an image processor; ``sd-image-variation`` one that frees its
model hooks before it postprocesses; ``prx-pixel`` one with no VAE, whose "latent" and "pt"
outputs are its images in [-1, 1].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)

from nsfw_guard.testing import _tiny_tokenizer, make_tiny_pipeline

_PROMPT = "a photo of a cat"
_TWO_IMAGES = {"prompt": _PROMPT, "num_images_per_prompt": 2, "num_inference_steps": 2}
"""The call arguments most kinds share: two images of one prompt, two denoising steps."""

_T5_DIM = 16
_EMBED_DIM = 16  # Kandinsky's image embeddings


def _image(size: int, batch: int = 1) -> torch.Tensor:
    """Seeded random RGB images ``[batch, 3, size, size]`` in [0, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _mask(size: int) -> torch.Tensor:
    """An inpainting mask ``[1, 1, size, size]``: the central square is repainted."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : -size // 4, size // 4 : -size // 4] = 1.0
    return mask


def _clip(model_class: type[PreTrainedModel] = CLIPTextModel) -> PreTrainedModel:
    """A tiny CLIP text encoder (or ``CLIPTextModelWithProjection``), 8 wide."""
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        vocab_size=1000,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=8,
    )
    return model_class(config)


def _t5() -> T5EncoderModel:
    """A tiny T5 encoder whose embeddings are ``_T5_DIM`` wide."""
    config = T5Config(
        vocab_size=1000,
        d_model=_T5_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config)


def _vae(blocks: int = 2, **config: Any) -> AutoencoderKL:
    """A tiny VAE with 4 latent channels that scales images down by ``2 ** (blocks - 1)``."""
    return AutoencoderKL(
        block_out_channels=[4, 8, 8][:blocks],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        norm_num_groups=2,
        **config,
    )


def _inpaint_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """``unet`` widened to the inpainting input: latents, mask and masked-image latents (9)."""
    return UNet2DConditionModel.from_config({**unet.config, "in_channels": 9})


def _sd(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Text to image."""
    return make_tiny_pipeline("sd", folder), _TWO_IMAGES


def _sd_safe(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Safe Latent Diffusion: the ``sd`` components, and a ``run_safety_checker`` that takes one
    more argument and returns the unsafe images too."""
    components = make_tiny_pipeline("sd", folder).components
    names = inspect.signature(diffusers.StableDiffusionPipelineSafe.__init__).parameters
    components = {name: value for name, value in components.items() if name in names}
    pipe = diffusers.StableDiffusionPipelineSafe(**components, requires_safety_checker=False)
    return pipe, _TWO_IMAGES


def _sd_img2img(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Two prompts and two initial images: more outputs than initial images is deprecated."""
    kwargs = {"prompt": [_PROMPT] * 2, "image": _image(64, 2), "num_inference_steps": 2}
    return make_tiny_pipeline("sd-img2img", folder), kwargs


def _sd_inpaint(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """The ``sd`` components with a 9-channel UNet."""
    components = make_tiny_pipeline("sd", folder).components
    components["unet"] = _inpaint_unet(components["unet"])
    pipe = diffusers.StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    return pipe, {**_TWO_IMAGES, "image": _image(64), "mask_image": _mask(64)}


def _sd_upscale(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """The x4 upscaler: a 16x16 image in, 64x64 images out."""
    sd = make_tiny_pipeline("sd", folder)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=7,  # latents and the noised low-resolution image
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        cross_attention_dim=8,
        num_class_embeds=1000,  # the noise level
    )
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=_vae(blocks=3, scaling_factor=0.08333),  # 16x16 latents decode to 64x64
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
    )
    return pipe, {**_TWO_IMAGES, "image": _image(16)}


def _if(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """DeepFloyd IF stage I: a pixel-space UNet, no VAE, no safety checker or watermarker."""
    unet = UNet2DConditionModel(
        sample_size=64,
        layers_per_block=1,
        block_out_channels=(4, 8),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=3,
        out_channels=6,  # the noise and the learned variance of each pixel channel
        norm_num_groups=2,
        cross_attention_dim=32,  # divisible by the 32 groups of cross_attention_norm
        encoder_hid_dim=_T5_DIM,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    scheduler = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        variance_type="learned_range",
    )
    pipe = diffusers.IFPipeline(
        tokenizer=_tiny_tokenizer(folder),
        text_encoder=_t5(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    return pipe, {**_TWO_IMAGES, "clean_caption": False}


def _sdxl(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Text to image with two CLIP text encoders."""
    return make_tiny_pipeline("sdxl", folder), _TWO_IMAGES


def _sdxl_inpaint(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """The ``sdxl`` components with a 9-channel UNet."""
    components = make_tiny_pipeline("sdxl", folder).components
    components["unet"] = _inpaint_unet(components["unet"])
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**components)
    return pipe, {**_TWO_IMAGES, "image": _image(64), "mask_image": _mask(64)}


def _sd3(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """An MMDiT with two CLIP encoders and a T5 encoder."""
    tokenizer = _tiny_tokenizer(folder)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,  # the attention width, 2 heads x 8
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=16,  # both CLIP projections
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(CLIPTextModelWithProjection),
        tokenizer=tokenizer,
        text_encoder_2=_clip(CLIPTextModelWithProjection),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5(),
        tokenizer_3=tokenizer,
    )
    return pipe, _TWO_IMAGES


def _flux(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """A CLIP and a T5 encoder; the call sets 64x64, as Flux's default size is fixed (1024)."""
    tokenizer = _tiny_tokenizer(folder)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=8,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = diffusers.FluxPipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(),
        tokenizer=tokenizer,
        text_encoder_2=_t5(),
        tokenizer_2=tokenizer,
    )
    return pipe, {**_TWO_IMAGES, "height": 64, "width": 64, "max_sequence_length": 16}


def _flux_kontext(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Flux Kontext with the ``flux`` models: edits a 64x64 image into 64x48 ones (its size
    comes from ``max_area`` and the aspect ratio asked for, not as given)."""
    flux, _ = _flux(folder)
    pipe = diffusers.FluxKontextPipeline(**flux.components)
    image = Image.fromarray((_image(64)[0].permute(1, 2, 0) * 255).byte().numpy())
    size = {"height": 48, "width": 64, "max_area": 64 * 48, "_auto_resize": False}
    return pipe, {**_TWO_IMAGES, **size, "image": image, "max_sequence_length": 16}


def _wan(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Wan 2.1 text to video (flow matching, a causal 3-D VAE): one video of 5 frames."""
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=_T5_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    pipe = diffusers.WanPipeline(
        tokenizer=_tiny_tokenizer(folder),
        text_encoder=_t5(),
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),  # Wan's own
    )
    call = {"prompt": _PROMPT, "num_frames": 5, "height": 32, "width": 32}
    return pipe, {**call, "num_inference_steps": 2, "max_sequence_length": 16}


def _cogvideox(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """CogVideoX text to video (latents frames first, v-prediction DDIM with an SNR shift): one
    video of 8 frames."""
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=_T5_DIM,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = diffusers.AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=_tiny_tokenizer(folder),
        text_encoder=_t5(),
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.CogVideoXDDIMScheduler(prediction_type="v_prediction"),
    )
    call = {"prompt": _PROMPT, "num_frames": 8, "height": 16, "width": 16}
    return pipe, {**call, "num_inference_steps": 2, "max_sequence_length": 16}


def _ltx(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """LTX-Video (its latents packed into video tokens; its VAE's latent mean and std are
    buffers): one video of 9 frames."""
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=_T5_DIM,
    )
    blocks = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": (1, 1, 1, 1, 1)}
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=8,
        **blocks,
        **{f"decoder_{name}": value for name, value in blocks.items()},  # else a full decoder
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        patch_size=1,
        patch_size_t=1,
    )
    with torch.no_grad():  # a mean and spread of its own, so that undoing them is tested
        vae.latents_mean.uniform_(-0.5, 0.5)
        vae.latents_std.uniform_(0.5, 1.5)
    pipe = diffusers.LTXPipeline(
        tokenizer=_tiny_tokenizer(folder),
        text_encoder=_t5(),
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )
    call = {"prompt": _PROMPT, "num_frames": 9, "height": 32, "width": 32}
    return pipe, {**call, "num_inference_steps": 2, "max_sequence_length": 16}


def _pixart(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """A DiT on T5 embeddings; resolution binning would change the size to a trained one."""
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=32,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=_T5_DIM,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,  # the noise and the learned variance
    )
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=_tiny_tokenizer(folder),
        text_encoder=_t5(),
        vae=_vae(),
        transformer=transformer,
        scheduler=diffusers.DDIMScheduler(),
    )
    kwargs = {**_TWO_IMAGES, "clean_caption": False, "use_resolution_binning": False}
    return pipe, kwargs


def _video(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """ModelScope text to video with the ``sd`` CLIP and VAE: one video of two frames."""
    sd = make_tiny_pipeline("sd", folder)
    unet = diffusers.UNet3DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    pipe = diffusers.TextToVideoSDPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False),
    )
    return pipe, {"prompt": _PROMPT, "num_frames": 2, "num_inference_steps": 2}


def _ddpm(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Unconditional pixel-space diffusion: no text, no ``folder`` needed."""
    unet = diffusers.UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
    )
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    return pipe, {"batch_size": 2, "num_inference_steps": 2}


def _prx_pixel(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Pixel-space flow matching with no VAE: "latent" and "pt" are its images in [-1, 1]."""
    transformer = diffusers.PRXTransformer2DModel(
        in_channels=3,
        patch_size=2,
        context_in_dim=8,
        hidden_size=16,
        mlp_ratio=1.0,
        num_heads=2,
        depth=1,
        axes_dim=[4, 4],
    ).eval()
    pipe = diffusers.PRXPixelPipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        text_encoder=None,
        tokenizer=None,
        default_sample_size=64,
    )
    inputs = {
        "prompt_embeds": torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0)),
        "guidance_scale": 1.0,
        "height": 64,
        "width": 64,
        "use_resolution_binning": False,
    }
    return pipe, {**inputs, "num_images_per_prompt": 2, "num_inference_steps": 2}


def _kandinsky22(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Kandinsky 2.2's decoder: image embeddings in, a MoVQ decoder out, no image processor."""
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # mean and variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(8, 16),
        layers_per_block=1,
        encoder_hid_dim=_EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=8,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=4,
    )
    movq = diffusers.VQModel(
        block_out_channels=[32, 32],  # its spatial norms have 32 groups
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    pipe = diffusers.KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    embeds = torch.randn(2, 1, _EMBED_DIM, generator=torch.Generator().manual_seed(0))
    kwargs = {"image_embeds": embeds[0], "negative_image_embeds": embeds[1]}
    sizes = {"height": 64, "width": 64}
    return pipe, {**kwargs, **sizes, "num_images_per_prompt": 2, "num_inference_steps": 2}


def _sd_image_variation(folder: Path) -> tuple[DiffusionPipeline, dict]:
    """SD conditioned on a CLIP image embedding; it frees its model hooks before postprocessing."""
    sd = make_tiny_pipeline("sd", folder)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=32,
            patch_size=8,
            projection_dim=8,  # the UNet's cross-attention width
        )
    )
    pipe = diffusers.StableDiffusionImageVariationPipeline(
        vae=sd.vae,
        image_encoder=encoder,
        unet=sd.unet,
        scheduler=sd.scheduler,
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
        requires_safety_checker=False,
    )
    # A PIL image, which its feature extractor resizes for the encoder (tensors go in as they are).
    image = Image.fromarray((_image(64)[0].permute(1, 2, 0) * 255).byte().numpy())
    return pipe, {"image": image, "num_images_per_prompt": 2, "num_inference_steps": 2}


_BUILDERS: dict[str, Callable[[Path], tuple[DiffusionPipeline, dict]]] = {
    "sd": _sd,
    "sd-safe": _sd_safe,
    "sd-img2img": _sd_img2img,
    "sd-inpaint": _sd_inpaint,
    "sd-upscale": _sd_upscale,
    "if": _if,
    "sdxl": _sdxl,
    "sdxl-inpaint": _sdxl_inpaint,
    "sd3": _sd3,
    "flux": _flux,
    "flux-kontext": _flux_kontext,
    "wan": _wan,
    "cogvideox": _cogvideox,
    "ltx": _ltx,
    "pixart": _pixart,
    "video": _video,
    "ddpm": _ddpm,
    "prx-pixel": _prx_pixel,
    "kandinsky22": _kandinsky22,
    "sd-image-variation": _sd_image_variation,
}
KINDS: tuple[str, ...] = tuple(_BUILDERS)
_NEWER = {
    "wan": "WanPipeline",
    "flux-kontext": "FluxKontextPipeline",
    "prx-pixel": "PRXPixelPipeline",
}
"""Kinds whose pipeline came after the lowest diffusers that pyproject.toml allows (0.32)."""


def make_pipeline(kind: str, folder: Path) -> tuple[DiffusionPipeline, dict]:
    """Return ``(pipe, call_kwargs)``: a tiny random-weight pipeline of ``kind`` and its call.

    ``pipe(**call_kwargs, output_type=..., generator=...)`` makes two images (``video``: one
    video of two frames) of 64x64 pixels. The weights depend only on ``kind``, the models are in
    eval mode and the global RNG is left untouched. Tokenizer files are written to ``folder``.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}.")
    needs = _NEWER.get(kind)
    if needs is not None and not hasattr(diffusers, needs):  # the lowest diffusers allowed
        pytest.skip(f"diffusers {diffusers.__version__} has no {needs}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe, kwargs = _BUILDERS[kind](folder)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained leaves them: T5's dropout would make runs differ
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(kwargs)
