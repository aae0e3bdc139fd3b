"""nsfw-guard: an in-graph NSFW safety checker for diffusers, on the 4-level EVA02 classifier.

Names are imported on first use, so ``nsfw-guard --help`` does not wait for transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
DEFAULT_MODEL = "Freepik/nsfw_image_detector"

_EXPORTS = {
    "NSFWDetector": ".detector",
    "Prediction": ".detector",
    "NSFWLevel": ".levels",
    "EarlyStop": ".early_stop",
    "NSFWSafetyChecker": ".safety_checker",
    "Guard": ".pipelines",
    "GuardError": ".pipelines",
    "GuardResult": ".pipelines",
    "GuardWarning": ".pipelines",
    "guard": ".pipelines",
    "unguard": ".pipelines",
    "make_verdict": ".verdict_metadata",
    "read_verdict": ".verdict_metadata",
    "save_with_verdict": ".verdict_metadata",
}

__all__ = [*_EXPORTS, "DEFAULT_MODEL", "__version__"]

if TYPE_CHECKING:
    from .detector import NSFWDetector as NSFWDetector
    from .detector import Prediction as Prediction
    from .early_stop import EarlyStop as EarlyStop
    from .levels import NSFWLevel as NSFWLevel
    from .pipelines import Guard as Guard
    from .pipelines import GuardError as GuardError
    from .pipelines import GuardResult as GuardResult
    from .pipelines import GuardWarning as GuardWarning
    from .pipelines import guard as guard
    from .pipelines import unguard as unguard
    from .safety_checker import NSFWSafetyChecker as NSFWSafetyChecker
    from .verdict_metadata import make_verdict as make_verdict
    from .verdict_metadata import read_verdict as read_verdict
    from .verdict_metadata import save_with_verdict as save_with_verdict


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'nsfw_guard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
