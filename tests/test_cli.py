"""The command line end to end, with tiny models (real tokenizer) and small step counts."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar  # module level: dataclasses reads string ClassVar annotations here

import pytest
import torch
import yaml
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


@pytest.mark.parametrize("method", ["prompt", "prefix", "deep", "ptuning", "adaption_prompt"])
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
    # eval: JSON metrics on stdout, predictions.jsonl in the adapter folder
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
    own = ("adapter_config.json", "adapter.safetensors")  # not the predictions eval wrote there
    assert rep["bytes_on_disk"] == sum((out / "adapter" / f).stat().st_size for f in own)
    assert rep["adapter_parameters"] > 0


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
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["train_rows"] == 16


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
    # after the command too, as the README writes it (--config=F as well)
    third = tmp_path / "third"
    code, _, err = run_cli(capsys, "train", "--output", third, f"--config={saved}")
    assert code == 0, err
    assert torch.equal(a, load_file(third / "adapter" / "adapter.safetensors")["prompt"])
    from softprompt.cli import _hoist_config

    cmds = {"train": None, "eval": None}
    assert _hoist_config(["train", "--x", "1", "--config", "f"], cmds) == [
        "--config", "f", "train", "--x", "1"
    ]  # fmt: skip
    assert _hoist_config(["--config", "f", "train"], cmds) == ["--config", "f", "train"]
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
    out = res.stdout.read()  # it continued from the checkpoint, not from scratch
    assert f"at step {killed_at}" in out and "resumed from" in out, out
    a = load_file(tmp_path / "ref" / "checkpoint" / "trainable.safetensors")
    b = load_file(run / "checkpoint" / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 16

    def losses(folder):
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]

    # the log window that straddles the kill averages the same steps as the uninterrupted run
    ref_losses, got_losses = losses(tmp_path / "ref"), losses(run)
    assert [s for s, _ in got_losses] == [s for s, _ in ref_losses] == [10, 16]
    for (_, a), (_, b) in zip(got_losses, ref_losses, strict=True):
        assert abs(a - b) <= 1e-6


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


# ------------------------------------------------------------------------------ hardening


def run_cli_refused(capsys, *argv) -> str:
    """Run the CLI on argv that argparse must refuse; returns stderr (exit status 2 checked)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
        (["train", "--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
        (["train", "--lr", "-1"], "argument --lr: must be a finite number > 0"),
        (["train", "--lr", "0"], "argument --lr: must be a finite number > 0"),
        (["train", "--epochs", "inf"], "argument --epochs: must be a finite number > 0"),
        (["train", "--warmup-ratio", "2"], "argument --warmup-ratio: must be a finite number >= 0"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
        (["train", "--num-virtual-tokens", "0"], "argument --num-virtual-tokens: must be an"),
        (["train", "--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295]"),
        (["train", "--max-steps", "1.5"], "argument --max-steps: must be an integer, got '1.5'"),
        (["eval", "--adapter", "a", "--data", "d", "--batch-size", "0"], "argument --batch-size"),
        (["generate", "--adapter", "a", "x", "--batch-size", "0"], "argument --batch-size"),
        (["generate", "--adapter", "a", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", "--adapter", "a", "x", "--max-new-tokens", "0"], "must be an integer >= 1"),
    ],
)
def test_bad_numbers_are_refused_by_the_flags(capsys, argv, message):
    err = run_cli_refused(capsys, *argv)
    assert "error: " in err and message in err


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (
            "method: bogus\n",
            "method must be one of adaption_prompt, cartridge, deep, mpt, prefix, prompt, ptuning, "
            "got 'bogus'",
        ),
        ("lr: [0.1, 0.2]\n", "lr must be a single value, got [0.1, 0.2]"),
        ("lr: .nan\n", "lr must be a finite number > 0"),
        ("batch_size: 0\n", "batch_size must be an integer >= 1, got 0"),
        ("num-virtual-tokens: {a: 1}\n", "num-virtual-tokens must be a single value"),
        ("resume: 3\n", "resume must be true or false, got 3"),
        ("epochs: many\n", "epochs must be a number, got 'many'"),
        ("task: true\n", "task must be one of classify, generate,"),
    ],
)
def test_config_values_are_checked_like_flags(tmp_path, capsys, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    code, _, err = run_cli(capsys, "--config", tmp_path / "c.yaml", "train")
    assert (
        code == 2 and err.startswith(f"error: --config {tmp_path / 'c.yaml'}: ") and message in err
    )


def test_bad_train_setups_are_one_clear_message(tmp_path, capsys, tiny_folders, cls_data):
    llama = tiny_folders["llama"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--output", tmp_path / "file"], f"{tmp_path / 'file'} is a file, not a folder"),
        (["--output", tmp_path / "file" / "sub"], f"{tmp_path / 'file'} is a file, not a folder"),
        (["--model", tmp_path / "empty"], "the folder has no config.json"),
        (["--method", "prompt", "--layers", "top_half"], "--layers applies to per-layer methods"),
        (["--template", "Sentiment: {label}"], "has no {text}: the model would never see"),
        (["--num-virtual-tokens", 100_000], "num_virtual_tokens=100,000 does not fit the context"),
        (
            ["--method", "prompt", "--template", "[soft:99999999] {text} {label}"],
            "num_virtual_tokens=99,999,999 does not fit the context",
        ),
    ]
    for extra, message in cases:
        args = train_args(llama, cls_data, tmp_path / "run", "prefix")
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        start = time.time()
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and err.startswith("error: ") and message in err, (extra, err)
        assert time.time() - start < 60  # refused before anything of that size is built


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, tiny_folders):
    rows = [{"text": t, "label": lab} for t, lab in [("good fun", "pos"), ("bad film", "neg")] * 8]
    write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "run"
    args = train_args(tiny_folders["llama"], tmp_path, out, "prefix", "--lr", "1e37")
    for flag, value in (("--train", "t.jsonl"), ("--eval", "t.jsonl"), ("--eval-every", 1)):
        args[args.index(flag) + 1] = tmp_path / value if flag != "--eval-every" else value
    args[args.index("--max-steps") + 1] = 10
    code, _, err = run_cli(capsys, *args, "--save-every", 1)
    assert code == 2 and err.startswith("error: training stopped at step "), err
    stopped = int(err.split("step ")[1].split(":")[0])
    assert "is not finite" in err and "Lower --lr" in err
    if stopped == 1:  # the first update already overflowed (it does with this venv): nothing kept
        assert "Kept from before: nothing (no checkpoint was saved yet)" in err
        assert not (out / "checkpoint").exists() and not (out / "adapter").exists()
        assert not (out / "summary.json").exists()
        return
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert 1 <= state["step"] == stopped - 1  # the step before the bad one, nothing after it
    for f in ("checkpoint/trainable.safetensors", "checkpoint/adapter.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(out / f).values()), f
    assert all(
        torch.isfinite(t).all() for t in load_file(out / "adapter/adapter.safetensors").values()
    )
    assert not (out / "summary.json").exists()


def test_resume_refuses_changed_flags_and_damaged_files(tmp_path, capsys, tiny_folders, cls_data):
    out = tmp_path / "run"
    base = train_args(tiny_folders["llama"], cls_data, out, "prefix", "--save-every", 2)
    assert run_cli(capsys, *base)[0] == 0

    def resume(*changes):
        args = list(base)
        for flag, value in zip(changes[::2], changes[1::2], strict=True):
            args[args.index(flag) + 1] = value
        return run_cli(capsys, *args, "--resume")

    code, _, err = resume("--method", "prompt")
    assert code == 2 and "--method 'prefix' (checkpoint) vs 'prompt' (now)" in err
    code, _, err = resume("--num-virtual-tokens", 5)
    assert code == 2 and "--num-virtual-tokens 3 (checkpoint) vs 5 (now)" in err
    code, _, err = resume("--batch-size", 2)
    assert code == 2 and "--batch-size 4 (checkpoint) vs 2 (now)" in err
    args = [*base, "--lr", "0.5", "--seed", "1", "--resume"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--lr None (checkpoint) vs 0.5 (now)" in err
    assert "--seed 0 (checkpoint) vs 1 (now)" in err
    # extending the run is allowed; a half-written checkpoint of a killed run is removed
    stale = out / ".checkpoint.tmp-x1y2"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"partial")
    code, _, err = resume("--max-steps", 6)
    assert code == 0, err
    assert not stale.exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    optimizer = out / "checkpoint" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    code, _, err = resume("--max-steps", 8)
    assert code == 2 and err.startswith("error: --resume: ") and "optimizer.pt is damaged" in err


def test_inspect_counts_only_the_adapters_own_files_on_disk(tmp_path, capsys, tiny_folders):
    """bytes_on_disk: adapter_config.json, adapter.safetensors, trainable.safetensors (PEFT:
    adapter_config.json, adapter_model.safetensors), never what eval or export write beside."""
    from transformers import AutoModelForCausalLM

    import softprompt as sp
    from softprompt.export import export_peft

    model = sp.attach(
        AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]),
        sp.PromptTuningConfig(num_virtual_tokens=3),
    )
    ad = model.save_adapter(tmp_path / "run" / "adapter", trainable=True)
    peft = export_peft(ad, tmp_path / "peft", model=tiny_folders["llama"])
    for folder in (ad, peft):
        own = {f.name: f.stat().st_size for f in folder.iterdir()}
        assert set(own) in (
            {"adapter_config.json", "adapter.safetensors", "trainable.safetensors"},
            {"adapter_config.json", "adapter_model.safetensors"},
        )
        (folder / "predictions.jsonl").write_text("x" * 10_000)
        (folder / "ensemble_predictions.jsonl").write_text("x" * 10_000)
        (folder / "prompt_embeds.safetensors").write_bytes(b"x" * 10_000)
        for where in [ad, ad.parent] if folder == ad else [folder]:  # and the run folder
            code, stdout, err = run_cli(capsys, "inspect", where, "--json")
            assert code == 0, err
            assert json.loads(stdout)["bytes_on_disk"] == sum(own.values())


def test_a_bad_predictions_path_is_refused_before_the_model_loads(
    tmp_path, capsys, tiny_folders, cls_data
):
    """eval --predictions at a folder or below a file (one adapter or an ensemble): one error
    line naming the flag, before any work (--model names no model: loading it would be the
    error instead); a missing parent folder is created."""
    from transformers import AutoModelForCausalLM

    import softprompt as sp
    from softprompt.tasks import TaskSpec

    model = sp.attach(
        AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]),
        sp.PromptTuningConfig(num_virtual_tokens=3),
    )
    spec = TaskSpec(kind="classify", template="{text} -> {label}", labels=["negative", "positive"])
    model.adapters["default"].task = spec.to_dict()
    ad = model.save_adapter(tmp_path / "ad")
    (tmp_path / "a_file").write_text("x")
    data = ["--data", cls_data / "dev.jsonl"]
    capsys.readouterr()
    for adapters, name in (
        (["--adapter", ad], "predictions"),
        (["--adapter", ad] * 2, "ensemble_predictions"),
    ):
        for where, message in (
            (tmp_path, f" is a folder; give a file path (e.g. {tmp_path / name}.jsonl)"),
            (tmp_path / "a_file" / "p.jsonl", f": {tmp_path / 'a_file'} is a file, not a folder"),
        ):
            code, out, err = run_cli(
                capsys, "eval", *adapters, *data, "--predictions", where, "--model", tmp_path / "x"
            )
            assert (code, out, err) == (2, "", f"error: --predictions {where}{message}\n")
        target = tmp_path / name / "new" / "p.jsonl"
        code, out, err = run_cli(capsys, "eval", *adapters, *data, "--predictions", target)
        assert code == 0 and err.endswith(f"predictions: {target}\n")
        assert len(target.read_text().splitlines()) == 6


def test_a_run_folder_is_taken_for_its_adapter(tmp_path, capsys, tiny_folders, cls_data):
    out = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_folders["llama"], cls_data, out, "prompt"))[0] == 0
    got = []
    for where in (out / "adapter", out):
        code, stdout, err = run_cli(
            capsys, "eval", "--model", tiny_folders["llama"], "--adapter", where, "--data",
            cls_data / "dev.jsonl",
        )  # fmt: skip
        assert code == 0, err
        got.append(json.loads(stdout))
    assert got[0] == got[1] and "accuracy" in got[0]
    code, stdout, _ = run_cli(capsys, "inspect", out, "--model", tiny_folders["llama"], "--json")
    assert code == 0 and json.loads(stdout)["method"] == "prompt"


def test_selection_reads_dev_only_and_the_test_set_twice(
    tmp_path, capsys, tiny_folders, cls_data, monkeypatch
):
    """Model selection and early stopping see the dev rows only; the test rows are evaluated
    exactly twice: zero-shot before training and with the selected adapter after it."""
    from softprompt.trainer import Trainer

    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "fine", "label": "positive"}] * 3)
    seen = []
    evaluate = Trainer.evaluate

    def spy(self, examples):
        seen.append({ex.source for ex in examples})
        return evaluate(self, examples)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    args = train_args(tiny_folders["llama"], cls_data, tmp_path / "o", "prompt", "--test", test)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    dev, tst = str(cls_data / "dev.jsonl"), str(test)
    assert seen == [{tst}, {dev}, {dev}, {tst}], seen  # zero-shot, steps 2 and 4, tuned


# ------------------------------------------------------------------------------ a fifth method


def test_a_registered_fifth_method_trains_evaluates_and_loads_from_the_cli(
    tmp_path, capsys, tiny_folders, cls_data
):
    """A new method is one file plus register_method: its config declares its level, default
    rate and CLI flags, and train / eval / load_adapter take it with no other change."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    import softprompt as sp
    from softprompt.methods.base import (
        METHODS,
        Adapter,
        AdapterConfig,
        init_embeddings,
        register_method,
    )

    @dataclass
    class GatedPromptConfig(AdapterConfig):
        inits: ClassVar[tuple[str, ...]] = ("vocab", "random")
        level: ClassVar[str] = "input"
        default_lr: ClassVar[float] = 0.5
        lr_relative_to_embeddings: ClassVar[bool] = True
        cli_fields: ClassVar[dict[str, str]] = {"seed": "gate_seed"}
        gate_seed: int = 0

    class GatedPrompt(Adapter):
        """Virtual tokens times a trainable per-token gate."""

        def __init__(self, config, info, ctx):
            super().__init__(config, info)
            n, d = config.num_virtual_tokens, info.hidden_size
            self.embedding = nn.Parameter(
                init_embeddings(config, ctx) if ctx else torch.zeros(n, d)
            )
            self.gate = nn.Parameter(torch.ones(n, 1))

        def input_prompt(self):
            return self.embedding * self.gate

        def baked_tensors(self):
            return {"prompt": self.input_prompt()}

        def load_baked(self, tensors):
            self.embedding.data.copy_(tensors["prompt"])
            self.gate.data.fill_(1.0)

    register_method("gated", GatedPromptConfig, GatedPrompt)
    try:
        out = tmp_path / "gated"
        args = train_args(tiny_folders["llama"], cls_data, out, "gated")
        code, stdout, err = run_cli(
            capsys, *args, "--max-steps", 20, "--patience", 100, "--init", "random"
        )
        assert code == 0, err
        meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert meta["method"] == "gated" and meta["config"]["gate_seed"] == 0
        summary = json.loads((out / "summary.json").read_text())
        emb = AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]).get_input_embeddings()
        rms = emb.weight.float().pow(2).mean().sqrt().item()
        assert summary["train"]["lr"] == float(f"{0.5 * rms:.2g}")  # the method's own default
        losses = [
            json.loads(x)["loss"]
            for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)
        ]
        assert len(losses) == 2 and losses[-1] < losses[0]  # steps 1-10, then 11-20
        code, stdout, err = run_cli(
            capsys, "eval", "--adapter", out, "--data", cls_data / "dev.jsonl"
        )
        assert code == 0, err
        assert 0 <= json.loads(stdout.splitlines()[-1])["accuracy"] <= 1
        model = sp.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]), out)
        assert model.adapters["default"].config.method == "gated"
        # [soft:N] templates need an input-level method: the error lists them, gated included
        code, _, err = run_cli(
            capsys,
            *train_args(tiny_folders["llama"], cls_data, tmp_path / "d", "deep"),
            "--template",
            "[soft:2] {text} -> {label}",
        )
        assert code == 2 and "gated" in err and "prompt" in err
    finally:
        METHODS.pop("gated")


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
    assert code == 2 and "c.yaml: report_to must be one of" in err and "tensorbored" in err
    if importlib.util.find_spec("mlflow") is None:
        code, _, err = run_cli(capsys, *argv, "--report-to", "mlflow")
        assert code == 2 and "error: --report-to mlflow needs the mlflow package" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_template_escapes_are_read_as_a_shell_user_means_them(
    tmp_path, capsys, tiny_folders, cls_data
):
    """A shell's double quotes keep the backslash of "...{text}\\nSentiment..." : the CLI reads
    \\n as the newline the user means (a literal backslash-n would match no real prompt)."""
    out = tmp_path / "esc"
    args = train_args(tiny_folders["llama"], cls_data, out, "prefix")
    code, _, err = run_cli(capsys, *args, "--template", r"Review \\ {text}\nSentiment:\t{label}")
    assert code == 0, err
    task = json.loads((out / "adapter" / "adapter_config.json").read_text())["task"]
    assert task["template"] == "Review \\ {text}\nSentiment:\t{label}"


def test_demo_runs_end_to_end_and_labels_new_reviews(
    tmp_path, capsys, tiny_folders, cls_data, monkeypatch
):
    """The demo's own code path (train, select, test, label three reviews) on a tiny model: the
    real demo is the README's main job and runs for minutes."""
    import softprompt.cli as cli

    demo = dict(cli.DEMO, model=tiny_folders["llama"], train=cls_data / "train.jsonl")
    demo.update(eval=cls_data / "dev.jsonl", test=cls_data / "dev.jsonl", eval_every=2)
    monkeypatch.setattr(cli, "DEMO", demo)
    code, stdout, err = run_cli(capsys, "demo", "--max-steps", 2, "--output", tmp_path / "demo")
    assert code == 0, err
    labelled = stdout.split("labelled by the tuned adapter:")[1].strip().splitlines()
    assert len(labelled) == 3
    assert all(line.split()[0] in ("positive", "negative") for line in labelled)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and "accuracy" in summary["test"]


def test_train_flag_defaults_are_the_dataclasses_defaults():
    """The CLI repeats no default: each train flag's default is the field default of the
    dataclass that takes it (TrainArgs, TaskSpec, the method configs)."""
    import dataclasses

    from softprompt.cli import build_parser
    from softprompt.methods import METHODS
    from softprompt.tasks import TaskSpec
    from softprompt.trainer import TrainArgs

    args = build_parser().parse_args(["train"])
    for cls in (TrainArgs, TaskSpec):
        for f in dataclasses.fields(cls):
            if hasattr(args, f.name) and f.default is not dataclasses.MISSING:
                assert getattr(args, f.name) == f.default, f.name
    assert args.prefix_hidden == METHODS["prefix"][0]().encoder_hidden_size
    assert args.encoder == METHODS["ptuning"][0]().encoder
    # --init: None resolves per method (vocab where it takes it, else the method's own: the
    # adaption prompt's random)
    assert args.init is None and METHODS["prompt"][0]().init == "vocab"
    for cls, _ in METHODS.values():
        assert args.num_virtual_tokens == cls().num_virtual_tokens == 10
    # and the help text is the field's docstring entry, not a second copy
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    helps = {a.dest: a.help for a in train._actions}  # noqa: SLF001
    assert helps["patience"].startswith("dev evaluations without improvement")
    assert helps["patience"].endswith("(default: %(default)s)")
    assert helps["num_virtual_tokens"].startswith("number of virtual tokens")


# ------------------------------------------------------------------------------ chat


def _chat_rows():
    system = {"role": "system", "content": "Answer yes or no."}
    return [
        {
            "messages": [
                system,
                {"role": "user", "content": f"Is {t} good?"},
                {"role": "assistant", "content": "yes" if t in POS else "no"},
            ]
        }
        for t in POS + NEG
    ]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_chat_task_trains_evaluates_and_generates(tmp_path, capsys, tiny_folders, method):
    data = write_jsonl(tmp_path / "chat.jsonl", _chat_rows())
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        *train_args(tiny_folders["llama"], tmp_path, out, method),
        "--task",
        "chat",
        "--placement",
        "answer",
        "--loss-turns",
        "last",
        "--max-new-tokens",
        3,
        "--train",
        data,
        "--eval",
        data,
        "--test",
        data,
    )
    assert code == 0, err
    assert "zero-shot rougeL" in stdout and "tuned rougeL" in stdout
    task = json.loads((out / "adapter" / "adapter_config.json").read_text())["task"]
    assert task["kind"] == "chat" and task["placement"] == "answer"
    assert task["loss_turns"] == "last" and task["soft_tokens"] == (3 if method == "prompt" else 0)
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        tiny_folders["llama"],
        "--adapter",
        out / "adapter",
        "--data",
        data,
    )
    assert code == 0, err
    metrics = json.loads(stdout)
    assert set(metrics) >= {"exact_match", "rougeL"} and metrics["n"] == 8
    assert metrics["exact_match"] == summary["test"]["exact_match"]
    assert metrics["rougeL"] == pytest.approx(summary["test"]["rougeL"])
    preds = [
        json.loads(x) for x in (out / "adapter" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["messages"] for p in preds] == [r["messages"] for r in _chat_rows()]
    code, stdout, err = run_cli(
        capsys, "generate", "--model", tiny_folders["llama"], "--adapter", out / "adapter", "Hi"
    )
    (line,) = [json.loads(x) for x in stdout.splitlines()]
    assert code == 0 and line["messages"] == [{"role": "user", "content": "Hi"}]
    assert isinstance(line["output"], str)


def test_classify_in_chat_form_from_the_cli(tmp_path, capsys, tiny_folders, cls_data):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        *train_args(
            tiny_folders["llama"], cls_data, out, "prompt", "--test", cls_data / "dev.jsonl"
        ),
        "--chat",
        "--system",
        "Answer positive or negative.",
        "--placement",
        "start",
    )
    assert code == 0, err
    assert "tuned accuracy" in stdout
    task = json.loads((out / "adapter" / "adapter_config.json").read_text())["task"]
    assert task["chat"] is True and task["template"] == "{text}" and task["soft_tokens"] == 3
    assert task["system"] == "Answer positive or negative." and task["placement"] == "start"
    code, stdout, err = run_cli(
        capsys, "generate", "--model", tiny_folders["llama"], "--adapter", out / "adapter", "fun"
    )
    (line,) = [json.loads(x) for x in stdout.splitlines()]
    assert code == 0 and line["label"] in ("negative", "positive")
    assert abs(sum(line["scores"].values()) - 1) < 1e-4


def test_chat_errors_are_one_clear_message(tmp_path, capsys, tiny_folders, cls_data):
    from transformers import AutoTokenizer

    bad = _chat_rows()[:2] + [
        {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", bad)
    base = train_args(tiny_folders["llama"], cls_data, tmp_path / "o", "prompt")
    code, _, err = run_cli(capsys, *base, "--task", "chat", "--train", data, "--eval", data)
    assert code == 2 and f"{data}:3: field 'messages[1].role' is 'bot'" in err
    code, _, err = run_cli(capsys, *base, "--task", "generate", "--chat")
    assert code == 2 and "--chat is for --task classify" in err
    # a model whose tokenizer has no chat template
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in Path(tiny_folders["llama"]).iterdir():
        if f.name.startswith(("config", "model", "generation")):
            (plain / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(tiny_folders["llama"])
    tok.chat_template = None
    tok.save_pretrained(plain)
    assert AutoTokenizer.from_pretrained(plain).chat_template is None
    rows = write_jsonl(tmp_path / "ok.jsonl", _chat_rows())
    args = train_args(plain, cls_data, tmp_path / "o2", "prompt")
    code, _, err = run_cli(capsys, *args, "--task", "chat", "--train", rows, "--eval", rows)
    assert code == 2 and "has no chat template" in err and "Traceback" not in err


def test_mpt_stage_two_from_the_cli(tmp_path, capsys, tiny_folders, cls_data):
    """Stage 1 (prompt tuning) then stage 2 (mpt on its prompt, shared frozen): the saved stage-2
    adapter names its shared source and rank; its trainable file keeps the shared prompt."""
    llama = tiny_folders["llama"]
    code, _, err = run_cli(capsys, *train_args(llama, cls_data, tmp_path / "s1", "prompt"))
    assert code == 0, err
    stage2 = train_args(
        llama,
        cls_data,
        tmp_path / "s2",
        "mpt",
        "--shared-from",
        tmp_path / "s1" / "adapter",
        "--num-ranks",
        2,
        "--freeze-shared",
    )
    code, _, err = run_cli(capsys, *stage2)
    assert code == 0, err
    cfg = json.loads((tmp_path / "s2" / "adapter" / "adapter_config.json").read_text())["config"]
    assert cfg["method"] == "mpt" and cfg["num_ranks"] == 2 and cfg["train_shared"] is False
    assert cfg["shared_init_from"] == str(tmp_path / "s1" / "adapter")
    s1 = load_file(str(tmp_path / "s1" / "adapter" / "adapter.safetensors"))["prompt"]
    (state,) = list((tmp_path / "s2").rglob("trainable.safetensors"))
    state = load_file(str(state))
    assert torch.equal(state["shared"], s1)  # frozen: the shared prompt never moved
    assert state["cols"].shape == (1, 3, 2) and state["rows"].shape[:2] == (1, 2)


def test_compile_trains_the_same_adapter(tmp_path, capsys, tiny_folders, cls_data, monkeypatch):
    """train --compile: the frozen blocks compiled (here with dynamo's aot_eager backend, the
    inductor run is tests/test_model.py's), the same logged losses, dev accuracy and adapter as
    without."""
    import torch._dynamo

    from softprompt.model import SoftPromptModel

    compiled = []
    compile_body = SoftPromptModel.compile_body

    def aot_eager(self, **kw):
        compiled.append(self)
        return compile_body(self, backend="aot_eager", **kw)

    monkeypatch.setattr(SoftPromptModel, "compile_body", aot_eager)
    torch._dynamo.reset()
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        argv = train_args(tiny_folders["llama"], cls_data, tmp_path / name, "prefix", *extra)
        code, _, _ = run_cli(capsys, *argv)
        assert code == 0
        log = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = (
            [json.loads(x) for x in log],
            load_file(tmp_path / name / "adapter" / "adapter.safetensors"),
        )
    torch._dynamo.reset()
    assert len(compiled) == 1 and compiled[0]._compiled
    (want, want_ad), (got, got_ad) = runs["eager"], runs["compiled"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        if "loss" in w:
            assert abs(g["loss"] - w["loss"]) <= 1e-5 * max(1.0, abs(w["loss"]))
        else:
            assert g["eval"] == w["eval"]
    assert want_ad.keys() == got_ad.keys()
    for k in want_ad:
        torch.testing.assert_close(got_ad[k], want_ad[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "prefix", "--layers", "1,x"], "--layers must be 'all', 'top_half' or e.g."),
        (["--init", "text"], "--init text needs --init-text"),
        (
            ["--init-text", "the movie was"],
            "--init-text is the text for --init text, but --init is vocab: add --init text, or "
            "drop --init-text",
        ),
        (["--verbalizer", "{bad"], "--verbalizer is not valid JSON: Expecting property name"),
        (
            ["--verbalizer", '["great", "bad"]'],
            "--verbalizer must be a JSON object of label: word strings, e.g. "
            '\'{"positive": "great"}\', got \'["great", "bad"]\'',
        ),
        (
            ["--verbalizer", '{"positive": 1}'],
            "--verbalizer must be a JSON object of label: word strings, e.g. "
            '\'{"positive": "great"}\', got \'{"positive": 1}\'',
        ),
        (
            ["--task", "generate", "--train", "{gen}", "--verbalizer", '{"a": "b"}'],
            "--verbalizer applies to --task classify (label -> word), not generate: drop it",
        ),
        (
            ["--task", "generate", "--train", "{gen}", "--init", "labels"],
            "--init labels applies to --task classify, not generate",
        ),
        (
            ["--method", "prefix", "--template", "[soft:2]{text}{label}"],
            "--template has soft segments ([soft:N]) but --method prefix puts its prompt inside "
            "attention",
        ),
        (
            ["--template", "Review:{label}"],
            "template 'Review:{label}' has no {text}: the model would never see the input",
        ),
    ],
)
def test_flag_errors_come_before_the_model_loads(tmp_path, capsys, cls_data, extra, message):
    train, gen = cls_data / "train.jsonl", cls_data / "gen.jsonl"
    extra = [x.replace("{train}", str(train)).replace("{gen}", str(gen)) for x in extra]
    if "--train" not in extra:
        extra += ["--train", str(train)]
    code, _, err = run_cli(
        capsys, "train", "--model", tmp_path / "no_such_model", "--output", tmp_path / "run",
        "--method", "prompt", "--max-steps", 1, *extra,
    )  # fmt: skip
    message = message.replace("{train}", str(train))
    assert code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_a_templates_soft_tokens_are_the_recorded_number(tmp_path, capsys, tiny_folders, cls_data):
    out = tmp_path / "run"
    argv = train_args(tiny_folders["llama"], cls_data, out, "prompt")  # --num-virtual-tokens 3
    code, _, err = run_cli(capsys, *argv, "--template", "[soft:2] {text} {label}")
    assert code == 0, err
    assert (
        "warning: --num-virtual-tokens 3 is ignored: the template's [soft:N] segments decide the "
        "number (2 in all); drop the flag or make it 2"
    ) in err.splitlines()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["num_virtual_tokens"] == meta["config"]["num_virtual_tokens"] == 2


def test_verbalizer_keys_that_are_no_label_are_refused(tmp_path, capsys, tiny_folders, cls_data):
    argv = train_args(tiny_folders["llama"], cls_data, tmp_path / "run", "prompt")
    for words, named in (
        ('{"postive": "great", "negative": "bad"}', "'postive', which is not a label"),
        ('{"postive": "great", "nope": "x"}', "'postive', 'nope', which are not labels"),
    ):
        code, _, err = run_cli(capsys, *argv, "--verbalizer", words)
        assert code == 2 and err == (
            f"error: --verbalizer names {named} of {cls_data / 'train.jsonl'} (labels: "
            "'negative', 'positive'); fix the key(s)\n"
        )
