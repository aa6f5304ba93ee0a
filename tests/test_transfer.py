"""Prompt transfer (softprompt.transfer): --init-from copies exactly and refuses other
methods/bases/shapes; `similar` ranks a library by SPoT's prompt similarities."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb
from transformers import AutoModelForCausalLM

import softprompt as sp
from softprompt.cli import main
from softprompt.errors import SoftPromptError
from softprompt.transfer import init_from, prompt_rows, rank_library, similarity


@pytest.fixture
def model(tiny_folders):
    m = sp.attach(AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]))
    m.add_adapter("src", sp.PromptTuningConfig(num_virtual_tokens=4, seed=1))
    m.add_adapter("other", sp.PromptTuningConfig(num_virtual_tokens=4, seed=2))
    m.add_adapter("pre", sp.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8))
    perturb(m)
    return m


def vec(adapter) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in adapter.parameters()])


def test_init_from_copies_the_prompt_exactly(model, tmp_path):
    model.save_adapter(tmp_path / "src", "src")
    model.add_adapter("new", sp.PromptTuningConfig(num_virtual_tokens=4, seed=7))
    before = vec(model.adapters["new"])
    assert not torch.equal(before, vec(model.adapters["src"]))
    init_from(model, "new", tmp_path / "src")
    assert torch.equal(vec(model.adapters["new"]), vec(model.adapters["src"]))
    assert model.active == "new" and "new__init_from" not in model.adapters
    assert all(p.requires_grad for p in model.adapters["new"].parameters())  # still trains
    # a prefix with its MLP: from a folder that has the trainable form, every tensor is copied
    model.save_adapter(tmp_path / "pre", "pre", trainable=True)
    model.add_adapter("pre2", sp.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8))
    init_from(model, "pre2", tmp_path / "pre")
    for (k, a), (_, b) in zip(
        model.adapters["pre"].named_parameters(),
        model.adapters["pre2"].named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b), k


def test_init_from_refuses_another_method_base_or_shape(model, tmp_path, tiny_folders):
    model.save_adapter(tmp_path / "src", "src")
    model.save_adapter(tmp_path / "pre", "pre")  # baked only
    model.add_adapter("new", sp.PromptTuningConfig(num_virtual_tokens=4))
    keep = vec(model.adapters["new"])
    with pytest.raises(SoftPromptError, match="it is a 'prefix' adapter, this run trains 'prompt'"):
        init_from(model, "new", tmp_path / "pre")
    model.add_adapter("wide", sp.PromptTuningConfig(num_virtual_tokens=6))
    with pytest.raises(SoftPromptError, match="another shape"):
        init_from(model, "wide", tmp_path / "src")
    model.add_adapter("pre2", sp.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8))
    with pytest.raises(SoftPromptError, match="only the baked"):
        init_from(model, "pre2", tmp_path / "pre")
    other = AutoModelForCausalLM.from_pretrained(tiny_folders["llama"])
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)  # another base model
    m2 = sp.attach(other, sp.PromptTuningConfig(num_virtual_tokens=4), name="x")
    with pytest.raises(SoftPromptError, match="another base model"):
        init_from(m2, "x", tmp_path / "src")
    # nothing lost: the refused runs' adapters are as they were, no temporary left
    assert torch.equal(vec(model.adapters["new"]), keep)
    assert not [n for n in model.adapters if n.endswith("__init_from")]


def test_similarity_is_spots_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    s = similarity(a, b)
    assert s["mean"] == pytest.approx(float(F.cosine_similarity(a.mean(0), b.mean(0), dim=0)))
    pairs = [float(F.cosine_similarity(x, y, dim=0)) for x in a for y in b]
    assert s["tokens"] == pytest.approx(sum(pairs) / 15, abs=1e-6)
    assert similarity(a, a)["mean"] == pytest.approx(1.0)


def test_similar_ranks_a_copy_of_the_target_first(model, tmp_path, tiny_folders, capsys):
    lib = tmp_path / "lib"
    model.save_adapter(lib / "b_other", "other")
    model.save_adapter(lib / "c_copy", "src")
    model.save_adapter(lib / "a_prefix", "pre")
    ranked = rank_library(model, "src", lib)
    assert [r["adapter"].split("/")[-1] for r in ranked] == ["c_copy", "b_other", "a_prefix"]
    assert ranked[0]["mean"] == pytest.approx(1.0, abs=1e-6)
    rows = prompt_rows(model.adapters["src"])
    assert ranked[0]["tokens"] == pytest.approx(similarity(rows, rows)["tokens"], abs=1e-6)
    assert ranked[1]["mean"] < 0.999 and ranked[2]["skipped"] == "method prefix"
    by_tokens = rank_library(model, "src", lib, metric="tokens")
    assert by_tokens[0]["adapter"].endswith("c_copy")
    # a corrupt folder: a clear error naming it; --skip-bad skips it
    bad = lib / "d_bad"
    shutil.copytree(lib / "c_copy", bad)
    (bad / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SoftPromptError, match="d_bad is not a usable adapter"):
        rank_library(model, "src", lib)
    assert "__library" not in model.adapters and model.active == "src"
    assert len(rank_library(model, "src", lib, skip_bad=True, warn=lambda m: None)) == 3
    # the command
    model.save_adapter(tmp_path / "target", "src")
    capsys.readouterr()
    argv = [
        "similar",
        str(tmp_path / "target"),
        "--library",
        str(lib),
        "--model",
        tiny_folders["llama"],
    ]
    assert main(argv) == 2 and "d_bad" in capsys.readouterr().err
    shutil.rmtree(bad)
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["adapter"].endswith("c_copy") and lines[0]["mean"] == pytest.approx(
        1.0, abs=1e-6
    )
    assert len(lines) == 3
    assert main([*argv, "--top-k", "2"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines[:2]
    with pytest.raises(SystemExit) as exc:  # was taken, and dropped the last line (ranked[:-1])
        main([*argv, "--top-k", "-1"])
    assert exc.value.code == 2
    assert "argument --top-k: must be an integer >= 0, got -1" in capsys.readouterr().err


def test_train_init_from_on_the_command_line(tiny_folders, tmp_path, capsys):
    from safetensors.torch import load_file

    rows = [{"text": t, "label": lab} for t, lab in [("great fun", "pos"), ("dull", "neg")] * 4]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def train(out, *extra):
        argv = [
            "train",
            "--model",
            tiny_folders["llama"],
            "--train",
            data,
            "--output",
            out,
            "--max-steps",
            2,
            "--batch-size",
            4,
            "--num-virtual-tokens",
            3,
            "--no-progress",
            *extra,
        ]
        return main([str(a) for a in argv])

    assert train(tmp_path / "src", "--method", "prompt", "--lr", "0.5") == 0
    src = load_file(tmp_path / "src" / "adapter" / "adapter.safetensors")
    # a learning rate of 1e-12: the new run ends where it started, i.e. at the source's prompt
    assert (
        train(
            tmp_path / "dst",
            "--method",
            "prompt",
            "--lr",
            "1e-12",
            "--seed",
            "5",
            "--init-from",
            tmp_path / "src",
        )
        == 0
    )
    dst = load_file(tmp_path / "dst" / "adapter" / "adapter.safetensors")
    torch.testing.assert_close(dst["prompt"], src["prompt"], atol=1e-8, rtol=0)
    capsys.readouterr()
    assert train(tmp_path / "bad", "--method", "prefix", "--init-from", tmp_path / "src") == 2
    assert "it is a 'prompt' adapter, this run trains 'prefix'" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "adapter").exists()
    assert (
        train(
            tmp_path / "bad2",
            "--method",
            "prompt",
            "--num-virtual-tokens",
            4,
            "--init-from",
            tmp_path / "src",
        )
        == 2
    )
    assert "another shape" in capsys.readouterr().err
