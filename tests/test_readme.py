"""The README's Python example runs as written, and its set-up commands are the ones CI uses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_two_setup_commands_on_top_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("softprompt demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


@pytest.mark.slow
def test_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 18
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "trainable 6,210,944 of 140,725,952 (4.414%)"
    assert (tmp_path / "sentiment-adapter" / "adapter.safetensors").is_file()
    assert lines[-1] in ("' positive'", "' negative'")  # the tuned adapter answers a label word


def section_code(title: str) -> list[str]:
    part = README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", part, re.S)


@pytest.mark.slow
def test_trainer_and_trl_example_runs(tmp_path):
    blocks = section_code("Train with transformers Trainer / TRL")
    assert len(blocks) == 2
    proc = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(ln) for ln in proc.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", ln)]
    assert len(losses) == 2 and losses[1] < losses[0], proc.stdout[-2000:]
    assert "Review: Great fun.\nSentiment:" in proc.stdout
    for ckpt in ("hf/checkpoint-4", "hf/checkpoint-8", "sft/checkpoint-4"):
        folder = tmp_path / "runs" / ckpt
        for name in ("adapter_config.json", "adapter.safetensors", "trainable.safetensors"):
            assert (folder / name).is_file(), (ckpt, sorted(p.name for p in folder.iterdir()))
        assert (folder / "model.safetensors").stat().st_size < 64 * 1024
    assert (tmp_path / "runs" / "hf" / "adapter" / "adapter.safetensors").is_file()
