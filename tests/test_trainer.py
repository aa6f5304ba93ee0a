"""The training loop's data order and trackers (the loop itself runs end to end in test_cli.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from accelerate import Accelerator
from conftest import perturb
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


def test_group_by_length_trains(task, tmp_path):
    tr = trainer(task, tmp_path, group_by_length=True, max_steps=6, lr=0.1, eval_every=100)
    before = tr.task.loss(tr.items[:16]).item()
    tr.train()
    after = tr.task.loss(tr.items[:16]).item()
    assert after < before


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
