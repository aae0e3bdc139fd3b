"""Names the package's docstring examples use, so that ``pytest --doctest-modules`` runs them."""

import pytest
import torch

from nsfw_guard import NSFWDetector
from nsfw_guard.testing import make_checkpoint


@pytest.fixture(autouse=True, scope="session")
def _doctest_names(doctest_namespace, tmp_path_factory):
    doctest_namespace["torch"] = torch
    folder = make_checkpoint(tmp_path_factory.mktemp("doctest"), level="medium")
    doctest_namespace["detector"] = NSFWDetector.from_pretrained(folder, device="cpu")
