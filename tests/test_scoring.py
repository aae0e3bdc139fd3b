"""The scoring graph is exportable: no host sync, no Python branch on tensor values."""

import pytest
import torch

from nsfw_guard.model import load_model
from nsfw_guard.scoring import NSFWScorer

# Ops that read tensor values back to the host or make shapes depend on them.
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "item", "masked_select", "unique"}


def assert_no_host_sync(exported: torch.export.ExportedProgram) -> set[str]:
    """Assert the exported graph has no op that syncs with the host; return its ops' names."""
    ops = {
        node.target.__name__.split(".")[0]
        for node in exported.graph.nodes
        if node.op == "call_function" and hasattr(node.target, "__name__")
    }
    assert not ops & HOST_SYNC_OPS, ops & HOST_SYNC_OPS
    return ops


@pytest.fixture(scope="module")
def scorer(sharp_checkpoint) -> NSFWScorer:
    loaded = load_model(sharp_checkpoint, device="cpu", dtype=torch.float32)
    return NSFWScorer(loaded.model, loaded.data_config).eval()


@pytest.mark.parametrize(
    ("dtype", "value_range"),
    [(torch.float32, "auto"), (torch.float16, "-1,1"), (torch.uint8, "auto")],
)
def test_scorer_exports_without_host_sync(scorer, dtype, value_range):
    def sample():
        images = torch.rand(3, 3, 96, 128) * 2 - 1
        if dtype == torch.uint8:
            return ((images + 1) * 127.5).to(torch.uint8)
        images[1, 0, 4, 4] = float("nan")
        return images.to(dtype)

    exported = torch.export.export(scorer, (sample(),), kwargs={"value_range": value_range})
    ops = assert_no_host_sync(exported)
    assert "_upsample_bicubic2d_aa" in ops and "scaled_dot_product_attention" in ops

    images = sample()
    with torch.inference_mode():
        torch.testing.assert_close(
            exported.module()(images, value_range=value_range), scorer(images, value_range)
        )
    if dtype != torch.uint8:
        assert exported.module()(images, value_range=value_range)[1].tolist() == [0, 1, 1, 1]
