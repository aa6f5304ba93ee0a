"""Prompt ensembles (softprompt.ensemble): mean probability and majority vote over adapters of
one task run as rows of one batch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import softprompt as sp
from softprompt.cli import main
from softprompt.data import Example
from softprompt.ensemble import combine_probs, ensemble_predict
from softprompt.errors import SoftPromptError
from softprompt.tasks import Task, TaskSpec

TEXTS = [
    "a wonderful, moving film",
    "boring and far too long",
    "great acting",
    "awful script",
    "a joy",
    "a waste of time, truly",
]
SPEC = TaskSpec(kind="classify", template="{text} -> {label}", labels=["neg", "pos"])


def test_combine_probs_mean_and_vote():
    probs = torch.tensor(
        [  # (K=3, n=2, C=2)
            [[0.9, 0.1], [0.6, 0.4]],
            [[0.4, 0.6], [0.45, 0.55]],
            [[0.45, 0.55], [0.3, 0.7]],
        ]
    )
    pred, mean = combine_probs(probs, "mean")
    torch.testing.assert_close(mean, probs.mean(0))
    assert pred.tolist() == [0, 1]  # mean of row 0: 0.583 vs 0.417
    pred, _ = combine_probs(probs, "vote")
    assert pred.tolist() == [1, 1]  # row 0: two of three vote label 1 although its mean is lower
    tie = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])  # K=2: one vote each; mean favours label 0
    assert combine_probs(tie, "vote")[0].tolist() == [0]
    with pytest.raises(SoftPromptError, match="--combine"):
        combine_probs(probs, "max")


@pytest.fixture(scope="module")
def members(tiny_folders, tmp_path_factory):
    path = tiny_folders["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    root = tmp_path_factory.mktemp("ens")
    model = sp.attach(AutoModelForCausalLM.from_pretrained(path))
    for seed in range(3):
        model.add_adapter(
            f"s{seed}",
            sp.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8, seed=seed),
        )
        model.adapters[f"s{seed}"].task = SPEC.to_dict()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # three clearly different prompts
        for seed in range(3):
            for p in model.adapters[f"s{seed}"].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    for seed in range(3):
        model.save_adapter(root / f"s{seed}", f"s{seed}")
    return model, Task(SPEC, model, tok), root


def test_ensemble_is_the_mean_and_the_majority_of_its_members(members):
    model, task, _ = members
    rows = [Example({"text": t, "label": "pos"}, "x", i + 1) for i, t in enumerate(TEXTS)]
    names = ["s0", "s1", "s2"]
    alone = {}
    for n in names:
        with model.using(n):
            alone[n] = task.predict(rows, batch_size=4)
    for combine in ("mean", "vote"):
        preds = ensemble_predict(model, [task] * 3, names, rows, batch_size=4, combine=combine)
        for i, p in enumerate(preds):
            for lab in SPEC.labels:
                mean = sum(alone[n][i]["scores"][lab] for n in names) / 3
                assert p["scores"][lab] == pytest.approx(mean, abs=2e-5)
            assert p["members"] == [alone[n][i]["prediction"] for n in names]
            assert p["votes"] == {lab: p["members"].count(lab) for lab in SPEC.labels}
            if combine == "mean":
                assert p["prediction"] == max(p["scores"], key=p["scores"].get)
            else:
                assert p["votes"][p["prediction"]] >= 2  # 3 voters, 2 labels: a majority
    # the members disagree somewhere, or the test would not tell mean from vote from one member
    assert any(len(set(p["members"])) > 1 for p in preds)


def test_eval_and_generate_with_several_adapters(members, tiny_folders, tmp_path, capsys):
    _, _, root = members
    data = tmp_path / "dev.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "label": ["pos", "neg"][i % 2]}) + "\n"
            for i, t in enumerate(TEXTS)
        )
    )
    adapters = [str(root / f"s{k}") for k in range(3)]
    repeated = [a for folder in adapters for a in ("--adapter", folder)]
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                *repeated,
                "--data",
                str(data),
                "--combine",
                "vote",
                "--predictions",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["combine"] == "vote" and len(metrics["members"]) == 3
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    gold = [["pos", "neg"][i % 2] for i in range(len(TEXTS))]
    acc = sum(p["prediction"] == g for p, g in zip(preds, gold, strict=True)) / len(TEXTS)
    assert metrics["accuracy"] == pytest.approx(acc)
    for j, m in enumerate(metrics["members"]):
        member_acc = sum(p["members"][j] == g for p, g in zip(preds, gold, strict=True)) / len(
            TEXTS
        )
        assert m["accuracy"] == pytest.approx(member_acc)
    assert main(["generate", "great acting", *repeated]) == 0
    line = json.loads(capsys.readouterr().out)
    assert set(line["votes"]) == {"neg", "pos"} and sum(line["votes"].values()) == 3
    # one adapter with --combine, and adapters of another task: clear errors
    assert main(["eval", "--adapter", adapters[0], "--data", str(data), "--combine", "mean"]) == 2
    assert "several --adapter" in capsys.readouterr().err
    other = sp.attach(
        AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]),
        sp.PromptTuningConfig(num_virtual_tokens=3),
        name="o",
    )
    other.adapters["o"].task = TaskSpec(
        kind="classify", template="{text} -> {label}", labels=["bad", "good"]
    ).to_dict()
    other.save_adapter(tmp_path / "other", "o")
    assert (
        main(
            [
                "eval",
                "--adapter",
                adapters[0],
                "--adapter",
                str(tmp_path / "other"),
                "--data",
                str(data),
            ]
        )
        == 2
    )
    assert "another task" in capsys.readouterr().err


def test_a_generation_ensemble_decodes_by_mean_probability_or_votes(members):
    """Generation: ``mean`` decodes one output from the mean of the adapters' next-token
    probabilities (equal to doing that by full forwards), ``vote`` takes the majority output;
    both report each member's own output, equal to that adapter alone."""
    from conftest import mean_reference

    from softprompt.decoding import eos_ids

    model, _, _ = members
    spec = TaskSpec(kind="generate", template="{input} =", max_new_tokens=5)
    tok = members[1].tok
    task = Task(spec, model, tok)
    rows = [Example({"input": t, "target": ""}, "x", i + 1) for i, t in enumerate(TEXTS[:4])]
    names = ["s0", "s1", "s2"]
    alone = {
        n: task.generate_ids([task.prompt_ids(r.fields) for r in rows], [n] * 4) for n in names
    }
    eos = set(eos_ids(model, tok)) | set(task.stop_ids)
    differs = False
    for combine in ("mean", "vote"):
        preds = ensemble_predict(model, [task] * 3, names, rows, batch_size=3, combine=combine)
        for i, (p, row) in enumerate(zip(preds, rows, strict=True)):
            assert p["members"] == [alone[n][i] for n in names]
            if combine == "mean":
                want = mean_reference(model, task.prompt_ids(row.fields), names, 5, eos)
                assert p["prediction"] == tok.decode(want, skip_special_tokens=True).strip()
                differs |= p["prediction"] not in p["members"]
            else:
                assert p["members"].count(p["prediction"]) >= p["members"].count(p["members"][0])
    assert any(len(set(p["members"])) > 1 for p in preds)
    assert differs  # the mean's output is none of its members' for some input


def test_a_chat_ensemble_of_one_adapter_twice_is_that_adapter(tiny_folders, tmp_path, capsys):
    """generate with several chat adapters: rows built as the single-adapter path builds them
    (TEXT: a user message; --data: a row may end with its question), --max-new-tokens applied,
    and the single-adapter line plus ``members``; two copies of one adapter give its output."""
    from conftest import perturb

    model = sp.attach(
        AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]),
        sp.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8, seed=0),
        name="c",
    )
    perturb(model, scale=3.0)
    model.adapters["c"].task = TaskSpec(
        kind="chat", template="{messages}", max_new_tokens=2
    ).to_dict()
    for copy in ("a", "b"):
        model.save_adapter(tmp_path / copy, "c")
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "say yes"}]}) + "\n")

    def lines(*argv):
        code = main(["generate", *map(str, argv)])
        out = capsys.readouterr()
        assert code == 0, out.err
        return [json.loads(x) for x in out.out.splitlines()]

    one = ["--adapter", tmp_path / "a"]
    two = [*one, "--adapter", tmp_path / "b"]
    outputs = []
    for extra in ([], ["--max-new-tokens", 6]):  # the adapter's own 2 tokens, then 6
        (alone,) = lines(*one, "say yes", *extra)
        assert alone["messages"] == [{"role": "user", "content": "say yes"}]
        for combine in ("mean", "vote"):
            for source in (["say yes"], ["--data", data]):
                (line,) = lines(*two, *source, "--combine", combine, *extra)
                assert line == {**alone, "members": [alone["output"]] * 2}
        outputs.append(alone["output"])
    assert outputs[0] != outputs[1]  # --max-new-tokens reached the ensemble too


def test_tag_and_extract_adapters_are_refused_as_an_ensemble(members, tmp_path, capsys):
    import shutil

    _, _, root = members
    folder = tmp_path / "tagger"
    shutil.copytree(root / "s0", folder)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["task"] = {**meta["task"], "kind": "tag"}
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    for cmd in (["generate", "a sentence"], ["eval", "--data", str(tmp_path / "none.jsonl")]):
        assert main([*cmd, "--adapter", str(folder), "--adapter", str(root / "s1")]) == 2
        assert capsys.readouterr().err == (
            f"error: --adapter {folder} is a 'tag' adapter: ensembles combine classify, "
            "generate and chat adapters only; run a tag adapter alone (one --adapter)\n"
        )
