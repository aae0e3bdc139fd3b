"""The README's offline diffusers example and examples/generate.py, run for real."""

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from nsfw_guard import read_verdict
from nsfw_guard.testing import make_tiny_pipeline

ROOT = Path(__file__).parent.parent


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_offline_diffusers_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_readme_block("### Try it offline"), namespace)
    assert namespace["flagged"].nsfw_content_detected == [True]
    assert namespace["flagged"].images[0].getextrema() == ((0, 0), (0, 0), (0, 0))
    assert namespace["clean"].nsfw_content_detected == [False]
    assert namespace["clean"].images[0].tobytes() == namespace["unguarded"].images[0].tobytes()


def test_generate_script_writes_censored_pngs_with_the_verdict(level_checkpoints, tmp_path):
    pipeline_folder = tmp_path / "pipeline"
    make_tiny_pipeline("sd").save_pretrained(pipeline_folder)
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "examples" / "generate.py"),
        "a cat",
        "a dog",
        "--model-id",
        str(pipeline_folder),
        "--checker",
        str(level_checkpoints["high"]),
        "--action",
        "blank",
        "--steps",
        "2",
        "--per-prompt",
        "2",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    paths = sorted(out.glob("*.png"))
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for path, prompt in zip(paths, ["a cat", "a cat", "a dog", "a dog"], strict=True):
        with Image.open(path) as image:
            assert image.text["prompt"] == prompt
            assert image.getextrema() == ((0, 0), (0, 0), (0, 0))
        verdict = read_verdict(path)  # the format scan's copies and serve's answers carry
        assert verdict["level"] == "high" and verdict["flagged"] is True
        assert verdict["scores"]["high"] > 0.99 and verdict["action"] == "blank"
        assert verdict["model"] == str(level_checkpoints["high"])
        assert (verdict["check_level"], verdict["threshold"]) == ("medium", 0.5)
    assert len(result.stdout.splitlines()) == 4 and "FLAGGED" in result.stdout


def test_readme_verdict_metadata_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_readme_block("### Verdicts in image files"), namespace)
    assert read_verdict(tmp_path / "out.webp")["action"] == "blur"


def test_readme_early_stop_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_readme_block("Offline, with a tiny pipeline and a classifier forced to"), namespace)
    result = namespace["g"].last[0]
    assert result.reason == "stopped early at step 3 of 10" and result.stopped_at == 2
    assert namespace["shown"] == [0, 1, 2]
    assert namespace["out"].nsfw_content_detected == [True]
