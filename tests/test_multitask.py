"""Several tasks in one run (softprompt.multitask): mixed-batch losses, per-task gradients and
updates, the CLI's files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturb
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import softprompt as sp
from softprompt.cli import main
from softprompt.data import Example
from softprompt.errors import SoftPromptError
from softprompt.multitask import MultiTaskTrainer, mixed_losses, parse_tasks
from softprompt.tasks import Task, TaskSpec
from softprompt.trainer import TrainArgs, Trainer

POS = ["a wonderful, moving film", "brilliant and funny", "a joy to watch", "great acting"]
NEG = ["a dull, tedious mess", "boring and far too long", "awful script", "a waste of time"]


def sentiment_rows() -> list[Example]:
    rows = [{"text": t, "label": "pos"} for t in POS] + [{"text": t, "label": "neg"} for t in NEG]
    return [Example(r, "s", i + 1) for i, r in enumerate(rows)]


def length_rows() -> list[Example]:  # another label set (multi-token label words)
    rows = [{"text": t, "label": "long review" if len(t) > 14 else "short one"} for t in POS + NEG]
    return [Example(r, "l", i + 1) for i, r in enumerate(rows)]


def gen_rows() -> list[Example]:
    rows = [{"input": f"say {w}", "target": w} for w in ["yes", "no", "maybe", "hello"]]
    return [Example(r, "g", i + 1) for i, r in enumerate(rows)]


SPECS = {
    "sent": TaskSpec(kind="classify", template="{text} -> {label}", labels=["neg", "pos"]),
    "size": TaskSpec(
        kind="classify",
        template="Text: {text}\nLength: {label}",
        labels=["long review", "short one"],
    ),
    "echo": TaskSpec(kind="generate", template="{input} =", max_new_tokens=3),
}
ROWS = {"sent": sentiment_rows, "size": length_rows, "echo": gen_rows}


def build(path: str, method: str = "prompt") -> tuple[sp.SoftPromptModel, dict[str, Task]]:
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
    tok = AutoTokenizer.from_pretrained(path)
    for name in SPECS:
        cfg = (
            sp.PromptTuningConfig(num_virtual_tokens=2, seed=0)
            if method == "prompt"
            else sp.PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8, seed=0)
        )
        model.add_adapter(name, cfg)
        model.adapters[name].task = SPECS[name].to_dict()
    perturb(model)
    return model, {n: Task(s, model, tok) for n, s in SPECS.items()}


def test_parse_tasks_refuses_clashing_and_bad_names():
    assert parse_tasks("a=x.jsonl, b=rotten-tomatoes:train") == {
        "a": "x.jsonl",
        "b": "rotten-tomatoes:train",
    }
    for bad, msg in [
        ("a=x,a=y", "clashes with 'a'"),
        ("sent=x,Sent=y", "clashes with 'sent'"),
        ("a/b=x", "may only hold"),
        ("a", "is not name=data"),
        ("", "needs name=data"),
    ]:
        with pytest.raises(SoftPromptError, match=msg):
            parse_tasks(bad)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_mixed_batch_losses_and_gradients_are_each_tasks_own(tiny_folders, method):
    model, tasks = build(tiny_folders["llama"], method)
    enc = {n: [tasks[n].encode(ex) for ex in ROWS[n]()] for n in tasks}
    # rows of the three tasks interleaved in one batch
    batch = [(n, enc[n][i]) for i in range(4) for n in ("sent", "size", "echo")]
    model.set_trainable(list(tasks))
    model.train()
    losses = mixed_losses(model, tasks, batch)
    sum(losses.values()).backward()
    mixed_grads = {n: [p.grad.clone() for p in model.adapters[n].parameters()] for n in tasks}
    for name, task in tasks.items():
        model.zero_grad(set_to_none=True)
        with model.using(name):
            alone = task.loss([item for n, item in batch if n == name])
            alone.backward()
            torch.testing.assert_close(losses[name], alone, atol=1e-5, rtol=1e-5)
            for g, p in zip(mixed_grads[name], model.adapters[name].parameters(), strict=True):
                torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    # a batch without task 'echo' gives its adapter no gradient at all
    model.zero_grad(set_to_none=True)
    model.set_trainable(list(tasks))
    part = [(n, it) for n, it in batch if n != "echo"]
    sum(mixed_losses(model, tasks, part).values()).backward()
    assert all(p.grad is None for p in model.adapters["echo"].parameters())
    assert all(p.grad is not None for p in model.adapters["sent"].parameters())


def test_a_chat_tasks_earlier_answers_are_supervised_in_a_mixed_batch(tiny_folders):
    """A chat task (loss on every assistant turn) beside a classify task: its mixed loss is
    its own ``Task.loss``; before, the earlier assistant turns were dropped from it."""
    from softprompt.tasks import CHAT_TEMPLATE

    path = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
    tok = AutoTokenizer.from_pretrained(path)
    specs = {"sent": SPECS["sent"], "talk": TaskSpec(kind="chat", template=CHAT_TEMPLATE)}
    for name, spec in specs.items():
        model.add_adapter(name, sp.PromptTuningConfig(num_virtual_tokens=2, seed=0))
        model.adapters[name].task = spec.to_dict()
    perturb(model)
    tasks = {n: Task(s, model, tok) for n, s in specs.items()}
    turns = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
    ]
    talk = tasks["talk"].encode(Example({"messages": turns}, "c", 1))
    assert any(x != -100 for x in talk["prompt_labels"])  # the first answer is supervised
    sent = tasks["sent"].encode(sentiment_rows()[0])
    model.set_trainable(list(tasks))
    with torch.no_grad():
        losses = mixed_losses(model, tasks, [("sent", sent), ("talk", talk)])
        with model.using("talk"):
            torch.testing.assert_close(losses["talk"], tasks["talk"].loss([talk]))


def test_one_multi_task_step_equals_each_task_trained_alone(tiny_folders, tmp_path):
    model, tasks = build(tiny_folders["llama"])
    start = {n: {k: v.clone() for k, v in model.adapters[n].state_dict().items()} for n in tasks}
    kw = dict(max_steps=1, warmup_ratio=0.0, lr=0.05, progress=False, eval_every=1)
    n_rows = sum(len(ROWS[n]()) for n in tasks)
    multi = MultiTaskTrainer(
        model,
        {n: (tasks[n], ROWS[n](), []) for n in tasks},
        TrainArgs(output_dir=str(tmp_path / "multi"), batch_size=n_rows, **kw),
        log=lambda _: None,
    )
    result = multi.train()
    assert result["steps"] == 1
    after = {n: {k: v.clone() for k, v in model.adapters[n].state_dict().items()} for n in tasks}
    for name, task in tasks.items():
        with torch.no_grad():  # back to the start, then one step of this task alone
            for k, v in model.adapters[name].state_dict().items():
                v.copy_(start[name][k])
        model.set_active(name)
        rows = ROWS[name]()
        args = TrainArgs(output_dir=str(tmp_path / name), batch_size=len(rows), **kw)
        Trainer(model, task, rows, None, args, log=lambda _: None).train()
        moved = 0.0
        for k, v in model.adapters[name].state_dict().items():
            torch.testing.assert_close(after[name][k], v, atol=1e-6, rtol=1e-5)
            moved = max(moved, float((v - start[name][k]).abs().max()))
        assert moved > 1e-3  # the step did something
        saved = load_file(tmp_path / "multi" / name / "adapter" / "adapter.safetensors")
        baked = model.adapters[name].baked_tensors()
        for k, v in baked.items():
            torch.testing.assert_close(saved[k], v.detach(), atol=1e-6, rtol=1e-5)


def test_early_stopping_stops_one_task_and_the_others_go_on(tiny_folders, tmp_path, monkeypatch):
    model, tasks = build(tiny_folders["llama"])
    dev = {n: ROWS[n]()[:4] for n in tasks}
    scores = {
        "sent": iter([0.5, 0.4, 0.4, 0.4, 0.4, 0.4]),
        "size": iter([0.1 * k for k in range(1, 9)]),
    }

    def fake(self, name):
        return {"accuracy": next(scores[name])} if name in scores else {"rougeL": 0.0}

    monkeypatch.setattr(MultiTaskTrainer, "evaluate", fake)
    args = TrainArgs(
        output_dir=str(tmp_path),
        batch_size=6,
        max_steps=8,
        eval_every=2,
        patience=2,
        progress=False,
        lr=0.01,
        log_every=1,
    )
    tr = MultiTaskTrainer(
        model, {n: (tasks[n], ROWS[n](), dev[n]) for n in tasks}, args, log=lambda _: None
    )
    result = tr.train()
    t = result["tasks"]
    assert (
        t["sent"]["stopped_at"] == 6 and t["sent"]["best"] == 0.5 and t["sent"]["adapter_step"] == 2
    )
    assert t["size"]["stopped_at"] is None and t["size"]["adapter_step"] == 8
    assert t["size"]["best"] == pytest.approx(0.4)
    lines = [json.loads(x) for x in (tmp_path / "sent" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval" in r] == [2, 4, 6]
    # after 'sent' stopped at step 6 its adapter got no rows and no updates; 'size' went on
    trained = [r["step"] for r in lines if "loss" in r]
    assert max(trained) <= 6 and t["sent"]["updates"] == len(trained)
    size = [json.loads(x) for x in (tmp_path / "size" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in size if "loss" in r) > 6


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_tasks_from_the_cli_writes_one_adapter_per_task(tiny_folders, tmp_path, capsys):
    sent = write_jsonl(tmp_path / "sent.jsonl", [e.fields for e in sentiment_rows()])
    size = write_jsonl(
        tmp_path / "size.jsonl",
        [
            {"text": e.fields["text"], "label": "long" if len(e.fields["text"]) > 14 else "short"}
            for e in sentiment_rows()
        ],
    )
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        tiny_folders["llama"],
        "--method",
        "prompt",
        "--tasks",
        f"sent={sent},size={size}",
        "--tasks-eval",
        f"sent={sent},size={size}",
        "--task-template",
        "size=Text: {text}\\nLength: {label}",
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
        "--no-progress",
    ]
    assert main([str(a) for a in argv]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == 4
    for name, labels in [("sent", ["neg", "pos"]), ("size", ["long", "short"])]:
        meta = json.loads((out / name / "adapter" / "adapter_config.json").read_text())
        assert meta["name"] == name and meta["method"] == "prompt"
        assert meta["task"]["labels"] == labels
        tensors = load_file(out / name / "adapter" / "adapter.safetensors")
        assert list(tensors) == ["prompt"] and tuple(tensors["prompt"].shape)[0] == 3
        evals = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in evals if "eval" in r] == [2, 4]
        assert 0.0 <= summary["tasks"][name]["best"] <= 1.0
    size_meta = json.loads((out / "size" / "adapter" / "adapter_config.json").read_text())
    assert size_meta["task"]["template"] == "Text: {text}\nLength: {label}"
    # the adapter works with eval as any other
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "size"), "--data", str(size)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0


def test_train_tasks_bad_input_is_refused_before_anything_is_written(
    tiny_folders, tmp_path, capsys
):
    sent = write_jsonl(tmp_path / "sent.jsonl", [e.fields for e in sentiment_rows()])
    base = ["train", "--model", tiny_folders["llama"], "--no-progress"]
    cases = [
        (["--tasks", f"a={sent},A={sent}"], "clashes with 'a'"),
        (["--tasks", f"a={sent}", "--tasks-eval", f"b={sent}"], "not in --tasks"),
        (["--tasks", f"a={sent}", "--train", sent], "--train cannot go with --tasks"),
        (["--tasks", f"a={sent}", "--compile"], "--compile cannot go with --tasks"),
        (["--tasks", f"a={sent},b={tmp_path / 'missing.jsonl'}"], "task 'b'"),
        (["--tasks", f"a={sent}", "--grad-accum", "2"], "--grad-accum 1"),
    ]
    for extra, msg in cases:
        out = tmp_path / "never"
        assert main([str(a) for a in (*base, *extra, "--output", out)]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()


def build_mpt(path: str, **cfg) -> tuple[sp.SoftPromptModel, dict[str, Task]]:
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
    tok = AutoTokenizer.from_pretrained(path)
    for k, name in enumerate(SPECS):
        model.add_adapter(
            name, sp.MultitaskPromptConfig(num_virtual_tokens=3, num_ranks=2, seed=k, **cfg)
        )
        model.adapters[name].task = SPECS[name].to_dict()
    return model, {n: Task(s, model, tok) for n, s in SPECS.items()}


def test_mpt_stage_one_trains_one_shared_prompt_on_every_task(tiny_folders, tmp_path):
    """``--method mpt --tasks``: the tasks' adapters hold ONE shared prompt (updated once a step
    by the summed losses' gradient: AdamW's first step is -lr * g / (|g| + eps) with g the sum
    of each task's own gradient), each task its own factors; the shared prompt after the run is
    saved as a prompt-tuning folder that stage 2's ``shared_init_from`` reads exactly."""
    model, tasks = build_mpt(tiny_folders["llama"])
    names = list(tasks)
    enc = {n: [tasks[n].encode(ex) for ex in ROWS[n]()] for n in names}
    lr = 0.05
    multi = MultiTaskTrainer(
        model,
        {n: (tasks[n], ROWS[n](), []) for n in names},
        TrainArgs(
            output_dir=str(tmp_path / "multi"),
            batch_size=sum(len(v) for v in enc.values()),
            max_steps=1,
            warmup_ratio=0.0,
            lr=lr,
            progress=False,
            eval_every=1,
        ),
        log=lambda _: None,
    )
    assert multi.shared is not None
    assert all(model.adapters[n].shared is multi.shared for n in names)  # tied
    start = model.adapters[names[0]].shared.detach().clone()
    # the reference gradient: each task's own loss on its rows, summed over the tasks
    grad = torch.zeros_like(start)
    for n in names:
        model.zero_grad(set_to_none=True)
        with model.using(n):
            tasks[n].loss(enc[n]).backward()
        grad += model.adapters[n].shared.grad
    factors = {n: model.adapters[n].cols.detach().clone() for n in names}
    # set_trainable keeps the tied prompt trainable while any task trains
    model.set_trainable([names[-1]])
    assert multi.shared.requires_grad and not model.adapters[names[0]].cols.requires_grad
    result = multi.train()
    # linear decay over 1 step: the step used lr * 1; Adam's first step: g / (|g| + eps)
    want = start - lr * grad / (grad.abs() + 1e-8)
    after = torch.as_tensor(model.adapters[names[0]].shared.detach())
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-4)
    for n in names:  # every task's factors moved; afterwards each adapter has its own copy
        assert float((model.adapters[n].cols - factors[n]).abs().max()) > 1e-3
        assert model.adapters[n].shared is not model.adapters[names[0]].shared or n == names[0]
    folder = Path(result["shared_prompt"])
    assert folder == tmp_path / "multi" / "shared" / "adapter"
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["method"] == "prompt"
    saved = load_file(folder / "adapter.safetensors")["prompt"]
    torch.testing.assert_close(saved, after, atol=0, rtol=0)
    # stage 2 starts from it
    target = model.add_adapter(
        "target", sp.MultitaskPromptConfig(num_virtual_tokens=3, shared_init_from=str(folder))
    )
    torch.testing.assert_close(target.shared.detach(), after, atol=0, rtol=0)


def test_a_frozen_shared_prompt_stays_frozen_in_a_tasks_run(tiny_folders, tmp_path):
    """MPT stage 2 for several targets at once (``--freeze-shared``): not tied, and the shared
    prompt does not move (the trainer honours ``Adapter.trains``); the factors do."""
    model, tasks = build_mpt(tiny_folders["llama"], train_shared=False)
    names = list(tasks)
    before = {n: model.adapters[n].shared.detach().clone() for n in names}
    cols = {n: model.adapters[n].cols.detach().clone() for n in names}
    multi = MultiTaskTrainer(
        model,
        {n: (tasks[n], ROWS[n](), []) for n in names},
        TrainArgs(
            output_dir=str(tmp_path / "m"),
            batch_size=8,
            max_steps=2,
            lr=0.05,
            progress=False,
            eval_every=2,
        ),
        log=lambda _: None,
    )
    assert multi.shared is None
    assert multi.train()["shared_prompt"] is None
    for n in names:
        torch.testing.assert_close(model.adapters[n].shared.detach(), before[n], atol=0, rtol=0)
        assert float((model.adapters[n].cols - cols[n]).abs().max()) > 1e-4
    with pytest.raises(SoftPromptError, match="--freeze-shared"):
        MultiTaskTrainer(
            model,
            {n: (tasks[n], ROWS[n](), []) for n in names},
            TrainArgs(output_dir=str(tmp_path / "m2"), max_steps=1, progress=False),
            tie_shared=True,
        )


def test_mpt_stages_from_the_cli(tiny_folders, tmp_path, capsys):
    """Stage 1: ``train --method mpt --tasks a=..,b=..`` ties the shared prompt and writes
    OUTPUT/shared/adapter; stage 2: ``train --method mpt --shared-from`` it on a target task.
    ``--tie-shared`` with another method, or without ``--tasks``, is refused."""
    sent = write_jsonl(tmp_path / "sent.jsonl", [e.fields for e in sentiment_rows()])
    size = write_jsonl(
        tmp_path / "size.jsonl",
        [{"text": e.fields["text"], "label": e.fields["label"] + "x"} for e in sentiment_rows()],
    )
    common = ["--model", tiny_folders["llama"], "--max-steps", "3", "--batch-size", "4"]
    common += ["--num-virtual-tokens", "3", "--no-progress"]
    out = tmp_path / "stage1"
    argv = ["train", "--method", "mpt", "--tasks", f"sent={sent},size={size}"]
    assert main([*argv, "--output", str(out), *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    shared = out / "shared" / "adapter"
    assert summary["shared_prompt"] == str(shared)
    prompt = load_file(shared / "adapter.safetensors")["prompt"]
    assert tuple(prompt.shape)[0] == 3
    for name in ("sent", "size"):  # each task's file: its own product of the shared prompt
        meta = json.loads((out / name / "adapter" / "adapter_config.json").read_text())
        assert meta["method"] == "mpt"
    a = load_file(out / "sent" / "adapter" / "adapter.safetensors")["prompt"]
    b = load_file(out / "size" / "adapter" / "adapter.safetensors")["prompt"]
    assert not torch.equal(a, b)
    out2 = tmp_path / "stage2"
    argv2 = ["train", "--method", "mpt", "--shared-from", str(shared), "--train", str(size)]
    assert main([*argv2, "--output", str(out2), "--freeze-shared", *common]) == 0
    assert (out2 / "adapter" / "adapter.safetensors").is_file()
    capsys.readouterr()
    for bad, msg in (
        (
            ["train", "--method", "prompt", "--tasks", f"sent={sent},size={size}", "--tie-shared"],
            "needs --method mpt",
        ),
        (["train", "--method", "mpt", "--train", str(sent), "--tie-shared"], "goes with --tasks"),
    ):
        target = tmp_path / f"bad{len(bad)}"
        assert main([*bad, "--output", str(target), *common]) == 2
        assert msg in capsys.readouterr().err
        assert not (target / "adapter").exists()
