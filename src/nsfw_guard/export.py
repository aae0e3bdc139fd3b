"""Exporting the scoring graph: decoded pixels of any size → the four level scores, as one file.

:func:`export_onnx` traces :class:`ScoreGraph` (the scorer's preprocess, resize and normalize
included, and the classifier) with ``torch.export`` and writes it as ONNX (the dynamo exporter),
with a dynamic batch, height and width, then runs the file in ONNX Runtime and refuses it unless
its scores match PyTorch's. :func:`build_tensorrt_engine` builds a TensorRT engine from that file
on a CUDA GPU. ``nsfw-guard export`` is their command line; :mod:`nsfw_guard.onnx_backend` runs
the file behind the detector's API.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__
from .preprocess import DataConfig
from .scoring import NSFWScorer

__all__ = [
    "EXPORT_PIXELS",
    "ExportError",
    "ScoreGraph",
    "build_tensorrt_engine",
    "data_config_of",
    "export_onnx",
    "from_unit",
    "read_metadata",
]

EXPORT_PIXELS = ("-1,1", "0,1", "0,255", "uint8")
"""What an exported graph takes: float32 RGB in one of these value ranges, or uint8 RGB."""
PARITY_TOLERANCE = 1e-3
"""The most an exported file's scores may differ from PyTorch's before :func:`export_onnx`
refuses it."""
# The sizes the parity check runs at: one smaller and one larger than the model's input,
# neither square, so a graph that baked in its example's shape fails.
_CHECK_SIZES = ((2, 301, 517), (1, 97, 64))
_METADATA_PREFIX = "nsfw_guard."


class ExportError(RuntimeError):
    """The exported file does not compute what PyTorch computes, or cannot be built here."""


class ScoreGraph(nn.Module):
    """``[B, 3, H, W]`` RGB pixels (``pixels``: a float range or ``"uint8"``) → ``[B, 4]`` scores.

    The scorer's whole graph with its value range fixed, the form that is exported. Images with
    NaN or Inf pixels score (0, 1, 1, 1), as in PyTorch.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.testing import make_checkpoint
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp()), device="cpu")
        >>> graph = ScoreGraph(NSFWScorer(loaded.model, loaded.data_config), "uint8")
        >>> graph(torch.zeros(2, 3, 90, 60, dtype=torch.uint8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, scorer: NSFWScorer, pixels: str = "-1,1"):
        super().__init__()
        if pixels not in EXPORT_PIXELS:
            raise ValueError(f"pixels={pixels!r}: expected one of {EXPORT_PIXELS}.")
        self.scorer = scorer
        self.pixels = pixels

    def forward(self, images: Tensor) -> Tensor:
        if self.pixels == "uint8":  # resized in float, as on GPUs
            return self.scorer(images.to(torch.float32), "0,255")
        return self.scorer(images, self.pixels)

    def example(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Random input of this graph's kind, on its device."""
        unit = torch.rand(batch, 3, height, width, generator=generator)
        return from_unit(unit, self.pixels).to(self.scorer.preprocess.mean.device)


def from_unit(unit: Tensor, pixels: str) -> Tensor:
    """``[0, 1]`` RGB as the input of a graph that takes ``pixels`` (see :data:`EXPORT_PIXELS`).

    Example:
        >>> from_unit(torch.tensor([0.0, 0.5, 1.0]), "-1,1").tolist()
        [-1.0, 0.0, 1.0]
    """
    if pixels == "uint8":
        return (unit.clamp(0, 1) * 255).round().to(torch.uint8)
    low, high = (float(bound) for bound in pixels.split(","))
    return (unit * (high - low) + low).to(torch.float32)


def export_onnx(
    scorer: NSFWScorer,
    path: str | os.PathLike,
    *,
    pixels: str = "-1,1",
    source: str = "",
    opset: int = 18,
    verify: bool = True,
) -> Path:
    """Write ``scorer``'s graph (see :class:`ScoreGraph`) to ``path`` as ONNX; returns the path.

    The batch, height and width are dynamic; the input is named ``images`` and the output
    ``scores``. The file's metadata holds the package version, ``source`` (the checkpoint), the
    input's ``pixels`` and the model's data config (:func:`read_metadata`). With ``verify``, the
    file is run in ONNX Runtime at two sizes and refused (:class:`ExportError`, no file left)
    unless its scores are within :data:`PARITY_TOLERANCE` of PyTorch's. The scorer runs in
    float32 for the export (a copy, if it is not).

    Example:
        >>> import tempfile
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.testing import make_checkpoint
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp()), device="cpu")
        >>> scorer = NSFWScorer(loaded.model, loaded.data_config)
        >>> path = export_onnx(scorer, Path(tempfile.mkdtemp()) / "nsfw.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    if next(scorer.parameters()).dtype != torch.float32:
        scorer = copy.deepcopy(scorer).to(torch.float32)
    graph = ScoreGraph(scorer, pixels).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=2, max=16384)
    width = torch.export.Dim("width", min=2, max=16384)
    example = graph.example(2, 301, 517)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(
            graph, (example,), dynamic_shapes={"images": {0: batch, 2: height, 3: width}}
        )
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["scores"],
            opset_version=opset,
            verbose=False,
        )
    metadata = {
        "version": __version__,
        "source": source,
        "pixels": pixels,
        "data_config": json.dumps(scorer.preprocess.config.to_pretrained_cfg()),
    }
    for key, value in metadata.items():
        onnx_program.model.metadata_props[_METADATA_PREFIX + key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    onnx_program.save(partial)
    try:
        if verify:
            _check_parity(graph, partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata :func:`export_onnx` wrote into ``path`` (without its prefix).

    Raises :class:`ValueError` for a file that nsfw-guard did not export.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError:
        raise
    except Exception as error:  # protobuf's DecodeError, for a file that is not ONNX
        raise ValueError(f"{path}: not an ONNX file ({type(error).__name__})") from None
    found = {
        entry.key[len(_METADATA_PREFIX) :]: entry.value
        for entry in model.metadata_props
        if entry.key.startswith(_METADATA_PREFIX)
    }
    missing = {"pixels", "data_config"} - found.keys()
    if missing or found["pixels"] not in EXPORT_PIXELS:
        raise ValueError(
            f"{path}: not a graph written by `nsfw-guard export` (its metadata lacks "
            f"{', '.join(sorted(missing)) or 'a known pixels entry'}); export one with "
            "`nsfw-guard export --format onnx OUT`."
        )
    return found


def data_config_of(metadata: dict[str, str]) -> DataConfig:
    """The model's data config, from an exported file's metadata."""
    return DataConfig.from_pretrained_cfg(json.loads(metadata["data_config"]))


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float16,
    batch_sizes: tuple[int, int, int] = (1, 16, 64),
    image_size: tuple[int, int] = (1024, 1024),
) -> Path:
    """Build a TensorRT engine from an exported ONNX file, on this machine's CUDA GPU.

    ``batch_sizes`` are the engine's (min, opt, max) batch; ``image_size`` the height and width
    it is tuned for (any size up to twice it runs). ``dtype`` float16 or bfloat16 lets TensorRT
    pick reduced-precision kernels; float32 keeps every layer in float32. Needs the ``tensorrt``
    package and a CUDA GPU: without them, an :class:`ExportError` says which is missing.
    """
    if not torch.cuda.is_available():
        raise ExportError("a TensorRT engine is built on a CUDA GPU, and this machine has none.")
    try:
        import tensorrt as trt
    except ImportError as error:
        raise ExportError(
            "a TensorRT engine needs the tensorrt package: pip install tensorrt"
        ) from error
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if dtype == torch.float16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == torch.bfloat16:
        config.set_flag(trt.BuilderFlag.BF16)
    elif dtype != torch.float32:
        raise ValueError(f"dtype={dtype}: expected torch.float16, torch.bfloat16 or float32.")
    height, width = image_size
    profile = builder.create_optimization_profile()
    low, opt, high = batch_sizes
    profile.set_shape(
        "images", (low, 3, 2, 2), (opt, 3, height, width), (high, 3, 2 * height, 2 * width)
    )
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}; see its log.")
    path = Path(path)
    path.write_bytes(bytes(engine))
    return path


def _check_parity(graph: ScoreGraph, onnx_path: Path) -> None:
    """Refuse the file unless ONNX Runtime's scores match ``graph``'s at two odd sizes."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for shape in _CHECK_SIZES:
        images = graph.example(*shape, generator=generator)
        with torch.no_grad():
            expected = graph(images).cpu()
        (got,) = session.run(None, {"images": images.cpu().numpy()})
        error = (torch.from_numpy(got) - expected).abs().max().item()
        if not error <= PARITY_TOLERANCE:
            raise ExportError(
                f"the exported graph's scores differ from PyTorch's by {error:.2e} at "
                f"{list(shape)} (allowed: {PARITY_TOLERANCE:.0e}); the file was not written."
            )
