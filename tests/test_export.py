"""softprompt export: prompt embeddings and key/value prefixes that other engines consume.

Each exported file is fed to the bare transformers model the way docs/serving.md describes,
and must reproduce softprompt's own output with the adapter.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from conftest import perturb
from safetensors import safe_open
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import softprompt as sp
from softprompt.export import add_export_parser, export_adapter, slot_tensor_name
from softprompt.lm import pad_left
from softprompt.model import mask_positions

ADAPTERS = {
    "prompt": sp.PromptTuningConfig(num_virtual_tokens=4),
    "ptuning": sp.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix": sp.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "deep_top": sp.DeepPromptConfig(num_virtual_tokens=2, layers=[1]),
}
ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # two rows of different lengths: left padding


@pytest.fixture(scope="module")
def saved(tiny_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    folder = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(folder))
    for name, config in ADAPTERS.items():
        model.add_adapter(name, copy.deepcopy(config))
    perturb(model)
    for name in ADAPTERS:
        model.save_adapter(root / name, name)
    t5 = sp.attach(AutoModelForSeq2SeqLM.from_pretrained(tiny_folders["t5"]))
    t5.add_adapter("t5", sp.DeepPromptConfig(num_virtual_tokens=2))
    t5.save_adapter(root / "t5", "t5")
    return {"root": root, "folder": folder, "t5": tiny_folders["t5"]}


def loaded(saved, name):
    """softprompt with the saved adapter (the reference), and the bare model."""
    model = sp.load_adapter(
        AutoModelForCausalLM.from_pretrained(saved["folder"]), saved["root"] / name, name=name
    )
    return model, AutoModelForCausalLM.from_pretrained(saved["folder"]).eval()


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_prompt_embeds_as_inputs_embeds_reproduce_the_adapter(saved, name):
    path = export_adapter(saved["root"] / name, "prompt-embeds")
    assert path == saved["root"] / name / "prompt_embeds.safetensors"
    tensors = load_file(str(path))
    n = ADAPTERS[name].num_virtual_tokens
    assert list(tensors) == ["prompt_embeds"] and tensors["prompt_embeds"].shape == (n, 32)
    md = metadata(path)
    assert md["format"] == "softprompt-prompt-embeds" and md["method"] == name
    assert (md["num_virtual_tokens"], md["hidden_size"], md["placement"]) == (
        str(n),
        "32",
        "prepend",
    )
    model, bare = loaded(saved, name)
    embeds = tensors["prompt_embeds"]
    assert_close(embeds, model.adapters[name].input_prompt(), atol=0, rtol=0)
    ids, mask = pad_left(ROWS, 0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, adapter_names=[name] * 2).logits
        for b, row in enumerate(ROWS):  # each row: [virtual tokens] + its tokens, positions 0..
            x = torch.cat([embeds, bare.get_input_embeddings()(torch.tensor(row))])[None]
            got = bare(inputs_embeds=x).logits[0, n:]
            assert_close(got, want[b, -len(row) :], atol=1e-5, rtol=0)


def kv_cache(tensors, config, layers, batch, rotate_to=None, rotary=None):
    """A DynamicCache holding the exported prefix (optionally keys rotated to one position)."""
    cache = DynamicCache(config=config)
    for i in range(layers):
        k = tensors[f"layers.{i}.key"][None].expand(batch, -1, -1, -1)  # (B, kvh, P, hd)
        v = tensors[f"layers.{i}.value"][None].expand(batch, -1, -1, -1)
        if rotate_to is not None:
            pos = torch.full((batch, k.shape[2]), rotate_to)
            cos, sin = rotary(k, pos)
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache


def test_prefix_kv_as_a_dynamic_cache_prefix(saved):
    path = export_adapter(saved["root"] / "prefix", "prefix-kv", model=saved["folder"])
    tensors = load_file(str(path))
    model, bare = loaded(saved, "prefix")
    cfg, rotary = bare.config, bare.model.rotary_emb
    layers = cfg.num_hidden_layers
    assert sorted(tensors) == [f"layers.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_key_value_heads, 3, head_dim)  # (kv heads, P, head dim): 2 of 4 heads (GQA)
    assert all(t.shape == shape for t in tensors.values())
    md = metadata(path)
    assert md["format"] == "softprompt-prefix-kv" and md["method"] == "prefix"
    assert json.loads(md["slots"]) == [f"self.{i}" for i in range(layers)]
    assert md["covers_all_layers"] == "true"
    assert md["layout"] == "(num_kv_heads, num_virtual_tokens, head_dim)"
    kv = model.adapters["prefix"].kv()
    assert_close(tensors["layers.1.value"], kv[1][1].permute(1, 0, 2), atol=0, rtol=0)
    p = 3
    ids, mask = pad_left(ROWS, 0)
    full_mask = torch.cat([torch.ones(2, p, dtype=torch.long), mask], 1)  # prefix always visible
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, adapter_names=["prefix"] * 2).logits
        real = mask.bool()

        def run(cache, **kw):
            return bare(input_ids=ids, attention_mask=full_mask, past_key_values=cache, **kw).logits

        # (1) keys as exported, real tokens at positions 0..T-1 (as softprompt numbers them)
        got = run(kv_cache(tensors, cfg, layers, 2), position_ids=mask_positions(mask))
        assert_close(got[real], want[real], atol=1e-5, rtol=0)
        # (2) generate() numbers positions from the mask, so with the prefix in the mask the real
        # tokens sit at P..P+T-1; RoPE then rotates the queries by P more than softprompt does,
        # while the prefix keys carry no rotation: the outputs differ
        shifted = mask_positions(full_mask)[:, p:]
        got = run(kv_cache(tensors, cfg, layers, 2), position_ids=shifted)
        assert (got[real] - want[real]).abs().max() > 1e-3
        # (3) ... unless the prefix keys are rotated once to position P: RoPE scores depend only
        # on q_pos - k_pos, so (R(P+t) q) . (R(P) k) = (R(t) q) . k
        got = run(kv_cache(tensors, cfg, layers, 2, p, rotary), position_ids=shifted)
        assert_close(got[real], want[real], atol=1e-5, rtol=0)
        # and then plain generate() continues from the prefix cache exactly like softprompt
        gen_kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        ref = model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=["prefix"] * 2, **gen_kw
        )
        dummy = torch.cat([torch.zeros(2, p, dtype=torch.long), ids], 1)  # cached slots: not read
        out = bare.generate(
            input_ids=dummy,
            attention_mask=full_mask,
            past_key_values=kv_cache(tensors, cfg, layers, 2, p, rotary),
            **gen_kw,
        )
        assert out[:, p + ids.shape[1] :].tolist() == ref[:, ids.shape[1] :].tolist()


def test_prefix_kv_on_some_layers_and_encoder_decoder_names(saved):
    path = export_adapter(saved["root"] / "deep_top", "prefix-kv", model=saved["folder"])
    assert sorted(load_file(str(path))) == ["layers.1.key", "layers.1.value"]
    assert metadata(path)["covers_all_layers"] == "false"
    path = export_adapter(saved["root"] / "t5", "prefix-kv", model=saved["t5"])
    tensors = load_file(str(path))
    cfg = AutoModelForSeq2SeqLM.from_pretrained(saved["t5"]).config
    names = {k.rsplit(".", 1)[0] for k in tensors}
    kinds = ("encoder", "decoder", "cross")
    assert names == {f"{kind}.layers.{i}" for kind in kinds for i in range(cfg.num_layers)}
    assert all(t.shape == (cfg.num_heads, 2, cfg.d_kv) for t in tensors.values())
    assert json.loads(metadata(path)["tensor_names"])["cross.1"] == "cross.layers.1"
    assert slot_tensor_name("self.12") == "layers.12"


def test_export_command_line_and_errors(saved, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="softprompt")
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "embeds.safetensors"
    args = parser.parse_args(
        [
            "export",
            str(saved["root"] / "prompt"),
            "--format",
            "prompt-embeds",
            "--output",
            str(out),
            "--dtype",
            "bfloat16",
        ]
    )
    args.func(args)
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "output": str(out),
        "format": "prompt-embeds",
        "tensors": {"prompt_embeds": [4, 32]},
    }
    assert load_file(str(out))["prompt_embeds"].dtype == torch.bfloat16
    # defaults to the base model the adapter names
    args = parser.parse_args(["export", str(saved["root"] / "deep_top"), "--format", "prefix-kv"])
    args.func(args)
    assert (saved["root"] / "deep_top" / "prefix_kv.safetensors").is_file()
    with pytest.raises(sp.SoftPromptError, match="--format prefix-kv"):
        export_adapter(saved["root"] / "prefix", "prompt-embeds")
    with pytest.raises(sp.SoftPromptError, match="--format prompt-embeds"):
        export_adapter(saved["root"] / "prompt", "prefix-kv")
    with pytest.raises(sp.SoftPromptError, match="does not exist"):
        export_adapter(tmp_path / "nothing", "prompt-embeds")
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "x", "--format", "onnx"])


def test_export_takes_a_run_folder_and_refuses_non_finite_weights(saved, tmp_path):
    import shutil

    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(saved["root"] / "prompt", run / "adapter")
    path = export_adapter(run, "prompt-embeds")
    assert path == run / "adapter" / "prompt_embeds.safetensors"
    want = load_file(saved["root"] / "prompt" / "adapter.safetensors")["prompt"]
    assert torch.equal(load_file(path)["prompt_embeds"], want)
    tensors = load_file(run / "adapter" / "adapter.safetensors")
    tensors["prompt"][0, 0] = float("nan")
    save_file(tensors, run / "adapter" / "adapter.safetensors")
    with pytest.raises(sp.SoftPromptError, match="tensor 'prompt' holds 1 NaN or infinite"):
        export_adapter(run, "prompt-embeds")


def test_a_bad_output_path_is_refused_before_the_model_loads(saved, tmp_path, capsys):
    """--output at a folder (a file for peft), or below a file: one error line naming the flag,
    before any work (--model names no model here: loading it would be the error instead); a
    missing parent folder is created."""
    from softprompt.cli import main

    (tmp_path / "a_file").write_text("x")
    cases = [
        ("prompt", "prompt-embeds", tmp_path, " is a folder; give a file path (e.g. "
         f"{tmp_path / 'prompt_embeds.safetensors'})"),
        ("deep_top", "prefix-kv", tmp_path, " is a folder; give a file path (e.g. "
         f"{tmp_path / 'prefix_kv.safetensors'})"),
        ("prompt", "peft", tmp_path / "a_file", " is a file; give a new or existing folder"),
        ("deep_top", "prefix-kv", tmp_path / "a_file" / "kv.safetensors",
         f": {tmp_path / 'a_file'} is a file, not a folder"),
    ]  # fmt: skip
    for name, fmt, output, message in cases:
        argv = ["export", saved["root"] / name, "--format", fmt, "--output", output]
        assert main([str(a) for a in [*argv, "--model", tmp_path / "no_model"]]) == 2
        assert capsys.readouterr().err == f"error: --output {output}{message}\n"
    out = tmp_path / "new" / "deeper" / "kv.safetensors"
    argv = ["export", saved["root"] / "deep_top", "--format", "prefix-kv", "--output", out]
    assert main([str(a) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    assert sorted(load_file(out)) == ["layers.1.key", "layers.1.value"]


def test_a_peft_export_into_a_softprompt_adapter_folder_is_refused(saved, tmp_path, capsys):
    """``export --format peft --output`` an adapter folder (the source itself, say) would
    replace its adapter_config.json with PEFT's: refused, the folder left as it was."""
    import shutil

    from softprompt.cli import main

    folder = tmp_path / "copy"
    shutil.copytree(saved["root"] / "prompt", folder)
    before = (folder / "adapter_config.json").read_bytes()
    argv = ["export", str(folder), "--format", "peft", "--output", str(folder)]
    assert main(argv) == 2
    assert "holds a softprompt adapter (adapter.safetensors)" in capsys.readouterr().err
    assert (folder / "adapter_config.json").read_bytes() == before
    assert not (folder / "adapter_model.safetensors").exists()
