from fractions import Fraction

import numpy as np
import pytest
import torch

from nsfw_guard import NSFWLevel
from nsfw_guard.levels import (
    check_threshold,
    cumulative_scores,
    levels_from_scores,
    mark_unverifiable,
    parse_check_level,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (NSFWLevel.LOW, NSFWLevel.LOW),
        ("medium", NSFWLevel.MEDIUM),
        ("HIGH", NSFWLevel.HIGH),
        (" Neutral ", NSFWLevel.NEUTRAL),
        (0, NSFWLevel.NEUTRAL),
        (3, NSFWLevel.HIGH),
    ],
)
def test_parse_accepts_member_string_and_index(value, expected):
    assert NSFWLevel.parse(value) is expected
    assert NSFWLevel(value) is expected  # the constructor parses the same way


@pytest.mark.parametrize("value", ["extreme", 4, -1, True, 1.0, None, ""])
def test_parse_rejects_anything_else_listing_valid_values(value):
    with pytest.raises(ValueError, match="valid levels are 'neutral' \\(0\\), 'low' \\(1\\)"):
        NSFWLevel.parse(value)
    with pytest.raises(ValueError, match="valid levels are 'neutral' \\(0\\), 'low' \\(1\\)"):
        NSFWLevel(value)


def test_levels_are_ordered_by_severity_not_alphabet():
    assert NSFWLevel.NEUTRAL < NSFWLevel.LOW < NSFWLevel.MEDIUM < NSFWLevel.HIGH
    assert sorted([NSFWLevel.HIGH, NSFWLevel.NEUTRAL, NSFWLevel.MEDIUM]) == [
        NSFWLevel.NEUTRAL,
        NSFWLevel.MEDIUM,
        NSFWLevel.HIGH,
    ]
    assert NSFWLevel.LOW < "high"  # alphabetically "high" < "low"
    assert NSFWLevel.HIGH >= 2
    assert max(NSFWLevel) is NSFWLevel.HIGH


def test_levels_are_strings_so_plain_keys_work():
    scores = {NSFWLevel.MEDIUM: 0.7}
    assert scores["medium"] == 0.7
    assert NSFWLevel.MEDIUM == "medium"
    assert str(NSFWLevel.HIGH) == "high"
    assert [level.index for level in NSFWLevel] == [0, 1, 2, 3]


def _card_reference(logits: torch.Tensor) -> list[dict[str, float]]:
    """The model card's loop: neutral = p0, others = sum of probabilities from that level up."""
    probs = torch.exp(torch.log_softmax(logits, dim=-1))
    labels = ["neutral", "low", "medium", "high"]
    out = []
    for row in probs:
        scores, running = {}, 0
        for j in range(len(row) - 1, -1, -1):
            running += row[j]
            if j == 0:
                running = row[j]
            scores[labels[j]] = running.item()
        out.append(scores)
    return out


def test_cumulative_scores_match_the_model_card():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3
    scores = cumulative_scores(logits)
    assert scores.dtype == torch.float32
    for row, reference in zip(scores.tolist(), _card_reference(logits), strict=True):
        assert row == pytest.approx([reference[k] for k in ("neutral", "low", "medium", "high")])
    # low >= medium >= high, and neutral + low == 1
    assert torch.all(scores[:, 1] >= scores[:, 2]) and torch.all(scores[:, 2] >= scores[:, 3])
    torch.testing.assert_close(scores[:, 0] + scores[:, 1], torch.ones(6))


def test_cumulative_scores_are_float32_for_bf16_logits():
    logits = torch.tensor([[0.0, 0.0, 0.1, 0.0]], dtype=torch.bfloat16)
    assert cumulative_scores(logits).dtype == torch.float32


def test_levels_from_scores_picks_highest_level_reaching_threshold():
    scores = torch.tensor(
        [[0.9, 0.1, 0.05, 0.01], [0.3, 0.7, 0.4, 0.1], [0.1, 0.9, 0.6, 0.2], [0.0, 1.0, 0.9, 0.5]]
    )
    assert levels_from_scores(scores, 0.5).tolist() == [0, 1, 2, 3]
    assert levels_from_scores(scores, 0.95).tolist() == [0, 0, 0, 1]


def test_mark_unverifiable_gives_worst_case_to_unverifiable_and_nan_rows():
    scores = torch.tensor([[0.9, 0.1, 0.05, 0.01], [0.9, 0.1, 0.05, 0.01], [float("nan")] * 4])
    marked = mark_unverifiable(scores, torch.tensor([True, False, True]))
    assert marked.tolist() == [pytest.approx([0.9, 0.1, 0.05, 0.01]), [0, 1, 1, 1], [0, 1, 1, 1]]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (0.5, 0.5),
        (np.float32(0.5), 0.5),
        (np.float64(0.25), 0.25),
        (np.float16(1.0), 1.0),
        (np.int64(1), 1.0),
        (np.uint8(0), 0.0),
        (np.array(0.5), 0.5),
        (np.array([0.5], np.float32), 0.5),
        (torch.tensor(0.5), 0.5),
        (torch.tensor([0.75], dtype=torch.bfloat16), 0.75),
        (torch.tensor(1), 1.0),
        (Fraction(1, 4), 0.25),
    ],
)
def test_check_threshold_accepts_real_scalars(value, expected):
    result = check_threshold(value)
    assert type(result) is float and result == expected


@pytest.mark.parametrize(
    "value",
    [
        -0.1,
        1.5,
        float("nan"),
        np.float32("nan"),
        np.float64(1.5),
        np.int64(2),
        torch.tensor(float("nan")),
        torch.tensor(-1.0),
        True,
        np.bool_(True),
        torch.tensor(True),
        "0.5",
        None,
        0.5j,
        np.complex64(0.5),
        np.array([0.5, 0.5]),
        torch.tensor([0.5, 0.5]),
        np.array([]),
        [0.5],
    ],
)
def test_check_threshold_rejects_anything_else(value):
    with pytest.raises(ValueError, match="^threshold=.*: expected a number in \\[0, 1\\]\\.$"):
        check_threshold(value)


@pytest.mark.parametrize("value", [0, "neutral", NSFWLevel.NEUTRAL, "", "severe", 4, None, True])
def test_parse_check_level_rejects_neutral_and_non_levels(value):
    with pytest.raises(ValueError, match="^threshold_level must be 'low', 'medium' or 'high'"):
        parse_check_level(value, "threshold_level")
    assert parse_check_level(" low ") is NSFWLevel.LOW and parse_check_level(3) is NSFWLevel.HIGH
