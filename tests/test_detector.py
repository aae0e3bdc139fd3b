"""NSFWDetector end to end: parity with the model card, seed-compatible calls, predictions."""

from contextlib import ExitStack

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config

from nsfw_guard import NSFWDetector, NSFWLevel, Prediction
from nsfw_guard.testing import make_checkpoint

from .conftest import PHOTO_PATHS

LEVELS = ("neutral", "low", "medium", "high")


def _card_reference_scores(detector, images) -> torch.Tensor:
    """The model card's path: timm's create_transform on PIL, softmax, cumulative sums."""
    transform = create_transform(
        **resolve_data_config(pretrained_cfg=detector.model.pretrained_cfg)
    )
    with torch.inference_mode():
        inputs = torch.stack([transform(image) for image in images])
        probs = torch.exp(F.log_softmax(detector.model(inputs.to(detector.dtype)).float(), dim=-1))
    at_least = probs.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([probs[:, :1], at_least[:, 1:]], dim=1)


def test_scores_match_the_model_card_reference_on_real_photos(detector, rgb_photos):
    reference = _card_reference_scores(detector, rgb_photos)
    ours = detector.scores(rgb_photos)
    # The sharpened head spreads scores far from uniform, with both verdicts at 0.5 in some
    # column and a different score row per photo, so this is a real comparison.
    levels = reference[:, 1:]
    assert (levels.amax(dim=0) - levels.amin(dim=0)).max() > 0.5
    verdicts = levels >= 0.5
    assert (verdicts.any(dim=0) & ~verdicts.all(dim=0)).any()
    assert len({tuple(row) for row in reference.round(decimals=2).tolist()}) == len(rgb_photos)
    # uint8 photos are resized as uint8, as PIL does: max 1.5e-4 here (a float resize: 6.9e-4).
    assert (ours - reference).abs().max() <= 5e-4
    for column in (1, 2, 3):
        assert (ours[:, column] >= 0.5).tolist() == (reference[:, column] >= 0.5).tolist()


def test_scores_are_float32_on_the_device_and_consistent(detector, rgb_photos):
    scores = detector.scores(rgb_photos)
    assert scores.dtype == torch.float32
    assert scores.device == detector.device
    assert scores.shape == (len(rgb_photos), 4)
    torch.testing.assert_close(scores[:, 0] + scores[:, 1], torch.ones(len(rgb_photos)))


def test_model_card_snippet_runs_unchanged(sharp_checkpoint, rgb_photos, tmp_path):
    path = tmp_path / "your_image.jpg"
    rgb_photos[0].save(path)
    # The card's code, with the import swapped, a local checkpoint and the CPU (no GPU here).
    from nsfw_guard import NSFWDetector

    detector = NSFWDetector(str(sharp_checkpoint), dtype=torch.bfloat16, device="cpu")
    image = Image.open(path)
    is_nsfw = detector.is_nsfw(image, "medium")
    probabilities = detector.predict_proba(image)
    print(f"Is NSFW: {is_nsfw}")
    print(f"Probabilities: {probabilities}")

    assert isinstance(is_nsfw, bool)
    assert isinstance(probabilities, list) and len(probabilities) == 1
    assert set(probabilities[0]) == set(NSFWLevel)
    assert all(isinstance(v, float) for v in probabilities[0].values())
    assert is_nsfw == (probabilities[0][NSFWLevel.MEDIUM] >= 0.5)


def test_seed_package_calls_work(detector, rgb_photos):
    image = rgb_photos[1]
    proba = detector.predict_proba(image)[0]
    assert proba["medium"] == proba[NSFWLevel.MEDIUM]
    assert detector.is_nsfw(image, threshold_level=NSFWLevel.LOW) == (proba["low"] >= 0.5)
    assert detector.is_nsfw(image, threshold_level="high", threshold=0.2) == (proba["high"] >= 0.2)
    assert detector(image, NSFWLevel.MEDIUM, 0.5) == (proba["medium"] >= 0.5)
    flags = detector.is_nsfw(rgb_photos, "medium")
    assert isinstance(flags, list) and len(flags) == len(rgb_photos)
    assert flags == [p["medium"] >= 0.5 for p in detector.predict_proba(rgb_photos)]


def test_scores_keep_float32_precision_in_bf16(sharp_checkpoint, rgb_photos):
    bf16 = NSFWDetector(str(sharp_checkpoint), device="cpu", dtype=torch.bfloat16)
    values = [v for row in bf16.predict_proba(rgb_photos) for v in row.values()]
    # bf16 holds 8 significant bits; float32 scores are not confined to that grid.
    on_bf16_grid = [v == float(torch.tensor(v).bfloat16()) for v in values]
    assert not all(on_bf16_grid)


def test_is_nsfw_threshold_is_inclusive_and_validated(detector, rgb_photos):
    score = detector.predict_proba(rgb_photos[2])[0]["medium"]
    assert detector.is_nsfw(rgb_photos[2], "medium", threshold=score) is True
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="expected a number in \\[0, 1\\]"):
            detector.is_nsfw(rgb_photos[2], "medium", threshold=bad)
    with pytest.raises(ValueError, match="must be 'low', 'medium' or 'high'"):
        detector.is_nsfw(rgb_photos[2], NSFWLevel.NEUTRAL)
    with pytest.raises(ValueError, match="must be 'low', 'medium' or 'high' .*not 'severe'"):
        detector.is_nsfw(rgb_photos[2], "severe")
    with pytest.raises(TypeError, match="not both"):
        detector.is_nsfw(rgb_photos[2], "low", threshold_level="high")


def test_numpy_and_torch_thresholds_work(detector, rgb_photos):
    score = detector.predict_proba(rgb_photos[2])[0]["medium"]
    assert 0 < score < 1
    # The score is a float32 value, so each of these is exactly it (inclusive: NSFW).
    for threshold in (np.float32(score), np.float64(score), torch.tensor(score)):
        assert detector.is_nsfw(rgb_photos[2], "medium", threshold) is True
        assert detector.predict(rgb_photos[2], threshold)[0].is_nsfw is True
    assert detector.is_nsfw(rgb_photos[2], "medium", np.int64(1)) is False
    with pytest.raises(ValueError, match="threshold=array\\(\\[0.5, 0.5\\]\\): expected a number"):
        detector.is_nsfw(rgb_photos[2], "medium", np.array([0.5, 0.5]))


def test_bad_levels_are_errors_not_the_default(level_checkpoints, rgb_photos):
    detector = NSFWDetector.from_pretrained(level_checkpoints["medium"], device="cpu")
    for bad in (0, "", "neutral", False, "0"):
        with pytest.raises(ValueError, match="^threshold_level must be 'low', 'medium' or 'high'"):
            detector.is_nsfw(rgb_photos[0], threshold_level=bad)
        with pytest.raises(ValueError, match="^level must be 'low', 'medium' or 'high'"):
            detector.is_nsfw(rgb_photos[0], bad)
    # Only None means the detector's level (medium, which this checkpoint always reaches).
    assert detector.is_nsfw(rgb_photos[0], None, threshold_level=None) is True


@pytest.mark.parametrize("forced", LEVELS)
def test_predict_reports_the_forced_level(level_checkpoints, forced, rgb_photos):
    detector = NSFWDetector.from_pretrained(level_checkpoints[forced], device="cpu")
    predictions = detector.predict(rgb_photos[:3])
    index = LEVELS.index(forced)
    for prediction in predictions:
        assert isinstance(prediction, Prediction)
        assert prediction.level is NSFWLevel(forced)
        expected = [1.0 if index == 0 else 0.0] + [1.0 if index >= i else 0.0 for i in (1, 2, 3)]
        assert list(prediction.scores.values()) == pytest.approx(expected, abs=1e-6)
        assert prediction.is_nsfw is (index >= 2)  # the default level is medium


def test_predict_uses_the_configured_level_and_threshold(level_checkpoints, rgb_photos):
    low = level_checkpoints["low"]
    strict = NSFWDetector.from_pretrained(low, device="cpu", level="low")
    assert [p.is_nsfw for p in strict.predict(rgb_photos[:2])] == [True, True]
    lenient = NSFWDetector.from_pretrained(low, device="cpu", level="high")
    assert [p.is_nsfw for p in lenient.predict(rgb_photos[:2])] == [False, False]
    assert strict.is_nsfw(rgb_photos[0]) is True
    assert lenient.is_nsfw(rgb_photos[0]) is False
    with pytest.raises(ValueError, match="must be 'low', 'medium' or 'high'"):
        NSFWDetector.from_pretrained(low, device="cpu", level="neutral")


def test_predict_level_is_highest_level_over_threshold(detector, rgb_photos):
    scores = detector.scores(rgb_photos)
    for threshold in (0.3, 0.5, 0.9):
        predictions = detector.predict(rgb_photos, threshold=threshold)
        for prediction, row in zip(predictions, scores.tolist(), strict=True):
            over = [i for i in (1, 2, 3) if row[i] >= threshold]
            assert prediction.level.index == (max(over) if over else 0)
            assert prediction.is_nsfw == (row[2] >= threshold)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_micro_batches_give_the_same_scores(sharp_checkpoint, detector, rgb_photos, batch_size):
    small = NSFWDetector.from_pretrained(
        sharp_checkpoint, device="cpu", dtype=torch.float32, batch_size=batch_size
    )
    expected = detector.scores(rgb_photos)
    torch.testing.assert_close(small.scores(rgb_photos), expected, atol=1e-5, rtol=0)
    batch = torch.rand(7, 3, 40, 56)
    torch.testing.assert_close(small.scores(batch), detector.scores(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["scores", "preprocess"])  # predict and is_nsfw use scores
def test_lists_are_converted_one_image_at_a_time(sharp_checkpoint, method):
    detector = NSFWDetector.from_pretrained(
        sharp_checkpoint, device="cpu", dtype=torch.float32, batch_size=2
    )
    with ExitStack() as stack:
        # Opened, not yet decoded: a file is decoded (and its tile list emptied) when converted.
        images = [stack.enter_context(Image.open(path)) for path in PHOTO_PATHS]
        assert len(images) == 7 and all(image.tile for image in images)
        # Real hooks: how many images were decoded at each preprocessing and forward pass.
        counts: dict[str, list[int]] = {"preprocess": [], "model": []}
        for name, module in (("preprocess", detector.scorer.preprocess), ("model", detector.model)):
            hook = module.register_forward_pre_hook(
                lambda *_, name=name: counts[name].append(sum(not im.tile for im in images))
            )
            stack.callback(hook.remove)
        getattr(detector, method)(images)
    assert counts["preprocess"] == [1, 2, 3, 4, 5, 6, 7]
    assert counts["model"] == ([] if method == "preprocess" else [2, 4, 6, 7])


def test_empty_inputs_give_empty_results(detector):
    assert detector.scores([]).shape == (0, 4)
    assert detector.predict_proba([]) == []
    assert detector.is_nsfw([]) == []
    assert detector.predict([]) == []
    assert detector.preprocess([]).shape == (0, 3, 448, 448)
    assert detector.scores(torch.zeros(0, 3, 8, 8)).shape == (0, 4)


def test_non_finite_images_score_worst_case_without_touching_others(detector):
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    alone = detector.scores(images[2:])
    images[0, 1, 10, 10] = float("nan")
    images[1, 0, 0, 0] = float("inf")
    scores = detector.scores(images)
    assert scores[:2].tolist() == [[0.0, 1.0, 1.0, 1.0]] * 2
    torch.testing.assert_close(scores[2:], alone)
    assert detector.is_nsfw(images, "high") == [True, True, alone[0, 3].item() >= 0.5]
    assert detector.predict(images[:1])[0].level is NSFWLevel.HIGH


def test_preprocess_returns_model_input_in_model_dtype(sharp_checkpoint):
    bf16 = NSFWDetector(str(sharp_checkpoint), device="cpu", dtype=torch.bfloat16)
    pixels = bf16.preprocess([torch.rand(3, 64, 64), Image.new("RGB", (90, 20))])
    assert pixels.shape == (2, 3, 448, 448)
    assert pixels.dtype == torch.bfloat16
    assert pixels.device == bf16.device


def test_bad_batch_size_is_a_clear_error(sharp_checkpoint):
    with pytest.raises(ValueError, match="batch_size=0"):
        NSFWDetector(str(sharp_checkpoint), device="cpu", batch_size=0)


@pytest.mark.full
def test_full_size_architecture_runs_and_matches_the_reference(tmp_path, rgb_photos):
    folder = make_checkpoint(tmp_path, size="full", dtype=torch.bfloat16)
    detector = NSFWDetector.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert sum(p.numel() for p in detector.model.parameters()) == 86_351_620
    image = rgb_photos[0]
    scores = detector.scores(image)
    assert scores.shape == (1, 4) and torch.isfinite(scores).all()
    reference = _card_reference_scores(detector, [image])
    assert (scores - reference).abs().max() <= 0.01
