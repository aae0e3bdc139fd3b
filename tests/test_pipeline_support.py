"""Every pipeline class diffusers ships is either guarded (in one of three places) or refused at
``guard()`` time with a one-line reason, read from the class's own source."""

import inspect

import diffusers
import pytest
from diffusers import DiffusionPipeline

from nsfw_guard.pipeline_support import IMAGE_FIELDS, pipeline_support


def _pipeline_classes() -> list[type[DiffusionPipeline]]:
    classes = []
    for name in dir(diffusers):
        if not name.endswith("Pipeline"):
            continue
        try:
            value = getattr(diffusers, name)
        except Exception:  # an optional dependency diffusers could not import
            continue
        if inspect.isclass(value) and issubclass(value, DiffusionPipeline):
            classes.append(value)
    return [cls for cls in classes if cls is not DiffusionPipeline]


def test_every_diffusers_pipeline_is_guarded_or_refused_with_a_reason():
    classes = _pipeline_classes()
    assert len(classes) > 150  # 171 in diffusers 0.32, 289 in 0.42
    refused = {}
    for cls in classes:
        support = pipeline_support(cls)
        if support.refused:
            refused[cls.__name__] = support.refused
            assert "\n" not in support.refused
        elif support.output_fields is not None:
            # Guarded: its output has a field of images, which the guarded __call__ checks.
            assert any(field in IMAGE_FIELDS for field in support.output_fields), cls
    assert refused["DanceDiffusionPipeline"] == "it returns audios, not images"
    assert refused["KandinskyPriorPipeline"].startswith("it returns image_embeds")
    assert refused["MarigoldDepthPipeline"].startswith("it returns prediction")
    assert "RGB and depth" in refused["StableDiffusionLDM3DPipeline"]
    if hasattr(diffusers, "LTX2HDRPipeline"):  # newer than the lowest diffusers allowed
        assert refused["LTX2HDRPipeline"].startswith("it returns linear HDR frames")
    images = {"StableDiffusionPipeline", "FluxPipeline", "IFPipeline", "DDPMPipeline"}
    assert not images & refused.keys()


@pytest.mark.parametrize(
    ("name", "values", "slot", "pt_range"),
    [
        ("StableDiffusionPipeline", 2, True, "auto"),
        ("StableDiffusionInpaintPipeline", 2, True, "auto"),
        ("StableDiffusionControlNetPipeline", 2, True, "auto"),
        ("StableDiffusionUpscalePipeline", 3, False, "auto"),  # returns (images, nsfw, watermark)
        ("IFPipeline", 3, False, "-1,1"),
        ("IFSuperResolutionPipeline", 3, False, "-1,1"),
        ("StableDiffusionXLPipeline", None, False, "auto"),
        ("StableDiffusion3Pipeline", None, False, "auto"),
        ("FluxPipeline", None, False, "auto"),
        ("DDPMPipeline", None, False, "auto"),  # maps to [0, 1] for every output type
        ("KandinskyV22Pipeline", None, False, "-1,1"),
    ],
)
def test_where_each_family_is_checked(name, values, slot, pt_range):
    support = pipeline_support(getattr(diffusers, name))
    assert (support.checker_values, support.checker_slot) == (values, slot)
    assert support.pt_value_range == pt_range and support.refused is None
