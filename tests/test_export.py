"""Export to ONNX (the whole scoring graph, dynamic shapes), the onnxruntime backend, compile."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from nsfw_guard import NSFWDetector
from nsfw_guard.cli import EXIT_ERROR, EXIT_USAGE, main
from nsfw_guard.export import ExportError, ScoreGraph, _check_parity, read_metadata
from nsfw_guard.model import load_model
from nsfw_guard.onnx_backend import OnnxScorer
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import make_checkpoint

from .conftest import PHOTO_PATHS, sharpen

# The bound for the exported graph against PyTorch, and for any backend against eager.
GRAPH_TOLERANCE = 1e-3
BACKEND_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def exported(sharp_checkpoint, tmp_path_factory) -> Path:
    """The sharp checkpoint exported by the command line, taking [-1, 1] floats."""
    path = tmp_path_factory.mktemp("export") / "nsfw.onnx"
    command = ["export", "--format", "onnx", str(path), "--model", str(sharp_checkpoint)]
    assert main(command) == 0
    return path


@pytest.fixture(scope="module")
def graph(sharp_checkpoint) -> ScoreGraph:
    loaded = load_model(sharp_checkpoint, device="cpu", dtype=torch.float32)
    return ScoreGraph(NSFWScorer(loaded.model, loaded.data_config), "-1,1")


@pytest.mark.parametrize(
    "shape", [(1, 448, 448), (5, 301, 517), (2, 1024, 640), (1, 37, 23), (3, 448, 449)]
)
def test_the_onnx_graph_scores_any_size_and_batch_as_pytorch_does(exported, graph, shape):
    """Resize and normalize are in the file: raw pixels of any size in, the four scores out,
    within 1e-3 of PyTorch (EVA02's rotary embeddings included)."""
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(sum(shape))
    images = graph.example(*shape, generator=generator)
    (scores,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = graph(images)
    assert scores.shape == (shape[0], 4)
    assert np.abs(scores - expected.numpy()).max() <= GRAPH_TOLERANCE
    if shape[0] > 1:  # the checkpoint tells images apart: the scores are not a constant
        assert expected[:, 0].std() > 0.01


def test_the_file_names_what_it_takes_and_where_it_came_from(exported, sharp_checkpoint):
    model = onnx.load(str(exported))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["scores"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # B, 3, H, W
    metadata = read_metadata(exported)
    assert metadata["pixels"] == "-1,1"
    assert metadata["source"] == str(sharp_checkpoint.resolve())
    assert json.loads(metadata["data_config"])["input_size"] == [3, 448, 448]


def test_a_graph_that_does_not_compute_what_pytorch_does_is_refused(exported, tmp_path):
    """The parity check that every export runs: another model's scores do not pass it."""
    folder = sharpen(make_checkpoint(tmp_path / "other", seed=8))
    other = load_model(folder, device="cpu", dtype=torch.float32)
    with pytest.raises(ExportError, match="differ from PyTorch's"):
        _check_parity(ScoreGraph(NSFWScorer(other.model, other.data_config)), exported)


def test_a_uint8_graph_takes_bytes(sharp_checkpoint, tmp_path, rgb_photos):
    loaded = load_model(sharp_checkpoint, device="cpu", dtype=torch.float32)
    path = tmp_path / "bytes.onnx"
    assert (
        main(
            [
                "export",
                "--format",
                "onnx",
                "--pixels",
                "uint8",
                str(path),
                "--model",
                str(sharp_checkpoint),
            ]
        )
        == 0
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    photo = torch.from_numpy(np.array(rgb_photos[0])).permute(2, 0, 1)[None].contiguous()
    (scores,) = session.run(None, {"images": photo.numpy()})
    expected = NSFWScorer(loaded.model, loaded.data_config)(photo.float(), "0,255")
    assert np.abs(scores - expected.numpy()).max() <= GRAPH_TOLERANCE
    # The backend hands ONNX Runtime the bytes in place (an I/O binding of uint8 memory).
    assert (OnnxScorer(path)(photo) - expected).abs().max() <= BACKEND_TOLERANCE


def test_the_onnxruntime_backend_gives_the_detectors_verdicts(exported, detector, photos):
    """Same API and same preprocessing: photos in every mode, arrays, tensors in any range; a
    NaN image is the worst case on both."""
    onnx_detector = NSFWDetector(exported, backend="onnxruntime", batch_size=4)
    assert onnx_detector.device == torch.device("cpu") and onnx_detector.dtype == torch.float32
    images = [*photos, np.asarray(photos[0].convert("RGB")), torch.rand(3, 90, 60) * 2 - 1]
    expected, got = detector.scores(images), onnx_detector.scores(images)
    assert (got - expected).abs().max() <= BACKEND_TOLERANCE
    verdicts = [(p.level, p.is_nsfw) for p in detector.predict(images)]
    assert [(p.level, p.is_nsfw) for p in onnx_detector.predict(images)] == verdicts
    nan = torch.rand(2, 3, 64, 64)
    nan[1, 0, 3, 3] = float("nan")
    assert onnx_detector.scores(nan, "0,1")[1].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_check_and_serve_run_the_exported_file(exported, sharp_checkpoint, capsys):
    from nsfw_guard.serve import ModerationAPI, ServeSettings

    photo = PHOTO_PATHS[0]
    assert main(["check", str(photo), "--model", str(sharp_checkpoint), "--dtype", "float32"]) in (
        0,
        1,
    )
    by_torch = capsys.readouterr().out.split("\t")
    assert main(["check", str(photo), "--model", str(exported), "--backend", "onnxruntime"]) in (
        0,
        1,
    )
    by_onnx = capsys.readouterr().out.split("\t")
    assert by_onnx[1] == by_torch[1] and by_onnx[-1] == by_torch[-1]  # level and verdict

    worker = ModerationAPI(ServeSettings(model=str(exported), backend="onnxruntime"))
    worker.setup("cpu")
    request = {"kind": "moderate", "level": "medium", "threshold": 0.5, "action": "blur"}
    request["images"] = [base64.b64encode(photo.read_bytes()).decode()]
    response = worker.encode_response(worker.predict(worker.decode_request(request)))
    result = json.loads(response.body)["results"][0]
    expected = NSFWDetector(sharp_checkpoint, device="cpu", dtype=torch.float32)
    with Image.open(photo) as image:
        scores = expected.predict_proba(image)[0]
    for name, score in result["scores"].items():
        assert score == pytest.approx(scores[name], abs=BACKEND_TOLERANCE)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--backend", "onnxruntime", "--dtype", "float32"], "--dtype: for the torch backend"),
        (["--backend", "onnxruntime", "--compile", "on"], "--compile: for the torch backend"),
    ],
)
def test_options_of_the_torch_backend_are_refused_with_onnxruntime(
    exported, arguments, message, capsys
):
    for command in ("check", "serve"):
        with pytest.raises(SystemExit) as stopped:
            main(
                [
                    command,
                    *([str(PHOTO_PATHS[0])] if command == "check" else []),
                    "--model",
                    str(exported),
                    *arguments,
                ]
            )
        assert stopped.value.code == EXIT_USAGE
        assert message in capsys.readouterr().err


def test_a_file_that_is_not_an_export_gets_one_clear_line(tmp_path, sharp_checkpoint, capsys):
    not_onnx = tmp_path / "photo.onnx"
    not_onnx.write_bytes(PHOTO_PATHS[0].read_bytes())
    with pytest.raises(ValueError, match="not an ONNX file"):
        NSFWDetector(not_onnx, backend="onnxruntime")
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    output = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    onnx.save(
        onnx.helper.make_model(onnx.helper.make_graph([node], "g", [value], [output])), foreign
    )
    with pytest.raises(ValueError, match="not a graph written by `nsfw-guard export`"):
        NSFWDetector(foreign, backend="onnxruntime")
    with pytest.raises(FileNotFoundError, match="no such file"):
        NSFWDetector(tmp_path / "missing.onnx", backend="onnxruntime")
    assert main(["serve", "--model", str(foreign), "--backend", "onnxruntime"]) == EXIT_USAGE
    assert "not a graph written by `nsfw-guard export`" in capsys.readouterr().err
    with pytest.raises(ValueError, match="backend='nope'"):
        NSFWDetector(sharp_checkpoint, backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_a_tensorrt_engine_without_a_gpu_says_so_and_keeps_the_onnx_file(
    sharp_checkpoint, tmp_path, capsys
):
    engine = tmp_path / "nsfw.engine"
    command = ["export", "--format", "tensorrt", str(engine), "--model", str(sharp_checkpoint)]
    assert main(command) == EXIT_ERROR
    assert "built on a CUDA GPU, and this machine has none" in capsys.readouterr().err
    assert not engine.exists() and read_metadata(tmp_path / "nsfw.onnx")["pixels"] == "-1,1"


def test_compile_runs_each_batch_size_bucket_once_and_matches_eager(sharp_checkpoint, caplog):
    """Batches pad to the next bucket (3 → 4), so a batch of 4 reuses 3's compilation; the
    compile time is logged once; the scores are eager's; the module's weights are unchanged
    (what save_pretrained writes). CPU runs torch.compile with its eager backend here: the
    inductor compilation's cost is measured in benchmarks/bench_backends.py."""
    loaded = load_model(sharp_checkpoint, device="cpu", dtype=torch.float32)
    scorer = NSFWScorer(loaded.model, loaded.data_config)
    keys = list(scorer.state_dict())
    pixels, ok = scorer.preprocess(torch.rand(4, 3, 64, 64))
    expected = scorer.classify(pixels, ok)
    assert scorer._compiled is None  # not compiled on CPU by default
    scorer.compile = {"backend": "eager"}
    with caplog.at_level(logging.INFO, logger="nsfw_guard"):
        three = scorer.classify(pixels[:3], ok[:3])
        four = scorer.classify(pixels, ok)
    assert torch.allclose(three, expected[:3], atol=1e-5)
    assert torch.allclose(four, expected, atol=1e-5)
    compiled = [r.message for r in caplog.records if "compiled the classifier" in r.message]
    assert len(compiled) == 1 and "batches of 4" in compiled[0]
    assert list(scorer.state_dict()) == keys


def test_export_options_are_checked(sharp_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["export", "--format", "onnx", str(tmp_path), "--model", str(sharp_checkpoint)])
    assert stopped.value.code == EXIT_USAGE
    assert "expected a file name in an existing folder" in capsys.readouterr().err
    missing = ["--model", str(tmp_path / "nope")]
    assert main(["export", "--format", "onnx", str(tmp_path / "m.onnx"), *missing]) == EXIT_ERROR
    assert not (tmp_path / "m.onnx").exists()


def test_the_regions_action_runs_on_the_onnxruntime_backend(exported, detector):
    """The occlusion map only scores images, so action="regions" gives the same output on
    both backends; the patch-token map needs the torch backend and says so."""
    from nsfw_guard.check import CheckStep

    onnx_detector = NSFWDetector(exported, backend="onnxruntime")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    settings = {"action": "regions", "threshold": 0.3, "level": "low"}
    expected = CheckStep(detector.scorer, **settings).run(images)
    got = CheckStep(onnx_detector.scorer, **settings).run(images)
    assert torch.equal(got.flags, expected.flags)
    assert (got.images - expected.images).abs().max() <= 1e-2
    with pytest.raises(ValueError, match="use the torch backend"):
        CheckStep(onnx_detector.scorer, **settings, censor_params={"map": "cam"}).run(images)
