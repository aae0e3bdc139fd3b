"""Loading: Hub-format and timm-format folders, the Hub cache, dtypes, data config, and errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models._hub import save_for_hf  # public in timm.models only from later 1.0.x

from nsfw_guard import NSFWDetector
from nsfw_guard.model import LABELS, default_dtype, load_model
from nsfw_guard.testing import ARCHITECTURE, TINY_MODEL_ARGS, make_checkpoint


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_make_checkpoint_writes_the_hub_timm_wrapper_format(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "timm_wrapper"
    assert config["architectures"] == ["TimmWrapperForImageClassification"]
    assert config["architecture"] == ARCHITECTURE
    assert config["num_classes"] == 4
    assert config["label_names"] == list(LABELS)
    assert config["pretrained_cfg"]["crop_mode"] == "squash"
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    keys = load_file(tiny_checkpoint / "model.safetensors").keys()
    assert all(key.startswith("timm_model.") for key in keys)


def test_hub_format_folder_loads_into_a_timm_eva(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    assert isinstance(loaded.model, timm.models.Eva)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.architecture == ARCHITECTURE
    assert loaded.model_args == TINY_MODEL_ARGS
    weights = load_file(tiny_checkpoint / "model.safetensors")
    torch.testing.assert_close(loaded.model.head.bias, weights["timm_model.head.bias"])


def test_timm_format_folder_loads_with_the_same_outputs(tmp_path):
    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=4, **TINY_MODEL_ARGS)
    model.eval()
    # timm's exporter also writes num_classes into model_args, which transformers rejects alone.
    save_for_hf(
        model,
        tmp_path,
        model_config={"label_names": list(LABELS)},
        model_args={**TINY_MODEL_ARGS, "num_classes": 4},
        safe_serialization=True,
    )
    assert not any(k.startswith("timm_model.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    pixels = torch.randn(2, 3, 448, 448)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(pixels), model(pixels))


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    folder = make_checkpoint(tmp_path, dtype=torch.bfloat16)
    stored = load_file(folder / "model.safetensors")
    assert stored["timm_model.head.weight"].dtype == torch.bfloat16
    detector = NSFWDetector.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert detector.dtype == torch.float32
    assert detector.model.head.weight.dtype == torch.float32
    torch.testing.assert_close(
        detector.model.head.weight, stored["timm_model.head.weight"].float(), rtol=0, atol=0
    )
    as_bf16 = NSFWDetector.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert as_bf16.scores(torch.rand(3, 64, 64)).dtype == torch.float32


def test_default_dtype_is_bf16_only_where_bf16_is_native(tiny_checkpoint):
    # Capping oneDNN at AVX2 makes bf16 emulated (slow) even on a CPU with bf16 instructions.
    code = (
        "import torch; from nsfw_guard import NSFWDetector; "
        f"print(NSFWDetector({str(tiny_checkpoint)!r}, device='cpu').dtype)"
    )
    capped = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=capped, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "torch.float32"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    expected = torch.bfloat16 if native else torch.float32
    assert default_dtype("cpu") == expected
    assert NSFWDetector(str(tiny_checkpoint), device="cpu").dtype == expected


def test_hub_id_loads_from_the_cache_with_a_pinned_revision(tiny_checkpoint, tmp_path):
    commit = "15b85477e4fd2000db76ae9aae0f89a72f95e2e3"
    repo = tmp_path / "models--Freepik--nsfw_image_detector"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for revision in (None, commit):
        detector = NSFWDetector.from_pretrained(
            "Freepik/nsfw_image_detector",
            revision=revision,
            cache_dir=tmp_path,
            local_files_only=True,
            device="cpu",
        )
        assert detector.scores(torch.rand(3, 32, 32)).shape == (1, 4)


def test_uncached_hub_id_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(OSError, match="not in the Hugging Face cache.*hf download Org/model"):
        load_model("Org/model", cache_dir=tmp_path, local_files_only=True, device="cpu")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at .*Hub id"):
        load_model(tmp_path / "nowhere" / "model", device="cpu")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_model("./relative/missing", device="cpu")


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path, device="cpu")


def test_pickle_only_folder_is_refused(tmp_path):
    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=4, **TINY_MODEL_ARGS)
    save_for_hf(
        model,
        tmp_path,
        model_config={"label_names": list(LABELS)},
        model_args=TINY_MODEL_ARGS,
        safe_serialization=False,
    )
    assert (tmp_path / "pytorch_model.bin").is_file()
    with pytest.raises(
        FileNotFoundError, match="only pickle weights.*pytorch_model.bin.*safetensors"
    ):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize(
    "changes",
    [
        {"num_classes": 3, "label_names": ["neutral", "low", "high"]},
        {"label_names": ["safe", "low", "medium", "high"]},
        {"label_names": ["high", "medium", "low", "neutral"]},
        {"label_names": None, "num_classes": 1000},
    ],
)
def test_classifier_without_the_four_levels_is_refused(tmp_path, tiny_checkpoint, changes):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match="needs exactly the four labels"):
        load_model(folder, device="cpu")


def test_unknown_architecture_is_refused(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    _edit_config(folder, architecture="not_a_model")
    with pytest.raises(ValueError, match="timm .* does not know"):
        load_model(folder, device="cpu")


def test_data_config_comes_from_the_checkpoint(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    custom = {**config["pretrained_cfg"], "mean": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
    _edit_config(folder, pretrained_cfg=custom)
    data = load_model(folder, device="cpu").data_config
    assert data.mean == (0.5, 0.5, 0.5)
    assert data.interpolation == "bilinear"
    assert data.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))


def test_data_config_falls_back_to_timm_for_the_architecture(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    _edit_config(folder, pretrained_cfg=None)
    data = load_model(folder, device="cpu").data_config
    assert data.input_size == (448, 448)
    assert data.crop_mode == "squash"
    assert data.interpolation == "bicubic"
    assert data.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_cuda_device_without_cuda_is_a_clear_error(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available here"):
        load_model(tiny_checkpoint, device="cuda")


def test_unusable_device_is_a_clear_error(tiny_checkpoint):
    # A device type this torch build or machine lacks: mps off macOS, or a GPU index past the
    # last one.
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "mps"
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ValueError, match=f"device='{device}' cannot be used here"):
        load_model(tiny_checkpoint, device=device)


def test_bad_dtype_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ValueError, match="expected a torch float dtype"):
        load_model(tiny_checkpoint, device="cpu", dtype=torch.int8)
