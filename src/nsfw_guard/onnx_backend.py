"""Running an exported graph (``nsfw-guard export``) in ONNX Runtime, behind the scorer's API.

:class:`OnnxScorer` has :class:`~nsfw_guard.scoring.NSFWScorer`'s interface (``preprocess``,
``classify``, ``forward``), so the detector, ``scan``, ``check`` and ``serve`` run on it
unchanged. Its ``preprocess`` is PyTorch's, rebuilt from the file's metadata, so images are
resized as they are on the PyTorch backend; the file's own resize then sees the model's input
size, where it is exactly the identity. ONNX Runtime reads the pixels and writes the scores in
place, through an I/O binding on the tensors' own device (no copy through the host on CUDA), but
it is not in-graph: on CUDA each call waits for the pixels to be ready before ONNX Runtime runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy
import torch
from torch import Tensor, nn

from .export import data_config_of, from_unit, read_metadata
from .levels import mark_unverifiable
from .preprocess import Preprocess
from .scoring import NSFWScorer

__all__ = ["BACKENDS", "OnnxScorer"]

BACKENDS = ("torch", "onnxruntime")
"""What runs the classifier: PyTorch (a checkpoint) or ONNX Runtime (an exported ``.onnx``)."""


class OnnxScorer(nn.Module):
    """An exported ``.onnx`` file run by ONNX Runtime: images → ``[B, 4]`` float32 scores.

    ``device`` picks ONNX Runtime's provider: CPU, or CUDA (``onnxruntime-gpu``). Scores come
    back on ``device``.

    Example:
        >>> import tempfile
        >>> from nsfw_guard.export import export_onnx
        >>> from nsfw_guard.model import load_model
        >>> from nsfw_guard.scoring import NSFWScorer
        >>> from nsfw_guard.testing import make_checkpoint
        >>> loaded = load_model(make_checkpoint(tempfile.mkdtemp(), level="low"), device="cpu")
        >>> path = export_onnx(
        ...     NSFWScorer(loaded.model, loaded.data_config), f"{tempfile.mkdtemp()}/m.onnx"
        ... )  # doctest: +SKIP
        >>> OnnxScorer(path)(torch.rand(2, 3, 64, 64)).argmax(dim=1).tolist()  # doctest: +SKIP
        [1, 1]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ):
        super().__init__()
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no such file; the onnxruntime backend runs a file written by "
                "`nsfw-guard export --format onnx OUT`."
            )
        metadata = read_metadata(self.path)
        self.pixels = metadata["pixels"]
        self.source = metadata.get("source", "")
        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ValueError(
                    "device='cuda' with the onnxruntime backend needs onnxruntime-gpu "
                    "(pip install onnxruntime-gpu); this onnxruntime has only "
                    f"{onnxruntime.get_available_providers()}."
                )
            options = {"device_id": device.index or 0}
            providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        elif device.type != "cpu":
            raise ValueError(f"device={device}: the onnxruntime backend runs on 'cpu' or 'cuda'.")
        self.session = onnxruntime.InferenceSession(str(self.path), providers=providers)
        self.preprocess = Preprocess(data_config_of(metadata), background).to(device)

    def forward(self, images: Tensor, value_range: str = "auto") -> Tensor:
        pixels, verifiable = self.preprocess(images, value_range)
        return self.classify(pixels, verifiable)

    # The occlusion map (action="regions"'s default) only scores images: it runs here as is.
    occlusion_map = NSFWScorer.occlusion_map

    def classify_with_map(self, pixels: Tensor, verifiable: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError(
            "the 'cam' region map reads the model's patch tokens, which an exported graph does "
            "not return: use the torch backend, or the occlusion map (the default)."
        )

    def classify(self, pixels: Tensor, verifiable: Tensor) -> Tensor:
        """Scores for preprocessed float32 ``pixels`` and their ``verifiable`` mask."""
        unit = pixels / self.preprocess.inv_std + self.preprocess.mean
        images = from_unit(unit, self.pixels).contiguous()
        scores = torch.empty(len(images), 4, dtype=torch.float32, device=images.device)
        if not len(images):  # nothing to bind: empty memory has no address
            return scores
        binding = self.session.io_binding()  # one a call: a binding is not safe across threads
        binding.bind_input("images", *_memory_of(images))
        binding.bind_output("scores", *_memory_of(scores))
        if images.device.type == "cuda":  # ONNX Runtime runs on a stream of its own
            torch.cuda.current_stream(images.device).synchronize()
        self.session.run_with_iobinding(binding)
        return mark_unverifiable(scores, verifiable)


_NUMPY_TYPES = {torch.float32: numpy.float32, torch.uint8: numpy.uint8}


def _memory_of(tensor: Tensor) -> tuple:
    """A contiguous ``tensor``'s memory as ``IOBinding.bind_input``/``bind_output`` take it."""
    device = tensor.device
    shape = tuple(tensor.shape)
    return device.type, device.index or 0, _NUMPY_TYPES[tensor.dtype], shape, tensor.data_ptr()
