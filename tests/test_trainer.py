"""The training loop's data order (the loop itself runs end to end in test_cli.py)."""

from __future__ import annotations

import pytest
import torch
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
