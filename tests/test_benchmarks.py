"""The benchmark scripts' own logic: the GPU section's code path (on CPU) and the README tables."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_gpu_benchmark_code_path_runs_on_cpu(tmp_path):
    output = tmp_path / "gpu.json"
    command = [sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--device", "cpu", "--tiny"]
    command += ["--batches", "1", "2", "--no-compile", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())["gpu"]
    assert [(r["compile"], r["batch"]) for r in rows] == [(False, 1), (False, 2)]
    assert all(r["ms_per_image"] > 0 for r in rows)


def test_readme_holds_the_latest_run_all_tables():
    import run_all

    results = sorted((BENCHMARKS / "results").glob("*.json"))
    assert results, "no benchmarks/results/<machine>.json"
    readme = (BENCHMARKS.parent / "README.md").read_text()
    block = readme.split(run_all.START, 1)[1].split(run_all.END, 1)[0].strip()
    rendered = [run_all.render(json.loads(path.read_text())).strip() for path in results]
    assert block in rendered
    assert "| size" in block and "| checkpoint" in block


def test_early_stop_benchmark_calls_and_efficacy_modes_run_on_cpu(tmp_path):
    """The calls rows count real denoiser calls; the efficacy mode runs end to end on tiny
    random models (its numbers mean nothing there; the mechanics are what is tested)."""
    script = str(BENCHMARKS / "bench_early_stop.py")
    calls = tmp_path / "calls.json"
    done = subprocess.run(
        [sys.executable, script, "--skip-cost", "--output", str(calls)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(calls.read_text())["calls"]
    assert [(r["at"], r["denoiser_calls"]) for r in rows] == [
        (0.1, 3),
        (0.3, 9),
        (0.5, 15),
        (0.7, 21),
    ]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na red car\na beach\n")
    efficacy = tmp_path / "efficacy.json"
    command = [sys.executable, script, "--efficacy", "--prompts", str(prompts), "--steps", "6"]
    done = subprocess.run([*command, "--output", str(efficacy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads(efficacy.read_text())
    assert [p["prompt"] for p in results["per_prompt"]] == ["a cat", "a red car", "a beach"]
    assert [r["step"] for r in results["efficacy"]] == [1, 2, 3]  # 30, 50, 70 % of 6 steps
    assert all(len(p["early"]) == 3 for p in results["per_prompt"])
    assert "precision" in done.stdout and "recall" in done.stdout


def test_backends_benchmark_runs_each_backend_in_its_own_process(tmp_path):
    """The code path on CPU (tiny checkpoint): the exported file's rows per batch, its scores
    equal to the eager float32 reference that its process also runs (the numbers are measured by
    running it on a real machine)."""
    output = tmp_path / "backends.json"
    command = [sys.executable, str(BENCHMARKS / "bench_backends.py"), "--tiny", "--repeats", "1"]
    command += ["--batches", "1", "2", "--backends", "onnxruntime"]
    done = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(output.read_text())["backends"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("onnxruntime", 1), ("onnxruntime", 2)]
    assert all(r["ms_per_img"] > 0 and r["max_abs_diff_vs_fp32"] < 1e-3 for r in rows)


def test_regions_benchmark_quick_mode_runs_on_cpu(tmp_path):
    """Cost rows and the toy localization run end to end (a short training: mechanics only)."""
    output = tmp_path / "regions.json"
    command = [sys.executable, str(BENCHMARKS / "bench_regions.py"), "--quick", "--device", "cpu"]
    done = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text())
    assert [row["size"] for row in results["cost"]] == ["tiny"]
    assert all(row["scores_and_map_ms"] > 0 for row in results["cost"])
    assert all(row["occlusion_map_4x4_ms"] > 0 for row in results["cost"])
    assert all(row["regions_step_ms"] > row["scores_ms"] for row in results["cost"])
    found = results["localization"]
    assert [(row["square"], row["map"]) for row in found] == [
        ("magenta", "cam"),
        ("magenta", "occlusion"),
        ("checker", "cam"),
        ("checker", "occlusion"),
    ]
    assert all(row["censored_in_regions"] <= row["flagged_images"] for row in results["regions"])
    assert all(row["train_steps"] == 10 and 0 <= row["localized_fraction"] <= 1 for row in found)
    assert "| size" in done.stdout and "localized_fraction" in done.stdout
