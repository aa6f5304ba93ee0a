"""softprompt.errors: the one user-facing error, and optional dependencies named by their extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

import softprompt as sp
from softprompt.errors import require
from softprompt.trainer import plot_curves

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module, extra, package",
    [
        ("fastapi", "serve", "fastapi"),
        ("uvicorn", "serve", "uvicorn"),
        ("sklearn.metrics", "metrics", "scikit-learn"),
        ("rouge_score.rouge_scorer", "metrics", "rouge-score"),
        ("gguf", "assets", "gguf"),
    ],
)
def test_a_missing_optional_package_names_its_extra(monkeypatch, module, extra, package):
    for name in {module, module.split(".")[0]}:  # import now fails, even if imported before
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(sp.SoftPromptError) as e:
        require(module, extra, "this feature")
    msg = str(e.value)
    assert f"needs the {package} package" in msg and f"pip install 'softprompt[{extra}]'" in msg


def test_the_served_and_metric_stacks_are_extras_not_dependencies():
    """`pip install softprompt` stays light; every extra is in [all], and [all] in the tests."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for heavy in (
        "fastapi",
        "uvicorn",
        "matplotlib",
        "scikit-learn",
        "sacrebleu",
        "gguf",
        "lm-eval",
    ):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert extras["all"] == ["softprompt[serve,plot,metrics,assets,data,eval]"]
    assert "softprompt[all]" in extras["test"]


def test_training_without_matplotlib_skips_only_the_curve(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    notes = []
    plot_curves(log, tmp_path / "training_curve.png", notes.append)
    assert not (tmp_path / "training_curve.png").exists()
    assert notes and "softprompt[plot]" in notes[0]
    monkeypatch.undo()
    plot_curves(log, tmp_path / "training_curve.png", notes.append)
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
