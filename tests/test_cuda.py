"""On a CUDA device: the check steps read nothing back to the host, the guard and early stop keep
their promises on the GPU, and the GPU's verdicts equal the CPU's. Skipped without CUDA (CI has
none); run on a GPU machine with ``pytest tests/test_cuda.py``."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nsfw_guard import EarlyStop, NSFWDetector, guard
from nsfw_guard.check import CheckStep
from nsfw_guard.early_stop import EarlyCheck, LatentDecoder
from nsfw_guard.model import load_model
from nsfw_guard.scoring import NSFWScorer
from nsfw_guard.testing import make_tiny_decoder, make_tiny_pipeline

from .conftest import PHOTO_PATHS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


class _NoSync:
    """Inside, any host sync on the GPU raises (torch's sync debug mode)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


def _step(checkpoint, **settings) -> CheckStep:
    loaded = load_model(checkpoint, device=CUDA)
    scorer = NSFWScorer(loaded.model, loaded.data_config, compile=False)
    return CheckStep(scorer, **settings).to(CUDA)


def test_the_classifier_is_compiled_by_default_and_reads_nothing_back(sharp_checkpoint, caplog):
    """On CUDA the default compiles, once per batch bucket (3 runs as 4), logs it once, and the
    compiled scores are eager's within bf16's rounding."""
    compiled = NSFWDetector(sharp_checkpoint, device=CUDA)
    eager = NSFWDetector(sharp_checkpoint, device=CUDA, compile=False)
    images = torch.rand(4, 3, 512, 512, device=CUDA) * 2 - 1
    with caplog.at_level("INFO", logger="nsfw_guard"):
        three = compiled.scores(images[:3], "-1,1")
        four = compiled.scores(images, "-1,1")
    logged = [r.message for r in caplog.records if "compiled the classifier" in r.message]
    assert len(logged) == 1 and "batches of 4" in logged[0]
    expected = eager.scores(images, "-1,1")
    assert (four - expected).abs().max() <= 2e-2 and (three - expected[:3]).abs().max() <= 2e-2
    with torch.inference_mode(), _NoSync():
        compiled.scorer(images, "-1,1")


def test_the_check_step_reads_nothing_back(sharp_checkpoint):
    step = _step(sharp_checkpoint, action="blur")
    images = torch.rand(4, 3, 512, 512, device=CUDA, dtype=torch.float16) * 2 - 1
    images[1, :, :8] = float("nan")
    step.run(images)  # warm up: cuDNN and cuBLAS pick their kernels
    with torch.inference_mode(), _NoSync():
        output = step.run(images, "-1,1", "unit")
    assert output.images.device.type == "cuda" and not bool(output.verifiable[1])


def test_the_early_check_reads_nothing_back(level_checkpoints):
    check = EarlyCheck(
        LatentDecoder(make_tiny_decoder().to(CUDA)), _step(level_checkpoints["high"]), 0.8
    )
    latents = torch.randn(2, 4, 32, 32, device=CUDA)
    check(latents)
    with torch.inference_mode(), _NoSync():
        output = check(latents)
    assert bool(output.stop)


def test_early_stop_on_the_gpu(level_checkpoints):
    torch.backends.cudnn.deterministic = True
    pipe = make_tiny_pipeline("sd").to(CUDA)
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))

    def run():
        calls.clear()
        generator = torch.Generator(CUDA).manual_seed(0)
        output = pipe("a photo", num_inference_steps=10, output_type="np", generator=generator)
        return output, len(calls)

    early = EarlyStop(decoder=make_tiny_decoder(), threshold=0.5)
    g = guard(pipe, model=level_checkpoints["high"], action="blank", early_stop=early)
    output, count = run()
    assert count == 3 and (output.images == 0).all() and g.last[0].stopped_at == 2
    assert next(early.decoder.parameters()).device.type == "cuda"
    guard(pipe, model=level_checkpoints["neutral"])
    plain, plain_count = run()
    guard(pipe, model=level_checkpoints["neutral"], early_stop=early)
    same, same_count = run()
    assert same_count == plain_count == 10 and np.array_equal(same.images, plain.images)


def test_a_half_precision_pipeline_is_guarded_on_the_gpu(level_checkpoints):
    pipe = make_tiny_pipeline("sdxl").to(CUDA, torch.float16)
    g = guard(pipe, model=level_checkpoints["high"], action="blank")
    output = pipe("a photo", num_inference_steps=2, output_type="pt")
    assert output.images.device.type == "cuda"
    assert (output.images == 0).all() and g.last[0].flagged
    assert g.checker.dtype == torch.bfloat16  # the classifier's own dtype on CUDA


def test_gpu_scores_equal_cpu_scores(sharp_checkpoint, rgb_photos):
    cpu = NSFWDetector.from_pretrained(sharp_checkpoint, device="cpu", dtype=torch.float32)
    gpu = NSFWDetector.from_pretrained(sharp_checkpoint, device="cuda", dtype=torch.float32)
    difference = (gpu.scores(rgb_photos).cpu() - cpu.scores(rgb_photos)).abs()
    assert float(difference.max()) < 2e-3


def test_onnxruntime_on_the_gpu_scores_as_eager_and_in_place(sharp_checkpoint, tmp_path):
    """ONNX Runtime's CUDA provider reads CUDA pixels in place and gives CUDA scores."""
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    from nsfw_guard.export import export_onnx
    from nsfw_guard.onnx_backend import OnnxScorer

    loaded = load_model(sharp_checkpoint, device="cpu", dtype=torch.float32)
    eager = NSFWScorer(loaded.model, loaded.data_config, compile=False)
    path = export_onnx(eager, tmp_path / "nsfw.onnx")
    images = torch.rand(5, 3, 301, 517) * 2 - 1
    scores = OnnxScorer(path, device=CUDA)(images.to(CUDA), "-1,1")
    assert scores.device.type == "cuda"
    assert float((scores.cpu() - eager(images, "-1,1")).abs().max()) <= 2e-3


def test_scan_on_the_gpu_gives_the_cpus_records(sharp_checkpoint, tmp_path):
    records = {}
    for device in ("cpu", "cuda"):
        output = tmp_path / f"{device}.jsonl"
        command = [sys.executable, "-m", "nsfw_guard", "scan", str(PHOTO_PATHS[0].parent)]
        command += ["--model", str(sharp_checkpoint), "--device", device, "--dtype", "float32"]
        command += ["--output", str(output), "--quiet"]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode in (0, 1), done.stderr
        records[device] = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records["cuda"]) == len(PHOTO_PATHS)
    for cpu, gpu in zip(records["cpu"], records["cuda"], strict=True):
        assert cpu["path"] == gpu["path"]
        assert all(abs(cpu[k] - gpu[k]) < 2e-3 for k in ("neutral", "low", "medium", "high"))


def test_the_serve_worker_and_the_ray_classifier_on_the_gpu(sharp_checkpoint):
    """Both preprocess on the model's device: their batches must not be pinned as CPU ones."""
    import base64

    from nsfw_guard.ray import NSFWClassifier
    from nsfw_guard.serve import ModerationAPI, ServeSettings

    photos = [path.read_bytes() for path in PHOTO_PATHS[:3]]
    on_cpu = NSFWClassifier(str(sharp_checkpoint), device="cpu", dtype="float32")
    on_gpu = NSFWClassifier(str(sharp_checkpoint), device="cuda", dtype="float32")
    batch = {"jpg": np.array(photos, dtype=object)}
    cpu, gpu = on_cpu(batch), on_gpu(batch)
    for name in ("nsfw_neutral", "nsfw_low", "nsfw_medium", "nsfw_high"):
        assert np.allclose(cpu[name], gpu[name], atol=2e-3)

    worker = ModerationAPI(ServeSettings(model=str(sharp_checkpoint), dtype="float32"))
    worker.setup("cuda:0")
    request = {"kind": "moderate", "level": "medium", "threshold": 0.5, "action": "blur"}
    request["images"] = [base64.b64encode(data).decode() for data in photos]
    response = worker.encode_response(worker.predict([worker.decode_request(request)])[0])
    results = json.loads(response.body)["results"]
    for i, result in enumerate(results):
        assert result["scores"]["medium"] == pytest.approx(float(cpu["nsfw_medium"][i]), abs=2e-3)
