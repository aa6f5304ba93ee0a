"""The command line end to end, with tiny models (real tokenizer) and small step counts."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.cli import main

POS = ["a wonderful, moving film", "brilliant and funny", "a joy to watch", "great acting"]
NEG = ["a dull, tedious mess", "boring and far too long", "awful script", "a waste of time"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = [{"text": t, "label": "positive"} for t in POS] + [
        {"text": t, "label": "negative"} for t in NEG
    ]
    write_jsonl(d / "train.jsonl", train * 2)
    write_jsonl(d / "dev.jsonl", train[:6])
    gen = [{"input": f"say {w}", "target": w} for w in ["yes", "no", "maybe", "hello"]]
    write_jsonl(d / "gen.jsonl", gen * 2)
    return d


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def train_args(model, data, out, method, *extra):
    return [
        "train",
        "--model",
        model,
        "--method",
        method,
        "--train",
        data / "train.jsonl",
        "--eval",
        data / "dev.jsonl",
        "--output",
        out,
        "--max-steps",
        4,
        "--batch-size",
        4,
        "--eval-every",
        2,
        "--num-virtual-tokens",
        3,
        "--prefix-hidden",
        16,
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize("method", ["prompt", "prefix", "deep", "ptuning"])
def test_train_eval_generate_inspect_classify_on_an_lm(
    tmp_path, capsys, tiny_folders, cls_data, method
):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        *train_args(tiny_folders["llama"], cls_data, out, method, "--test", cls_data / "dev.jsonl"),
    )
    assert code == 0, err
    assert "zero-shot accuracy" in stdout and "tuned accuracy" in stdout
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter.safetensors",
        "metrics.jsonl",
        "training_curve.png",
        "summary.json",
        "config.yaml",
        "test_predictions.jsonl",
        "checkpoint/optimizer.pt",
        "checkpoint/trainable.safetensors",
    ):
        assert (out / name).is_file(), name
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == method and meta["task"]["labels"] == ["negative", "positive"]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [2, 4]
    assert all(0.0 <= r["eval"]["accuracy"] <= 1.0 for r in log if "eval" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == 4 and 0 <= summary["test"]["accuracy"] <= 1
    # eval: JSON metrics on stdout, predictions beside the adapter
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        tiny_folders["llama"],
        "--adapter",
        out / "adapter",
        "--data",
        cls_data / "dev.jsonl",
    )
    assert code == 0, err
    metrics = json.loads(stdout)
    assert set(metrics) >= {"accuracy", "macro_f1", "per_class"}
    assert set(metrics["per_class"]) == {"negative", "positive"}
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    preds = [
        json.loads(x) for x in (out / "adapter" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(preds) == 6 and all(p["prediction"] in ("negative", "positive") for p in preds)
    # generate on texts
    code, stdout, err = run_cli(
        capsys,
        "generate",
        "--model",
        tiny_folders["llama"],
        "--adapter",
        out / "adapter",
        "great fun",
        "dreadful",
    )
    lines = [json.loads(x) for x in stdout.splitlines()]
    assert code == 0 and [x["text"] for x in lines] == ["great fun", "dreadful"]
    assert all(abs(sum(x["scores"].values()) - 1) < 1e-4 for x in lines)
    # inspect
    code, stdout, err = run_cli(
        capsys, "inspect", out / "adapter", "--model", tiny_folders["llama"], "--json", "--top-k", 3
    )
    rep = json.loads(stdout)
    assert code == 0 and rep["method"] == method and len(rep["virtual_tokens"]) == 3
    assert all(len(v["nearest"]) == 3 for v in rep["virtual_tokens"])
    assert rep["bytes_on_disk"] > 0 and rep["adapter_parameters"] > 0


def test_soft_segments_in_a_template(tmp_path, capsys, tiny_folders, cls_data):
    out = tmp_path / "tpl"
    code, _, err = run_cli(
        capsys,
        *train_args(
            tiny_folders["llama"],
            cls_data,
            out,
            "prompt",
            "--template",
            "[soft:2] Review: {text} [soft:3] Sentiment: {label}",
        ),
    )
    assert code == 0, err
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["config"]["placement"] == "template" and meta["config"]["num_virtual_tokens"] == 5
    assert load_file(out / "adapter" / "adapter.safetensors")["prompt"].shape == (5, 32)
    code, _, err = run_cli(
        capsys,
        *train_args(
            tiny_folders["llama"],
            cls_data,
            tmp_path / "x",
            "prefix",
            "--template",
            "[soft:2] {text} {label}",
        ),
    )
    assert code == 2 and "soft segments" in err


@pytest.mark.parametrize("family", ["t5", "bart", "llama"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "deep", "ptuning"])
def test_generation_task(tmp_path, capsys, tiny_folders, cls_data, family, method):
    out = tmp_path / "gen"
    code, stdout, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_folders[family],
        "--method",
        method,
        "--task",
        "generate",
        "--train",
        cls_data / "gen.jsonl",
        "--eval",
        cls_data / "gen.jsonl",
        "--output",
        out,
        "--max-steps",
        3,
        "--batch-size",
        4,
        "--eval-every",
        3,
        "--num-virtual-tokens",
        2,
        "--prefix-hidden",
        16,
        "--max-new-tokens",
        4,
        "--no-progress",
        "--lr",
        "1e-2",
    )
    assert code == 0, err
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r["eval"] for r in log if "eval" in r]
    assert ev and set(ev[0]) >= {"rougeL", "rouge1", "rouge2", "bleu", "exact_match"}
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        tiny_folders[family],
        "--adapter",
        out / "adapter",
        "--data",
        cls_data / "gen.jsonl",
    )
    assert code == 0, err
    assert 0 <= json.loads(stdout)["rougeL"] <= 100


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "prefix", "deep", "ptuning"])
def test_classify_with_a_head_on_minilm(tmp_path, capsys, cls_data, method):
    out = tmp_path / "mini"
    code, stdout, err = run_cli(
        capsys, *train_args("all-minilm-l6-v2", cls_data, out, method, "--lr", "1e-2")
    )
    assert code == 0, err
    tensors = load_file(out / "adapter" / "adapter.safetensors")
    assert tensors["task_head.weight"].shape == (2, 384)
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        "all-minilm-l6-v2",
        "--adapter",
        out / "adapter",
        "--data",
        cls_data / "dev.jsonl",
    )
    assert code == 0 and "accuracy" in json.loads(stdout)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "fine", "label": "positive"}\nnot json\n', "train.jsonl:2"),
        ('{"text": "fine"}\n', "train.jsonl:1: field 'label'"),
        ('{"text": "", "label": "positive"}\n', "train.jsonl:1: field 'text'"),
    ],
)
def test_bad_training_data_is_one_clear_message(tmp_path, capsys, tiny_folders, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    code, stdout, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_folders["llama"],
        "--train",
        tmp_path / "train.jsonl",
        "--output",
        tmp_path / "o",
        "--max-steps",
        1,
    )
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_file_and_unseen_eval_label(tmp_path, capsys, tiny_folders, cls_data):
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_folders["llama"],
        "--train",
        tmp_path / "nope.jsonl",
        "--output",
        tmp_path / "o",
    )
    assert code == 2 and "nope.jsonl" in err
    write_jsonl(
        tmp_path / "dev.jsonl",
        [{"text": "meh", "label": "neutral"}, {"text": "ok", "label": "positive"}],
    )
    args = train_args(tiny_folders["llama"], cls_data, tmp_path / "o", "prompt")
    args[args.index("--eval") + 1] = tmp_path / "dev.jsonl"
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "dev.jsonl:1" in err and "neutral" in err
    code, _, err = run_cli(capsys, *args, "--skip-bad")
    assert code == 0 and "neutral" in err  # reported, skipped, training went on


def test_skip_bad_skips_and_reports(tmp_path, capsys, tiny_folders, cls_data):
    rows = (cls_data / "train.jsonl").read_text() + "oops\n" + '{"text": "x"}\n'
    (tmp_path / "train.jsonl").write_text(rows)
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_folders["llama"],
        "--train",
        tmp_path / "train.jsonl",
        "--output",
        tmp_path / "o",
        "--max-steps",
        1,
        "--skip-bad",
        "--no-progress",
        "--num-virtual-tokens",
        2,
    )
    assert code == 0, err
    assert "train.jsonl:17" in err and "train.jsonl:18" in err and "skipped 2 of 18" in err


def test_adapter_for_another_model_is_refused_by_eval(tmp_path, capsys, tiny_folders, cls_data):
    out = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_folders["llama"], cls_data, out, "deep"))[0] == 0
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        tiny_folders["t5"],
        "--adapter",
        out / "adapter",
        "--data",
        cls_data / "dev.jsonl",
    )
    assert code == 2 and "made for another base model" in err and "model_type" in err


def test_yaml_config_is_saved_flags(tmp_path, capsys, tiny_folders, cls_data):
    out = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_folders["llama"], cls_data, out, "prompt"))[0] == 0
    saved = out / "config.yaml"
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "--config", saved, "train", "--output", again)
    assert code == 0, err
    a = load_file(out / "adapter" / "adapter.safetensors")["prompt"]
    b = load_file(again / "adapter" / "adapter.safetensors")["prompt"]
    assert torch.equal(a, b)  # same flags, same seed: the same adapter
    (tmp_path / "bad.yaml").write_text("methd: prompt\n")
    code, _, err = run_cli(capsys, "--config", tmp_path / "bad.yaml", "train")
    assert code == 2 and "unknown flag 'methd'" in err


# ------------------------------------------------------------------------------ processes


def _cli(*argv, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "softprompt.cli", *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_resume_after_kill_ends_with_the_same_adapter(tmp_path, tiny_folders, cls_data):
    common = [
        "train",
        "--model",
        tiny_folders["llama"],
        "--method",
        "prefix",
        "--train",
        cls_data / "train.jsonl",
        "--max-steps",
        16,
        "--batch-size",
        2,
        "--save-every",
        2,
        "--eval-every",
        100,
        "--num-virtual-tokens",
        3,
        "--prefix-hidden",
        16,
        "--no-progress",
    ]
    ref = _cli(*common, "--output", tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    run = tmp_path / "killed"
    proc = _cli(*common, "--output", run)
    deadline = time.time() + 300
    while time.time() < deadline:
        st = run / "checkpoint" / "trainer_state.json"
        if st.exists() and json.loads(st.read_text())["step"] >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert killed_at < 16
    res = _cli(*common, "--output", run, "--resume")
    assert res.wait(timeout=600) == 0, res.stderr.read()
    a = load_file(tmp_path / "ref" / "checkpoint" / "trainable.safetensors")
    b = load_file(run / "checkpoint" / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 16


def test_two_processes_reach_the_single_process_adapter(tmp_path, tiny_folders, cls_data):
    common = [
        "--model",
        tiny_folders["llama"],
        "--method",
        "deep",
        "--train",
        cls_data / "train.jsonl",
        "--max-steps",
        4,
        "--batch-size",
        4,
        "--eval-every",
        100,
        "--num-virtual-tokens",
        3,
        "--no-progress",
    ]
    one = _cli("train", *common, "--output", tmp_path / "one")
    assert one.wait(timeout=600) == 0, one.stderr.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--cpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "softprompt.cli",
            "train",
            *map(str, common),
            "--output",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")["prefix"]
    b = load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")["prefix"]
    assert not torch.equal(
        a, load_file(tmp_path / "one" / "checkpoint" / "trainable.safetensors")["prefix"] * 0
    )
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "prefix", "deep", "ptuning"])
def test_every_method_trains_from_the_cli_on_smollm2(tmp_path, capsys, cls_data, method):
    torch.set_num_threads(2)
    out = tmp_path / "smol"
    args = train_args(
        "smollm2-135m-instruct", cls_data, out, method, "--batch-size", 2, "--eval-limit", 2
    )
    args[args.index("--max-steps") + 1] = 2
    args[args.index("--prefix-hidden") + 1] = 64
    code, stdout, err = run_cli(capsys, *args)
    torch.set_num_threads(1)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == 2
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"]["model_type"] == "llama" and meta["base_model"]["vocab_size"] == 49152
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in log if "loss" in r)


# ------------------------------------------------------------------------------ trackers


def test_report_to_tensorboard_logs_what_metrics_jsonl_holds(
    tmp_path, capsys, tiny_folders, cls_data
):
    from test_trainer import jsonl_scalars, tracked_scalars

    out = tmp_path / "tb"
    argv = train_args(tiny_folders["llama"], cls_data, out, "prompt", "--report-to", "tensorboard")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    want = jsonl_scalars(out / "metrics.jsonl")
    got = tracked_scalars(out / "tracking" / "softprompt")
    assert set(got) == set(want) >= {"train/loss", "train/lr", "eval/accuracy"}
    assert [s for s, _ in got["eval/accuracy"]] == [2, 4]
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        torch.testing.assert_close(
            [v for _, v in got[tag]], [float(v) for _, v in points], rtol=1e-6, atol=1e-7
        )
    plain = tmp_path / "plain"  # the default, --report-to none: no tracker files at all
    assert run_cli(capsys, *train_args(tiny_folders["llama"], cls_data, plain, "prompt"))[0] == 0
    assert (plain / "metrics.jsonl").is_file() and not (plain / "tracking").exists()


def test_unknown_or_missing_tracker_is_an_error(tmp_path, capsys, tiny_folders, cls_data):
    argv = train_args(tiny_folders["llama"], cls_data, tmp_path / "x", "prompt")
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in [*argv, "--report-to", "tensorbored"]])
    assert e.value.code == 2
    assert "error: argument --report-to: invalid choice: 'tensorbored'" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("report_to: tensorbored\n")
    code, _, err = run_cli(capsys, "--config", tmp_path / "c.yaml", *argv)
    assert code == 2 and "error: --report-to must be one of" in err
    if importlib.util.find_spec("mlflow") is None:
        code, _, err = run_cli(capsys, *argv, "--report-to", "mlflow")
        assert code == 2 and "error: --report-to mlflow needs the mlflow package" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written
