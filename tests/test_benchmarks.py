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
