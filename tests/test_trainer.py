"""The training loop's data order and trackers (the loop itself runs end to end in test_cli.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from accelerate import Accelerator
from conftest import perturb
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import softprompt as sp
from softprompt.data import Example
from softprompt.tasks import Task, TaskSpec
from softprompt.trainer import TrainArgs, Trainer

WORDS = "a fine film with a plot that goes nowhere slowly but the cast is good".split()


@pytest.fixture(scope="module")
def task(tiny_folders):
    path = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
    model.add_adapter("a", sp.PromptTuningConfig(num_virtual_tokens=2))
    perturb(model)
    spec = TaskSpec(kind="classify", template="{text} -> {label}", labels=["neg", "pos"])
    return Task(spec, model, AutoTokenizer.from_pretrained(path))


def rows(n: int) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        k = int(torch.randint(1, len(WORDS), (1,), generator=g))
        out.append(Example({"text": " ".join(WORDS[:k]), "label": ["neg", "pos"][i % 2]}, "x", i))
    return out


def trainer(task, tmp_path, **kw) -> Trainer:
    args = TrainArgs(output_dir=str(tmp_path), batch_size=4, progress=False, **kw)
    return Trainer(task.model, task, rows(600), None, args, log=lambda _: None)


def padding_share(tr: Trainer, batches) -> float:
    slots = sum(len(b) * max(tr._lengths[i] for i in b) for b in batches)
    return 1 - sum(tr._lengths[i] for b in batches for i in b) / slots


def test_group_by_length_keeps_every_row_once_and_cuts_padding(task, tmp_path):
    plain = trainer(task, tmp_path)
    grouped = trainer(task, tmp_path, group_by_length=True)
    for epoch in (0, 1):
        a, b = plain._micro_batches(epoch), grouped._micro_batches(epoch)
        assert sorted(i for x in b for i in x) == list(range(600))
        assert all(len(x) == 4 for x in b)
        assert b == grouped._micro_batches(epoch), "the order must be reproducible (resume)"
        assert padding_share(grouped, b) < 0.25 * padding_share(plain, a)
    assert grouped._micro_batches(0) != grouped._micro_batches(1)


def test_group_by_length_trains(task, tmp_path, monkeypatch):
    tr = trainer(task, tmp_path, group_by_length=True, max_steps=6, lr=0.1, eval_every=100)
    before = tr.task.loss(tr.items[:16]).item()
    trained = []  # the batches the loop really ran: length-grouped ones
    loss = tr.task.loss
    monkeypatch.setattr(tr.task, "loss", lambda batch: trained.append(batch) or loss(batch))
    tr.train()
    monkeypatch.undo()
    after = tr.task.loss(tr.items[:16]).item()
    assert after < before
    assert len(trained) == 6
    spans = [[len(b["prompt"]) for b in batch] for batch in trained]
    pad = sum(len(x) * max(x) - sum(x) for x in spans) / sum(len(x) * max(x) for x in spans)
    assert pad < 0.25 * padding_share(tr, trainer(task, tmp_path)._micro_batches(0))


def test_early_stopping_keeps_the_best_dev_adapter(task, tmp_path, monkeypatch):
    """Dev scores 0.5, 0.9, 0.4, 0.3 with patience 2: training stops at step 4, and adapter/
    holds the step-2 adapter, not the last one."""
    tr = Trainer(
        task.model,
        task,
        rows(64),
        rows(4),
        TrainArgs(
            output_dir=str(tmp_path),
            batch_size=4,
            eval_every=1,
            patience=2,
            max_steps=20,
            lr=0.05,
            progress=False,
        ),
        log=lambda _: None,
    )
    scores = iter([0.5, 0.9, 0.4, 0.3])
    monkeypatch.setattr(tr, "evaluate", lambda examples: ({"accuracy": next(scores)}, []))
    saved = {}
    save = tr._save_best

    def save_best():
        saved[tr.step] = task.model.adapters["a"].embedding.detach().clone()
        save()

    monkeypatch.setattr(tr, "_save_best", save_best)
    result = tr.train()
    assert result["stopped_early"] and result["steps"] == 4 and result["best"] == 0.9
    assert sorted(saved) == [1, 2]
    best = load_file(tmp_path / "adapter" / "adapter.safetensors")["prompt"]
    assert torch.equal(best, saved[2])
    assert not torch.allclose(best, task.model.adapters["a"].embedding.detach())
    # resumed (say after a kill while the test set was scored), the run stays stopped: no
    # step, the same adapter; with a higher --patience it trains on
    ends = task.model.adapters["a"].embedding.detach().clone()
    said = []

    def resumed(patience):
        args = TrainArgs(
            output_dir=str(tmp_path), batch_size=4, eval_every=1, patience=patience,
            max_steps=20, lr=0.05, progress=False, resume=True,
        )  # fmt: skip
        tr = Trainer(task.model, task, rows(64), rows(4), args, log=said.append)
        monkeypatch.setattr(tr, "evaluate", lambda examples: ({"accuracy": 0.1}, []))
        return tr.train()

    again = resumed(2)
    assert again["stopped_early"] and again["steps"] == 4 and again["best"] == 0.9
    assert torch.equal(task.model.adapters["a"].embedding.detach(), ends)
    assert torch.equal(load_file(tmp_path / "adapter" / "adapter.safetensors")["prompt"], best)
    assert any("stopped early at step 4" in m for m in said)
    more = resumed(3)
    assert more["stopped_early"] and more["steps"] == 5


def test_top_layer_training_caches_the_lower_blocks_and_ends_the_same(tiny_folders, tmp_path):
    """Deep prompts on the top blocks only: the second and third epochs start at the lowest
    prompted block, and training ends with the adapter an uncached run ends with."""
    path = tiny_folders["llama"]
    spec = TaskSpec(kind="classify", template="{text} -> {label}", labels=["neg", "pos"])
    tok = AutoTokenizer.from_pretrained(path)
    ends, seen = [], []
    for mb in (0, 64):
        model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
        model.add_adapter("a", sp.DeepPromptConfig(num_virtual_tokens=2, layers=[1, 2], seed=0))
        task = Task(spec, model, tok)
        args = TrainArgs(
            output_dir=str(tmp_path / str(mb)),
            batch_size=4,
            epochs=3,
            lr=0.05,
            eval_every=1000,
            progress=False,
            lower_layer_cache_mb=mb,
        )
        tr = Trainer(model, task, rows(24), None, args, log=seen.append)
        start = model.adapters["a"].prefix.detach().clone()
        calls = []
        original = model.cache_lower_layers

        def spy(max_bytes, original=original, calls=calls):
            lc = original(max_bytes)
            calls.append(lc)
            return lc

        model.cache_lower_layers = spy
        tr.train()
        ends.append(model.adapters["a"].prefix.detach().clone())
        assert (ends[-1] - start).abs().max() > 1e-2  # it trained
        if mb:
            lc = calls[0]
            assert lc.layer == 1 and len(lc.rows) == len({tuple(it["prompt"]) for it in tr.items})
            assert lc.misses + lc.hits == 18 and lc.hits >= 12  # epochs 2-3 hit every batch
            assert model._layer_cache is None  # freed at the end
    assert any("caching the frozen blocks below block 1" in m for m in seen)
    assert (ends[0] - ends[1]).abs().max() < 1e-4


# ------------------------------------------------------------------------------ hardening


def fresh_task(tiny_folders, config) -> Task:
    path = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
    model.add_adapter("a", config)
    spec = TaskSpec(kind="classify", template="{text} -> {label}", labels=["neg", "pos"])
    return Task(spec, model, AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lr": float("inf")}, "--lr must be a finite number > 0, got inf"),
        ({"lr": float("nan")}, "--lr must be a finite number > 0, got nan"),
        ({"lr": -1.0}, "--lr must be a finite number > 0, got -1.0"),
        ({"lr": 0}, "--lr must be a finite number > 0, got 0"),
        ({"lr": "0.1"}, "--lr must be a finite number > 0, got '0.1'"),
        ({"epochs": float("nan")}, "--epochs must be a finite number > 0"),
        ({"warmup_ratio": 1.5}, "--warmup-ratio must be a finite number >= 0 and <= 1"),
        ({"batch_size": 2.0}, "--batch-size must be an integer >= 1, got 2.0"),
        ({"seed": 2**40}, "--seed must be an integer >= 0 and <= 4294967295"),
        ({"patience": 0}, "--patience must be an integer >= 1, got 0"),
    ],
)
def test_train_args_refuse_bad_numbers(kw, message):
    with pytest.raises(sp.SoftPromptError) as err:
        TrainArgs(output_dir="x", **kw)
    assert message in str(err.value)


def test_a_non_finite_update_stops_training_before_anything_is_saved(tiny_folders, tmp_path):
    task = fresh_task(tiny_folders, sp.PromptTuningConfig(num_virtual_tokens=2))
    args = TrainArgs(output_dir=str(tmp_path), batch_size=4, lr=1e300, max_steps=3, progress=False)
    start = task.model.adapters["a"].embedding.detach().clone()
    with pytest.raises(sp.SoftPromptError, match="training stopped at step 1: the update is not"):
        Trainer(task.model, task, rows(8), None, args, log=lambda _: None).train()
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "adapter").exists()
    assert torch.isfinite(start).all()


class _Killed(Exception):
    pass


def _interrupt_after(step: int):
    """A Trainer that dies right after writing the checkpoint of ``step`` (as kill -9 would)."""

    class Interrupted(Trainer):
        def save_checkpoint(self):
            super().save_checkpoint()
            if self.step == step:
                raise _Killed

    return Interrupted


def test_resumed_logs_equal_the_uninterrupted_run(tiny_folders, tmp_path):
    """The log window straddling the interruption (steps 6-10, checkpoint at 7) averages the
    same step losses as an uninterrupted run: the window's losses are part of the checkpoint."""

    def args(out, resume=False):
        return TrainArgs(
            output_dir=str(out), batch_size=2, lr=0.05, max_steps=12, log_every=5, save_every=7,
            eval_every=100, progress=False, resume=resume,
        )  # fmt: skip

    def run(cls, out, resume=False):
        task = fresh_task(tiny_folders, sp.PromptTuningConfig(num_virtual_tokens=2, seed=3))
        cls(task.model, task, rows(40), None, args(out, resume), log=lambda _: None).train()

    def losses(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]

    run(Trainer, tmp_path / "ref")
    with pytest.raises(_Killed):
        run(_interrupt_after(7), tmp_path / "cut")
    assert [s for s, _ in losses(tmp_path / "cut")] == [5]
    run(Trainer, tmp_path / "cut", resume=True)
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "cut")
    assert [s for s, _ in got] == [s for s, _ in ref] == [5, 10, 12]
    for (_, a), (_, b) in zip(got, ref, strict=True):
        assert abs(a - b) <= 1e-6


def test_resume_refuses_other_settings_and_another_adapter(tiny_folders, tmp_path):
    def trainer(config, **kw):
        task = fresh_task(tiny_folders, config)
        base = dict(batch_size=2, lr=0.05, max_steps=2, save_every=2, eval_every=100)
        args = TrainArgs(output_dir=str(tmp_path), progress=False, **{**base, **kw})
        return Trainer(task.model, task, rows(8), None, args, log=lambda _: None)

    prompt = sp.PromptTuningConfig(num_virtual_tokens=2)
    trainer(prompt).train()
    stale = tmp_path / ".adapter.tmp-abc"
    stale.mkdir()
    with pytest.raises(sp.SoftPromptError) as err:
        trainer(prompt, resume=True, lr=0.5, seed=1).train()
    assert "--lr 0.05 (checkpoint) vs 0.5 (now); --seed 0 (checkpoint) vs 1 (now)" in str(err.value)
    assert not stale.exists()  # removed at the start of the run
    for other, what in (
        (sp.PromptTuningConfig(num_virtual_tokens=3), "num_virtual_tokens 2 -> 3"),
        (sp.PrefixTuningConfig(num_virtual_tokens=2), "method 'prompt' -> 'prefix'"),
    ):
        with pytest.raises(sp.SoftPromptError, match="holds another adapter") as err:
            trainer(other, resume=True).train()
        assert what in str(err.value)
    assert trainer(prompt, resume=True, max_steps=4).train()["steps"] == 4  # extending is fine


def test_a_float16_base_trains_with_loss_scaling(tiny_folders, tmp_path):
    """float16 activations: the loss is scaled, steps whose scaled gradients overflow are
    skipped (the adapter unchanged) and the scale backs off; the adapter and its optimiser
    state stay float32; the scaler's state is checkpointed."""
    path = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16))
    model.add_adapter("a", sp.PromptTuningConfig(num_virtual_tokens=2))
    spec = TaskSpec(kind="classify", template="{text} -> {label}", labels=["neg", "pos"])
    task = Task(spec, model, AutoTokenizer.from_pretrained(path))
    args = TrainArgs(
        output_dir=str(tmp_path), batch_size=4, max_steps=12, lr=0.1, eval_every=6, progress=False
    )
    tr = Trainer(model, task, rows(64), None, args, log=lambda _: None)
    assert tr.scaler is not None
    # start far too high: the first steps overflow in float16 and must be skipped, not applied
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30, backoff_factor=0.125)
    start = model.adapters["a"].embedding.detach().clone()
    with torch.no_grad():
        before = task.loss(tr.items[:32]).item()
    steps = []
    opt_step = tr.opt.step
    tr.opt.step = lambda *a, **kw: steps.append(tr.step) or opt_step(*a, **kw)
    result = tr.train()
    with torch.no_grad():
        after = task.loss(tr.items[:32]).item()
    assert result["skipped_steps"] >= 1 and len(steps) == 12 - result["skipped_steps"]
    assert steps[0] == result["skipped_steps"]  # the skipped ones came first
    assert tr.scaler.get_scale() < 2.0**30
    assert after < before and not torch.equal(start, model.adapters["a"].embedding)
    assert model.adapters["a"].embedding.dtype == torch.float32
    assert all(
        v.dtype == torch.float32 for st in tr.opt.state.values() for v in st.values() if v.dim()
    )
    blob = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    assert blob["scaler"]["scale"] == tr.scaler.get_scale()


def test_no_loss_scaling_for_float32_and_bfloat16(task, tiny_folders, tmp_path):
    assert trainer(task, tmp_path).scaler is None
    path = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    model.add_adapter("a", sp.PromptTuningConfig(num_virtual_tokens=2))
    bf16 = Task(task.spec, model, task.tok)
    assert trainer(bf16, tmp_path).scaler is None


def tracked_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a tensorboard run folder: [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def jsonl_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl holds, under the tracker's tag names."""
    out: dict[str, list] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            for k in ("loss", "lr", "epoch"):
                out.setdefault(f"train/{k}", []).append((rec["step"], rec[k]))
        else:
            for k, v in rec["eval"].items():
                out.setdefault(f"eval/{k}", []).append((rec["step"], v))
            out.setdefault("eval/best", []).append((rec["step"], rec["best"]))
    return out


def test_tensorboard_gets_every_logged_value(task, tmp_path):
    args = TrainArgs(
        output_dir=str(tmp_path),
        batch_size=4,
        max_steps=7,
        lr=0.05,
        log_every=2,
        eval_every=3,
        progress=False,
        report_to="tensorboard",
    )
    Trainer(task.model, task, rows(40), rows(12), args, log=lambda _: None).train()
    want = jsonl_scalars(tmp_path / "metrics.jsonl")
    got = tracked_scalars(tmp_path / "tracking" / "softprompt")
    assert {"train/loss", "train/lr", "train/epoch", "eval/accuracy", "eval/best"} <= set(want)
    assert set(got) == set(want)
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6, 7]
    assert [s for s, _ in got["eval/accuracy"]] == [3, 6, 7]
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        torch.testing.assert_close(
            [v for _, v in got[tag]], [float(v) for _, v in points], rtol=1e-6, atol=1e-7
        )


def test_report_to_is_checked(task, tmp_path):
    with pytest.raises(sp.SoftPromptError, match="--report-to must be one of"):
        TrainArgs(output_dir=str(tmp_path), report_to="tensorbored")
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(
            sp.SoftPromptError, match="needs the mlflow package.*pip install mlflow"
        ):
            TrainArgs(output_dir=str(tmp_path), report_to="mlflow")
    args = TrainArgs(output_dir=str(tmp_path), report_to="tensorboard", progress=False)
    with pytest.raises(sp.SoftPromptError, match="log_with='tensorboard'"):
        Trainer(task.model, task, rows(8), None, args, accelerator=Accelerator(cpu=True))


def test_resumed_run_hides_what_the_interrupted_one_logged_after_its_checkpoint(
    task, tmp_path, monkeypatch
):
    """A crash at step 6 (checkpoint at 4): the resumed run's tensorboard shows steps 1..8
    once each, with the values metrics.jsonl ends with (steps 5 and 6 of the crashed run are
    purged, as metrics.jsonl drops them)."""
    kw = dict(output_dir=str(tmp_path), batch_size=4, max_steps=8, lr=0.05, log_every=1)
    kw.update(save_every=4, eval_every=100, progress=False, report_to="tensorboard")
    loss, calls = task.loss, []

    def crashing(items):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("killed")
        return loss(items)

    monkeypatch.setattr(task, "loss", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(task.model, task, rows(40), None, TrainArgs(**kw), log=lambda _: None).train()
    monkeypatch.setattr(task, "loss", loss)
    crashed = tracked_scalars(tmp_path / "tracking" / "softprompt")["train/loss"]
    assert [s for s, _ in crashed] == [1, 2, 3, 4, 5]
    args = TrainArgs(**kw, resume=True)
    Trainer(task.model, task, rows(40), None, args, log=lambda _: None).train()
    want = jsonl_scalars(tmp_path / "metrics.jsonl")["train/loss"]
    got = tracked_scalars(tmp_path / "tracking" / "softprompt")["train/loss"]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 9))
    torch.testing.assert_close([v for _, v in got], [v for _, v in want], rtol=1e-6, atol=1e-7)


def test_compile_and_fsdp_are_refused_together(tmp_path):
    with pytest.raises(sp.SoftPromptError, match="--compile does not go with --fsdp"):
        TrainArgs(output_dir=str(tmp_path), compile=True, fsdp=True)


@pytest.mark.parametrize(
    "config",
    [
        sp.PromptTuningConfig(num_virtual_tokens=2, seed=0),
        sp.DeepPromptConfig(num_virtual_tokens=2, seed=0),
    ],
    ids=["prompt", "deep"],
)
def test_gradient_checkpointing_recomputes_the_blocks_and_trains_the_same_adapter(
    tiny_folders, tmp_path, config
):
    """``gradient_checkpointing``: each block runs once more a step (in backward), and the run
    ends with the adapter and losses of the run that keeps the activations (prompt tuning's
    4 rows a step take the shared-prompt pass, deep prompts the per-layer prefixes)."""
    ends, losses, calls = [], [], []
    for ckpt in (False, True):
        task = fresh_task(tiny_folders, config)
        model = task.model
        mlp = model.base_model.model.layers[0].mlp  # inside the checkpointed forward
        n = [0]
        mlp.register_forward_pre_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        args = TrainArgs(
            output_dir=str(tmp_path / str(ckpt)),
            batch_size=4,
            max_steps=3,
            lr=0.05,
            log_every=1,
            eval_every=1000,
            progress=False,
            gradient_checkpointing=ckpt,
        )
        tr = Trainer(model, task, rows(12), None, args, log=lambda _: None)
        assert tr.checkpointing is ckpt and model._checkpointing is ckpt
        tr.train()
        calls.append(n[0])
        ends.append([p.detach().clone() for p in model.parameters_to_train()])
        losses.append(jsonl_scalars(tmp_path / str(ckpt) / "metrics.jsonl")["train/loss"])
    assert calls[1] - calls[0] >= 3, calls  # recomputed in each step's backward
    for a, b in zip(*ends, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert [s for s, _ in losses[1]] == [1, 2, 3]
    torch.testing.assert_close([v for _, v in losses[1]], [v for _, v in losses[0]])


# ------------------------------------------------------------------------------ accumulation


def _generate_task(tiny_folders) -> Task:
    path = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
    model.add_adapter("a", sp.PromptTuningConfig(num_virtual_tokens=2, seed=0))
    spec = TaskSpec(kind="generate", template="{input} =")
    return Task(spec, model, AutoTokenizer.from_pretrained(path))


def _generate_rows(n: int) -> list[Example]:
    """Targets of 1 to 9 words: micro-batches of equal rows hold unequal numbers of tokens."""
    return [
        Example(
            {"input": " ".join(WORDS[: 2 + i % 5]), "target": " ".join(WORDS[: 1 + (5 * i) % 9])},
            "x",
            i,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("batch, accum", [(2, 4), (3, 3)], ids=["2x4", "3+3+2"])
def test_an_accumulated_step_has_the_gradient_and_loss_of_the_whole_batch(
    tiny_folders, tmp_path, batch, accum
):
    """Micro-batches are weighted by their supervised tokens (``Task.loss_units``), not averaged
    as equals: 8 generate rows with targets of 1-9 words give the gradient and loss of one
    8-row batch, also when the last micro-batch is shorter (3 + 3 + 2)."""
    grads, losses = [], []
    for b, k in ((8, 1), (batch, accum)):
        task = _generate_task(tiny_folders)
        args = TrainArgs(
            output_dir=str(tmp_path / f"{b}x{k}"),
            batch_size=b,
            grad_accum=k,
            max_steps=1,
            max_grad_norm=0.0,
            log_every=1,
            eval_every=1000,
            progress=False,
        )
        tr = Trainer(task.model, task, _generate_rows(8), None, args, log=lambda _: None)
        assert len({tr._units[i] for i in range(8)}) > 3  # the rows' token counts differ
        tr.train()
        grads.append(torch.cat([p.grad.flatten() for p in task.model.parameters_to_train()]))
        losses.append(jsonl_scalars(tmp_path / f"{b}x{k}" / "metrics.jsonl")["train/loss"][0][1])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_the_rows_left_over_after_the_last_full_accumulation_step_train_too(task, tmp_path):
    """7 micro-batches at --grad-accum 2 are 4 steps an epoch (the last of one micro-batch);
    an epoch trains every row once. Before, 3 steps ran and the last micro-batch was dropped."""
    seen = []
    original = task.loss

    def spy(batch):
        seen.extend(tuple(b["prompt"]) for b in batch)
        return original(batch)

    args = TrainArgs(
        output_dir=str(tmp_path),
        batch_size=4,
        grad_accum=2,
        epochs=1,
        eval_every=1000,
        progress=False,
    )
    tr = Trainer(task.model, task, rows(26), None, args, log=lambda _: None)
    assert tr.steps_per_epoch == 4 and tr.total == 4
    task.loss = spy
    try:
        tr.train()
    finally:
        del task.loss
    assert sorted(seen) == sorted(tuple(it["prompt"]) for it in tr.items)


def test_an_early_stop_logs_the_losses_since_the_last_record(task, tmp_path, monkeypatch):
    """log_every 3, dev scores 0.5, 0.9, 0.4, 0.3 with patience 2: the run stops at step 4,
    and metrics.jsonl has the loss of steps 1-3 (at step 3) and of step 4 (at step 4)."""
    args = TrainArgs(
        output_dir=str(tmp_path), batch_size=4, eval_every=1, log_every=3, patience=2,
        max_steps=20, lr=0.05, progress=False,
    )  # fmt: skip
    tr = Trainer(task.model, task, rows(64), rows(4), args, log=lambda _: None)
    scores = iter([0.5, 0.9, 0.4, 0.3])
    monkeypatch.setattr(tr, "evaluate", lambda examples: ({"accuracy": next(scores)}, []))
    losses = []
    step_loss = tr.task.loss

    def loss(batch):
        out = step_loss(batch)
        losses.append(float(out.detach()))
        return out

    monkeypatch.setattr(tr.task, "loss", loss)
    result = tr.train()
    assert result["stopped_early"] and result["steps"] == 4
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert len(losses) == 4 and [s for s, _ in logged] == [3, 4]
    assert logged[0][1] == pytest.approx(sum(losses[:3]) / 3, rel=1e-6)
    assert logged[1][1] == pytest.approx(losses[3], rel=1e-6)
    assert tr.recent == []
