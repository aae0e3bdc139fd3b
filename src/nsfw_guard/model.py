"""Loading the 4-level classifier: Hub id or folder → timm model + data config.

Checkpoints come in transformers' ``timm_wrapper`` format (what the Hub holds: ``config.json`` with
``architecture``, ``label_names`` and ``pretrained_cfg``, weights prefixed ``timm_model.``) or in
timm's own format (the same config, unprefixed weights). Weights load only from safetensors, and
no remote code is run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
from transformers.utils import logging as hf_logging

from . import DEFAULT_MODEL
from .levels import NSFWLevel
from .preprocess import DataConfig

__all__ = [
    "ARCHITECTURE",
    "LoadedModel",
    "default_device",
    "default_dtype",
    "load_model",
    "resolve_folder",
]

LABELS = tuple(level.value for level in NSFWLevel)
ARCHITECTURE = "eva02_base_patch14_448"
"""The timm architecture of ``Freepik/nsfw_image_detector``."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded classifier: the timm model (eval mode, no grad), its data config and its recipe."""

    model: nn.Module
    data_config: DataConfig
    architecture: str
    model_args: dict[str, Any]
    source: str


def default_device() -> torch.device:
    """CUDA when available, else CPU.

    Example:
        >>> default_device().type in ("cuda", "cpu")
        True
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where it is fast, float32 elsewhere.

    The model was trained in bf16, and bf16 halves its memory. On CUDA devices with bf16 and on
    CPUs with native bf16 instructions (AVX512-BF16 or AMX) it is also the fast choice: 3x faster
    than float32 on an AMX CPU here, 2.2x on an AVX512-BF16 one. On other CPUs bf16 is emulated and
    several times slower (6.4x on an AVX2 CPU), so float32 is the default there. Scores are
    computed in float32 whatever the model dtype.

    Example:
        >>> default_dtype("cpu") in (torch.bfloat16, torch.float32)
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        # Native bf16 from Ampere on (and on ROCm). Not torch.cuda.is_bf16_supported(): it
        # reports emulated bf16 as supported and looks at the current device, not this one.
        native = torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else torch.float32
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls with native instructions (not emulation) on this CPU."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in some torch builds
        return False


def load_model(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load the 4-level classifier from a Hub id or a local folder.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.testing import make_checkpoint
        >>> folder = make_checkpoint(tempfile.mkdtemp())
        >>> loaded = load_model(folder, device="cpu")
        >>> loaded.data_config.input_size
        (448, 448)
    """
    device = _check_device(device)
    dtype = dtype if dtype is not None else default_dtype(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a torch float dtype such as torch.float32.")
    folder = resolve_folder(model, revision, local_files_only, cache_dir)
    config_dict = _read_config(folder)
    _check_weights(folder)

    model_args = {k: v for k, v in (config_dict.get("model_args") or {}).items()}
    # timm's save_for_hf also writes num_classes into model_args, which transformers rejects.
    model_args.pop("num_classes", None)
    config_dict = {**config_dict, "model_args": model_args or None}
    config = TimmWrapperConfig.from_dict(config_dict)
    with quiet_transformers():
        wrapper = TimmWrapperForImageClassification.from_pretrained(
            folder, config=config, dtype=dtype, use_safetensors=True, local_files_only=True
        )
    timm_model = wrapper.timm_model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    pretrained_cfg = {**timm_model.pretrained_cfg, **(config_dict.get("pretrained_cfg") or {})}
    return LoadedModel(
        model=timm_model,
        data_config=DataConfig.from_pretrained_cfg(pretrained_cfg),
        architecture=config_dict["architecture"],
        model_args=model_args,
        source=str(model),
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-file progress bars for a moment, restoring the user's setting."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} but CUDA is not available here; pass device='cpu', or None "
            "to pick CUDA when it is available."
        )
    if device.type == "meta":
        raise ValueError(
            "device='meta' holds no data, so it cannot run the model; pass 'cpu' or 'cuda'."
        )
    try:  # a device this torch build or machine lacks (mps, a missing GPU index, ...)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        # torch's own message can run to thousands of characters: its first sentence says why.
        why = str(error).strip().splitlines()[0].split(". ")[0][:160] if str(error).strip() else ""
        raise ValueError(
            f"device={str(device)!r} cannot be used here ({why}); pass 'cpu', 'cuda', "
            "'cuda:N' for a GPU that exists, or None for the default."
        ) from None
    return device


def resolve_folder(
    model: str | os.PathLike,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local folder of a checkpoint: ``model`` itself, or its Hub snapshot (downloaded once).

    Only JSON and safetensors files are fetched. Raises FileNotFoundError for a missing folder and
    OSError, saying what to do, when a Hub id cannot be had.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.testing import make_checkpoint
        >>> folder = make_checkpoint(tempfile.mkdtemp())
        >>> resolve_folder(folder) == folder
        True
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(model)
    if path.exists() or not _REPO_ID.match(name):
        raise FileNotFoundError(
            f"no model folder at {name!r}. Pass a folder holding config.json and "
            f"model.safetensors, or a Hub id such as {DEFAULT_MODEL!r}."
        )
    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
                allow_patterns=["*.json", "*.safetensors"],
            )
        )
    except LocalEntryNotFoundError as error:
        raise OSError(
            f"{name!r} is not in the Hugging Face cache and the Hub cannot be reached "
            f"(offline, or local_files_only=True). Download it once with "
            f"`hf download {name}` (or huggingface_hub.snapshot_download), or pass the path of "
            f"a local folder holding config.json and model.safetensors."
        ) from error
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise OSError(
            f"{name!r} is not a Hub model you can access. Check the id, log in with "
            f"`hf auth login` for a private repo, or pass a local folder."
        ) from error
    except RevisionNotFoundError as error:
        raise OSError(f"{name!r} has no revision {revision!r}.") from error


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; expected a timm_wrapper or timm checkpoint folder "
            "(config.json + model.safetensors), such as a download of "
            f"{DEFAULT_MODEL!r}."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ValueError(
            f"{config_path} names no timm architecture; expected a timm_wrapper or timm config "
            "with an 'architecture' key (such as 'eva02_base_patch14_448')."
        )
    if not timm.is_model(config["architecture"].split(".")[0]):
        raise ValueError(
            f"{config_path} names architecture {config['architecture']!r}, which timm "
            f"{timm.__version__} does not know. Upgrade timm or check the checkpoint."
        )
    labels = _labels(config)
    if labels is None or [str(label).lower() for label in labels] != list(LABELS):
        raise ValueError(
            f"{config_path} describes a classifier with labels {labels!r}; nsfw-guard needs "
            f"exactly the four labels {list(LABELS)} in that order."
        )
    return config


def _labels(config: dict[str, Any]) -> list[Any] | None:
    """The label names in class order; ``None`` when the config gives neither names nor a count."""
    if config.get("label_names") is not None:
        return list(config["label_names"])
    if isinstance(config.get("id2label"), dict):
        id2label = config["id2label"]
        return [id2label[key] for key in sorted(id2label, key=int)]
    count = config.get("num_classes", config.get("num_labels"))
    if isinstance(count, int):
        # A count without names: the classes are taken to be the four levels in order.
        return list(LABELS) if count == len(LABELS) else [f"class_{i}" for i in range(count)]
    return None


def _check_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise FileNotFoundError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). nsfw-guard loads weights "
            "only from safetensors, since unpickling can run arbitrary code. Convert them once "
            "in a trusted environment, e.g. `safetensors.torch.save_file(state_dict, "
            "'model.safetensors')`, or use the Hub's safetensors release."
        )
    raise FileNotFoundError(f"{folder} has no model.safetensors weights.")
