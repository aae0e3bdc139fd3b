"""NSFWSafetyChecker as a diffusers component: stock call contract, save/load, dtype policy."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nsfw_guard import NSFWDetector, NSFWSafetyChecker
from nsfw_guard.model import default_dtype

from .conftest import make_brightness_checkpoint


@pytest.fixture(scope="module")
def bright_folder(tmp_path_factory):
    return make_brightness_checkpoint(tmp_path_factory.mktemp("bright"), 0.0)


def _images() -> torch.Tensor:
    """[-1, 1] decoded images: dark, bright (unclamped, as VAEs give them)."""
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 0.4
    images[0] -= 0.9
    images[1] += 0.9
    return images


def test_stock_call_contract(bright_folder):
    checker = NSFWSafetyChecker.from_pretrained(bright_folder, action="blank")
    images = _images()
    out, flags = checker(images=images, clip_input=torch.zeros(2, 3, 224, 224))
    assert flags == [False, True] and all(isinstance(f, bool) for f in flags)
    assert torch.equal(out[0], images[0])  # unflagged: untouched, still in [-1, 1]
    assert out[1].eq(0).all()  # flagged: already in [0, 1] (black)


def test_stock_call_with_numpy_images(bright_folder):
    checker = NSFWSafetyChecker.from_pretrained(bright_folder, action="blank")
    images = (_images().permute(0, 2, 3, 1).numpy() * 0.5 + 0.5).clip(0, 1)
    out, flags = checker(images=images, clip_input=None)
    assert isinstance(out, np.ndarray) and out.shape == images.shape
    assert flags == [False, True]
    np.testing.assert_array_equal(out[0], images[0])
    assert (out[1] == 0).all()


def test_loads_the_hub_format_and_applies_settings(bright_folder):
    checker = NSFWSafetyChecker.from_pretrained(
        bright_folder, level="high", threshold=0.9, action="pixelate", pixelate_block_size=4
    )
    config = checker.config
    settings = (config.level, config.threshold, config.action, config.pixelate_block_size)
    assert settings == ("high", 0.9, "pixelate", 4)
    assert config.architecture == "eva02_base_patch14_448"
    assert config.model_args == {"depth": 1, "embed_dim": 32, "num_heads": 2}
    assert config.pretrained_cfg["crop_mode"] == "squash"
    assert checker.check_step.censor_params == {"block_size": 4}


def test_save_and_reload_round_trip(bright_folder, tmp_path):
    checker = NSFWSafetyChecker.from_pretrained(bright_folder, action="blur", threshold=0.6)
    checker.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nsfw_guard_safety_checker" and saved["threshold"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = NSFWSafetyChecker.from_pretrained(tmp_path)
    assert reloaded.config.action == "blur" and reloaded.config.threshold == 0.6
    images = _images()
    torch.testing.assert_close(reloaded(images=images)[0], checker(images=images)[0])
    overridden = NSFWSafetyChecker.from_pretrained(tmp_path, action="blank")
    assert overridden(images=images)[0][1].eq(0).all()


def test_keeps_its_own_dtype_whatever_the_pipeline_asks(bright_folder):
    checker = NSFWSafetyChecker.from_pretrained(bright_folder)
    assert checker.dtype == default_dtype("cpu")
    checker.to(torch.float16)
    checker.to("cpu", torch.float16)
    assert checker.dtype == default_dtype("cpu")
    pinned = NSFWSafetyChecker.from_pretrained(bright_folder, dtype="float32")
    assert pinned.to(torch.bfloat16).dtype == torch.float32
    # diffusers passes the pipeline's torch dtype on when it loads a component: not the checker's.
    loaded = NSFWSafetyChecker.from_pretrained(bright_folder, dtype=torch.float16)
    assert loaded.dtype == default_dtype("cpu")
    with pytest.raises(ValueError, match="dtype='int8'"):
        NSFWSafetyChecker.from_pretrained(bright_folder, dtype="int8")


def test_keep_on_ignores_moves_until_released(bright_folder):
    checker = NSFWSafetyChecker.from_pretrained(bright_folder)
    checker.keep_on("meta")  # a device that differs from the CPU, without a GPU
    checker.to("cpu")
    assert checker.device.type == "meta"
    checker.keep_on(None)
    checker.to_empty(device="cpu")
    assert checker.to("cpu").device.type == "cpu"


def test_callable_action_is_used_but_not_saved(bright_folder, tmp_path):
    checker = NSFWSafetyChecker.from_pretrained(bright_folder, action=lambda x: 1 - x)
    images = _images()
    out, _ = checker(images=images)
    torch.testing.assert_close(out[1], 1 - (images[1] * 0.5 + 0.5).clamp(0, 1))
    checker.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["action"] == "custom"
    with pytest.warns(UserWarning, match="custom \\(callable\\) action.*blanked instead"):
        reloaded = NSFWSafetyChecker.from_pretrained(tmp_path)
    assert reloaded(images=images)[0][1].eq(0).all()


def test_only_the_classifier_takes_the_checker_dtype(bright_folder):
    checker = NSFWSafetyChecker.from_pretrained(bright_folder, dtype="bfloat16").to("cpu")
    assert checker.dtype == torch.bfloat16
    preprocess = checker.check_step.scorer.preprocess
    assert {buffer.dtype for buffer in preprocess.buffers()} == {torch.float32}
    detector = NSFWDetector.from_pretrained(bright_folder, device="cpu", dtype=torch.bfloat16)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = detector.scores(images, value_range="-1,1")
    torch.testing.assert_close(checker.check(images).scores, expected, rtol=0, atol=0)


def test_a_checker_saved_by_nsfw_guard_0_1_loads(bright_folder, tmp_path):
    """0.1.0 saved the checker as a diffusers ModelMixin: its own config keys and weight file."""
    current = NSFWSafetyChecker.from_pretrained(bright_folder, action="blank", dtype="float32")
    config = current.config.to_dict()
    legacy = {key: config[key] for key in ("architecture", "model_args", "pretrained_cfg")}
    legacy.update(_class_name="NSFWSafetyChecker", _diffusers_version="0.32.0", level="low")
    legacy.update(threshold=0.5, action="blank", fill_color=[0, 0, 0], dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    # Its weights: the whole component's state dict (keys "check_step.scorer.model.*").
    weights = {k: v.contiguous() for k, v in current.state_dict().items()}
    assert all(key.startswith("check_step.scorer.model.") for key in weights)
    save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    reloaded = NSFWSafetyChecker.from_pretrained(tmp_path)
    assert (reloaded.config.level, reloaded.config.classifier_dtype) == ("low", "float32")
    images = _images()
    torch.testing.assert_close(reloaded.check(images).scores, current.check(images).scores)
