import pytest
import torch

from nsfw_guard import NSFWLevel
from nsfw_guard.levels import cumulative_scores, levels_from_scores, mark_unverifiable


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
