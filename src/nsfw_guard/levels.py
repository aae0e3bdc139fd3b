"""The four NSFW levels and the pure tensor functions that turn logits into level scores."""

from __future__ import annotations

import numbers
from enum import Enum

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "WORST_SCORES",
    "NSFWLevel",
    "check_threshold",
    "cumulative_scores",
    "levels_from_scores",
    "mark_unverifiable",
    "parse_check_level",
]


WORST_SCORES = (0.0, 1.0, 1.0, 1.0)
"""The scores of an image that could not be checked: the worst case (see
:func:`mark_unverifiable`)."""


class NSFWLevel(str, Enum):
    """The model's four levels, ordered ``NEUTRAL < LOW < MEDIUM < HIGH``.

    Members are strings (``NSFWLevel.MEDIUM == "medium"``), so dictionaries keyed by levels
    answer plain-string lookups too.

    Example:
        >>> NSFWLevel.parse("Medium") is NSFWLevel.MEDIUM
        True
        >>> NSFWLevel.parse(3) > NSFWLevel.LOW
        True
    """

    NEUTRAL = "neutral"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def index(self) -> int:
        """The class index of this level in the model's output (0 … 3)."""
        return _ORDER.index(self)

    @classmethod
    def parse(cls, value: NSFWLevel | str | int) -> NSFWLevel:
        """Return the level named by ``value``: a member, its name in any case, or its index."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for level in _ORDER:
                if level.value == key:
                    return level
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(_ORDER):
            return _ORDER[value]
        valid = ", ".join(f"{level.value!r} ({level.index})" for level in _ORDER)
        raise ValueError(f"{value!r} is not an NSFW level; valid levels are {valid}.")

    @classmethod
    def _missing_(cls, value: object) -> NSFWLevel:
        """``NSFWLevel("HIGH")`` and ``NSFWLevel(3)`` parse as :meth:`parse` does."""
        return cls.parse(value)  # type: ignore[arg-type]

    def __lt__(self, other: object) -> bool:
        return self.index < NSFWLevel.parse(other).index  # type: ignore[arg-type]

    def __le__(self, other: object) -> bool:
        return self.index <= NSFWLevel.parse(other).index  # type: ignore[arg-type]

    def __gt__(self, other: object) -> bool:
        return self.index > NSFWLevel.parse(other).index  # type: ignore[arg-type]

    def __ge__(self, other: object) -> bool:
        return self.index >= NSFWLevel.parse(other).index  # type: ignore[arg-type]

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


_ORDER = tuple(NSFWLevel)


def cumulative_scores(logits: Tensor) -> Tensor:
    """Turn ``[B, 4]`` logits into the model card's scores, in float32.

    Column 0 is P(neutral); columns 1-3 are P(level >= low / medium / high), the sums of the
    softmax probabilities from that level up.

    Example:
        >>> cumulative_scores(torch.tensor([[0.0, 0.0, 0.0, 0.0]]))
        tensor([[0.2500, 0.7500, 0.5000, 0.2500]])
    """
    probs = torch.softmax(logits.float(), dim=-1)
    at_least = probs.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([probs[:, :1], at_least[:, 1:]], dim=-1)


def mark_unverifiable(scores: Tensor, verifiable: Tensor) -> Tensor:
    """Give every row where ``verifiable`` is false (or whose scores are NaN) the worst case.

    Such images score 0 for neutral and 1 for low, medium and high, decided in-graph.

    Example:
        >>> scores = torch.tensor([[0.5, 0.5, 0.25, 0.0], [0.5, 0.5, 0.25, 0.0]])
        >>> mark_unverifiable(scores, torch.tensor([True, False])).tolist()
        [[0.5, 0.5, 0.25, 0.0], [0.0, 1.0, 1.0, 1.0]]
    """
    # Built on the device from the scores themselves: no host-to-device copy per call.
    worst = torch.cat([torch.zeros_like(scores[:, :1]), torch.ones_like(scores[:, 1:])], dim=1)
    ok = verifiable & ~scores.isnan().any(dim=-1)
    return torch.where(ok[:, None], scores, worst)


def levels_from_scores(scores: Tensor, threshold: float | Tensor) -> Tensor:
    """Per image, the index of the highest level whose score is ``>= threshold`` (0 if none);
    a ``[B, 1]`` tensor of thresholds gives each image its own.

    Example:
        >>> levels_from_scores(torch.tensor([[0.1, 0.9, 0.6, 0.2]]), 0.5)
        tensor([2])
    """
    return (scores[:, 1:] >= threshold).sum(dim=-1)


def parse_check_level(level: NSFWLevel | str | int, name: str = "level") -> NSFWLevel:
    """The level to check at: low, medium or high (every image is at least neutral).

    ``name`` is the argument's name, for the error message.

    Example:
        >>> parse_check_level("HIGH")
        <NSFWLevel.HIGH: 'high'>
    """
    try:
        parsed = NSFWLevel.parse(level)
    except ValueError:
        parsed = None
    if parsed is None or parsed is NSFWLevel.NEUTRAL:
        why = ": every image is at least neutral" if parsed is NSFWLevel.NEUTRAL else ""
        raise ValueError(
            f"{name} must be 'low', 'medium' or 'high' (or 1, 2, 3), not {level!r}{why}."
        )
    return parsed


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in [0, 1], or a ValueError.

    Real numbers are accepted, numpy and torch scalars (and one-element arrays) included; bools,
    strings, NaN and several-element arrays are not.

    Example:
        >>> check_threshold(1), check_threshold(np.float32(0.25)), check_threshold(torch.tensor(1))
        (1.0, 0.25, 1.0)
    """
    value = threshold
    if isinstance(value, np.ndarray | Tensor) and _size(value) == 1:
        value = value.item()  # a Python bool, int, float or complex
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= value <= 1.0  # also false for NaN
    ):
        raise ValueError(f"threshold={threshold!r}: expected a number in [0, 1].")
    return float(value)


def _size(array: np.ndarray | Tensor) -> int:
    return array.numel() if isinstance(array, Tensor) else array.size
