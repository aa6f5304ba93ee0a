"""PEFT prompt-learning folders in and out, checked against the real peft (0.21.2).

Every PEFT folder here is made by peft itself (``get_peft_model`` + ``save_pretrained``, weights
perturbed away from their init); every exported folder is loaded by ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import method_config, perturb, tiny_model
from peft import (
    CartridgeConfig,
    LoraConfig,
    MultitaskPromptTuningConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import softprompt as sp
from softprompt import _hf
from softprompt.export import export_adapter, export_peft
from softprompt.io import read_adapter_config
from softprompt.lm import pad_left
from softprompt.peft_compat import save_peft

PEFT_CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "ptuning_mlp": lambda: PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16
    ),
    "ptuning_lstm": lambda: PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        encoder_hidden_size=16,
        encoder_reparameterization_type="LSTM",
    ),
    "prefix_mlp": lambda: PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16
    ),
    "prefix_flat": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "cartridge": lambda: CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # unpadded rows


# peft warns (about dropped position ids, prompt learning in generate, transformers' deprecated
# names it still reads); these are peft's, not softprompt's.
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def make_peft_folder(base, config, path: Path, seed: int = 0) -> Path:
    """A PEFT folder written by peft, its prompt encoder moved away from its init."""
    base.name_or_path = base.name_or_path or f"tiny-{base.config.model_type}"  # as from a folder
    pm = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.std() if p.numel() > 1 else 1))
    pm.save_pretrained(path)
    return path


def peft_logits(base, path, ids, mask=None) -> torch.Tensor:
    """PEFT's logits on the real tokens (PEFT's outputs include the virtual positions)."""
    pm = PeftModel.from_pretrained(base, path).eval()
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :]


def sp_logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {
        (fam, kind): make_peft_folder(tiny_model(fam), make(), root / f"{fam}-{kind}")
        for fam in ("gpt2", "llama")
        for kind, make in PEFT_CONFIGS.items()
    }


# ------------------------------------------------------------------------------ in


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_folder_gives_peft_logits_and_generation(peft_dirs, family, kind):
    path = peft_dirs[family, kind]
    model = sp.load_adapter(tiny_model(family), path)
    want = peft_logits(tiny_model(family), path, IDS)
    got = sp_logits(model, IDS)
    assert_close(got, want, atol=1e-4, rtol=0)
    bare = sp_logits(sp.attach(tiny_model(family)), IDS)
    assert (got - bare).abs().max() > 1e-2  # the adapter does something
    # the same tokens as PEFT's greedy generate (prefix on GPT-2: positions shifted in generate)
    pm = PeftModel.from_pretrained(tiny_model(family), path).eval()
    with torch.no_grad():
        want_gen = pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)[:, -6:]
        got_gen = model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)[:, -6:]
    assert torch.equal(got_gen, want_gen)
    meta = read_adapter_config(path)
    assert meta["method"] == (
        "prompt"
        if kind in ("prompt", "ptuning_mlp", "ptuning_lstm")
        else "cartridge"
        if kind == "cartridge"
        else "deep"
    )
    assert meta["task"] == {"kind": "generate", "template": "{input}"}


@pytest.mark.parametrize("kind", ["prompt", "prefix_flat"])
def test_generation_scores_equal_peft(peft_dirs, kind):
    path = peft_dirs["gpt2", kind]
    model = sp.load_adapter(tiny_model("gpt2"), path)
    pm = PeftModel.from_pretrained(tiny_model("gpt2"), path).eval()
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = torch.stack(model.generate(input_ids=IDS, **kw).scores)
        want = torch.stack(pm.generate(input_ids=IDS, **kw).scores)
    assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_import_keeps_peft_positions(peft_dirs, family):
    """PEFT's prefix sits at positions 0..P-1, the real tokens at P..: on GPT-2's learned
    positions only the shifted positions reproduce it (on Llama, as rotated keys would)."""
    path = peft_dirs[family, "prefix_flat"]
    model = sp.load_adapter(tiny_model(family), path, name="imported")
    assert model.adapters["imported"].position_offset == 3
    want = peft_logits(tiny_model(family), path, IDS)
    model.adapters["imported"].position_offset = 0
    assert (sp_logits(model, IDS) - want).abs().max() > 1e-3
    # mixed with an adapter without offset and the bare model, each row as alone
    model.adapters["imported"].position_offset = 3
    model.add_adapter("mine", method_config("prompt"))
    perturb(model)
    alone = {n: sp_logits_named(model, IDS[:1], n) for n in ("imported", "mine", None)}
    ids = IDS[:1].repeat(3, 1)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["imported", "mine", None]).logits
    for i, n in enumerate(("imported", "mine", None)):
        assert_close(mixed[i : i + 1], alone[n], atol=1e-5, rtol=0)


def sp_logits_named(model, ids, name):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=[name] * ids.shape[0]).logits


def test_left_padding_rows_equal_peft_rows_alone(peft_dirs):
    """softprompt gives a row inside a left-padded batch the logits PEFT gives it alone."""
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = pad_left(rows, 0)
    for family in ("gpt2", "llama"):
        for kind in ("prompt", "prefix_flat"):
            path = peft_dirs[family, kind]
            model = sp.load_adapter(tiny_model(family), path)
            got = sp_logits(model, ids, mask)
            for b, row in enumerate(rows):
                want = peft_logits(tiny_model(family), path, torch.tensor([row]))
                assert_close(got[b : b + 1, -len(row) :], want, atol=1e-4, rtol=0)


def test_adapter_model_bin_loads_with_weights_only(peft_dirs, tmp_path):
    src = peft_dirs["llama", "prefix_flat"]
    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    torch.save(load_file(str(src / "adapter_model.safetensors")), d / "adapter_model.bin")
    got = sp_logits(sp.load_adapter(tiny_model("llama"), d), IDS)
    assert_close(got, peft_logits(tiny_model("llama"), src, IDS), atol=1e-4, rtol=0)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_bin_is_not_executed(peft_dirs, tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "evil"
    d.mkdir()
    src = peft_dirs["llama", "prompt"]
    (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    torch.save({"prompt_embeddings": _Evil(str(marker))}, d / "adapter_model.bin")
    with pytest.raises(sp.SoftPromptError, match="weights_only=True") as e:
        sp.load_adapter(tiny_model("llama"), d)
    assert "never runs pickled code" in str(e.value) and "save_file" in str(e.value)
    assert not marker.exists()


def test_folder_for_another_base_model_is_refused(peft_dirs, tmp_path):
    with pytest.raises(sp.SoftPromptError, match="made for another base model") as e:
        sp.load_adapter(tiny_model("llama"), peft_dirs["gpt2", "prefix_flat"])
    assert "token_dim: adapter has 32, model has 16" in str(e.value)
    with pytest.raises(sp.SoftPromptError, match="num_layers: adapter has 2, model has 3"):
        sp.load_adapter(tiny_model("llama"), peft_dirs["gpt2", "prompt"])
    d = tmp_path / "edited"
    d.mkdir()
    src = peft_dirs["llama", "prompt"]
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["num_attention_heads"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(sp.SoftPromptError, match="num_attention_heads: adapter has 8, model has 4"):
        sp.load_adapter(tiny_model("llama"), d)
    model = sp.attach(tiny_model("llama"))
    with pytest.raises(sp.SoftPromptError):
        sp.load_adapter(model, peft_dirs["gpt2", "prefix_flat"])
    assert len(model.adapters) == 0  # nothing left behind


def test_unsupported_peft_types_are_refused_by_name(tmp_path):
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(sp.SoftPromptError, match="peft_type 'LORA' is not supported"):
        sp.load_adapter(tiny_model("llama"), tmp_path / "lora")
    mpt = get_peft_model(
        tiny_model("llama"),
        MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_tasks=2),
    )
    mpt.save_pretrained(tmp_path / "mpt")
    # supported since method "mpt" (tests/test_methods_mpt.py checks its logits)
    assert (
        sp.load_adapter(tiny_model("llama"), tmp_path / "mpt").adapters["default"].config.method
        == "mpt"
    )
    from transformers import LlamaForSequenceClassification

    cls_base = LlamaForSequenceClassification(tiny_model("llama").config)
    cls = get_peft_model(cls_base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    cls.save_pretrained(tmp_path / "cls")
    with pytest.raises(sp.SoftPromptError, match="SEQ_CLS"):
        sp.load_adapter(tiny_model("llama"), tmp_path / "cls")


# ------------------------------------------------------------------------------ out


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "deep"])
def test_export_loads_in_peft_with_equal_logits(tmp_path, family, method):
    model = sp.attach(tiny_model(family), method_config(method))
    perturb(model)
    if family == "gpt2" and method in ("prefix", "deep"):
        with pytest.raises(sp.SoftPromptError, match="learned absolute positions"):
            save_peft(model, tmp_path / "out")
        return
    out = save_peft(model, tmp_path / "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == (
        "PROMPT_TUNING" if method in ("prompt", "ptuning") else "PREFIX_TUNING"
    )
    assert set(load_file(str(out / "adapter_model.safetensors"))) == {"prompt_embeddings"}
    want = sp_logits(model, IDS)
    got = peft_logits(tiny_model(family), out, IDS)
    assert_close(got, want, atol=1e-4, rtol=0)
    if method == "deep" and family != "gpt2":  # the rotation is what makes a prefix equal
        flat = model.adapters["default"].prefix.detach()
        save_file({"prompt_embeddings": flat.contiguous()}, str(out / "adapter_model.safetensors"))
        assert (peft_logits(tiny_model(family), out, IDS) - want).abs().max() > 1e-3


def test_rotate_keys_sign():
    """q_{p+s} . R(s) k == q_p . k with the model's own rotary embedding."""
    base = tiny_model("llama")
    rotary = base.model.rotary_emb
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 8, generator=g), torch.randn(3, 2, 8, generator=g)

    def rot(x, p):  # x (1, h, n, hd) at position p
        cos, sin = rotary(x, torch.full((1, x.shape[2]), p))
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    k5 = _hf.rotate_keys(base, k, 5).permute(1, 0, 2)[None]  # (1, kvh, P, hd)
    s_near = rot(q, 2) @ k.permute(1, 0, 2)[None].transpose(-1, -2)
    s_far = rot(q, 7) @ k5.transpose(-1, -2)
    assert_close(s_far, s_near, atol=1e-5, rtol=0)


def test_export_refuses_what_peft_cannot_express(tmp_path, tiny_folders):
    cases = {  # append on an encoder (a decoder-only LM refuses it itself)
        "append": (sp.PromptTuningConfig(num_virtual_tokens=2, placement="append"), "append"),
        "template": (sp.PromptTuningConfig(num_virtual_tokens=2, placement="template"), "template"),
        "subset": (sp.DeepPromptConfig(num_virtual_tokens=2, layers=[1]), "a subset of layers"),
    }
    for name, (config, msg) in cases.items():
        model = sp.attach(tiny_model("bert" if name == "append" else "llama"), config)
        with pytest.raises(sp.SoftPromptError, match=msg):
            save_peft(model, tmp_path / name)
    t5 = sp.attach(tiny_model("t5"), sp.DeepPromptConfig(num_virtual_tokens=2))
    with pytest.raises(sp.SoftPromptError, match="encoder-decoder"):
        save_peft(t5, tmp_path / "t5")


@pytest.mark.parametrize(
    "family,kind",
    [("llama", k) for k in PEFT_CONFIGS] + [("gpt2", "prefix_flat"), ("gpt2", "ptuning_mlp")],
)
def test_round_trip_peft_softprompt_peft_is_exact(peft_dirs, tmp_path, family, kind):
    src = peft_dirs[family, kind]
    model = sp.load_adapter(tiny_model(family), src, name="rt")
    model.save_adapter(tmp_path / "sp", "rt")
    out = export_peft(tmp_path / "sp", tmp_path / "back", model=str(_base_folder(tmp_path, family)))
    a = load_file(str(src / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(a, b)
    old = json.loads((src / "adapter_config.json").read_text())
    new = json.loads((out / "adapter_config.json").read_text())
    for field in (
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "token_dim",
        "num_layers",
        "num_attention_heads",
        "num_transformer_submodules",
        "prefix_projection",
        "encoder_hidden_size",
        "encoder_reparameterization_type",
        "num_frozen_tokens",
        "base_model_name_or_path",
    ):
        assert new.get(field) == old.get(field), field
    assert_close(
        peft_logits(tiny_model(family), out, IDS),
        peft_logits(tiny_model(family), src, IDS),
        atol=0,
        rtol=0,
    )


def _base_folder(tmp_path, family) -> Path:
    path = tmp_path / f"base-{family}"
    if not path.exists():
        tiny_model(family).save_pretrained(path)
    return path


def test_export_command_format_peft(tmp_path, tiny_folders, capsys):
    from transformers import AutoModelForCausalLM

    folder = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(folder), method_config("prefix"))
    perturb(model)
    model.save_adapter(tmp_path / "sp")
    from softprompt.cli import main

    assert (
        main(
            ["export", str(tmp_path / "sp"), "--format", "peft", "--output", str(tmp_path / "out")]
        )
        == 0
    )
    out = tmp_path / "out"
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == folder
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tensors"] == {"prompt_embeddings": [3, 3 * 2 * 16]}  # 3 layers, kv 2 x 8
    got = peft_logits(AutoModelForCausalLM.from_pretrained(folder), out, IDS)
    assert_close(got, sp_logits(model, IDS), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ CLI and server


@pytest.fixture(scope="module")
def cli_peft(tiny_folders, tmp_path_factory):
    """PEFT folders made on the tiny Llama folder (real tokenizer), naming it as their base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("peft-cli")
    folder = tiny_folders["llama"]
    dirs = {
        kind: make_peft_folder(
            AutoModelForCausalLM.from_pretrained(folder), PEFT_CONFIGS[kind](), root / kind
        )
        for kind in ("prompt", "prefix_flat")
    }
    data = root / "gen.jsonl"
    data.write_text(
        "".join(json.dumps({"input": f"say {w}", "target": w}) + "\n" for w in ("yes", "no"))
    )
    return {
        "folder": folder,
        "dirs": dirs,
        "data": data,
        "tok": AutoTokenizer.from_pretrained(folder),
    }


def peft_greedy(cli_peft, kind, text, n) -> str:
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cli_peft["folder"]), cli_peft["dirs"][kind]
    ).eval()
    ids = cli_peft["tok"](text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pm.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
    return cli_peft["tok"].decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["prompt", "prefix_flat"])
def test_cli_inspect_generate_eval_take_a_peft_folder(cli_peft, capsys, kind):
    from softprompt.cli import main

    d = cli_peft["dirs"][kind]
    assert main(["inspect", str(d), "--json", "--top-k", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == ("prompt" if kind == "prompt" else "deep")
    assert report["base_model"]["name_or_path"] == cli_peft["folder"]  # base_model_name_or_path
    assert len(report["virtual_tokens"]) == PEFT_CONFIGS[kind]().num_virtual_tokens
    assert main(["generate", "--adapter", str(d), "say yes", "--max-new-tokens", "4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = peft_greedy(cli_peft, kind, "say yes", 4).strip()  # the CLI strips its outputs
    assert line == {"input": "say yes", "output": want}
    preds = d.parent / f"{kind}-preds.jsonl"
    args = [
        "eval",
        "--adapter",
        str(d),
        "--data",
        str(cli_peft["data"]),
        "--predictions",
        str(preds),
    ]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 2 and "exact_match" in metrics
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [
        peft_greedy(cli_peft, kind, f"say {w}", 64).strip() for w in ("yes", "no")
    ]


def test_server_serves_and_loads_peft_folders(cli_peft):
    import argparse

    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from softprompt import server as srv

    dirs = cli_peft["dirs"]
    parser = argparse.ArgumentParser()
    srv.add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--adapter", f"p={dirs['prompt']}"])
    model_name, adapters, _ = srv.settings_from_args(args)
    assert model_name == cli_peft["folder"] and adapters == {"p": str(dirs["prompt"])}
    app = srv.create_app(
        AutoModelForCausalLM.from_pretrained(cli_peft["folder"]),
        cli_peft["tok"],
        {"p": str(dirs["prompt"])},
        srv.ServeSettings(max_wait_ms=5),
    )
    with TestClient(app) as c:
        r = c.post("/v1/adapters", json={"name": "late", "path": str(dirs["prefix_flat"])})
        assert r.status_code == 201, r.text
        for name, kind in (("p", "prompt"), ("late", "prefix_flat")):
            r = c.post(
                "/v1/completions",
                json={"model": name, "prompt": "say yes", "max_tokens": 4, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == peft_greedy(cli_peft, kind, "say yes", 4)


def test_other_exports_read_a_peft_folder(cli_peft, tmp_path):
    from safetensors import safe_open

    d = cli_peft["dirs"]
    path = export_adapter(d["prompt"], "prompt-embeds", tmp_path / "pe.safetensors")
    want = load_file(str(d["prompt"] / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(load_file(str(path))["prompt_embeds"], want)
    path = export_adapter(d["prefix_flat"], "prefix-kv", tmp_path / "kv.safetensors")
    flat = load_file(str(d["prefix_flat"] / "adapter_model.safetensors"))["prompt_embeddings"]
    kv = load_file(str(path))
    assert torch.equal(kv["layers.0.key"], flat[:, :16].reshape(3, 2, 8).permute(1, 0, 2))
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["position_offset"] == "3" and "positions 3..3+T-1" in md["positions"]


# ------------------------------------------------------------------------------ real weights


@pytest.mark.slow
def test_smollm2_peft_in_and_out(tmp_path):
    """SmolLM2-135M (9 query / 3 key-value heads, head dim 64, 30 layers): PEFT's prompt and
    prefix folders load with PEFT's logits, softprompt's prefix and prompt export into PEFT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.assets import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)

    def base():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids = tok(["Review: a joy to watch.\nSentiment:"], return_tensors="pt").input_ids
        for kind in ("prompt", "prefix_mlp"):
            d = make_peft_folder(base(), PEFT_CONFIGS[kind](), tmp_path / kind)
            if kind == "prefix_mlp":
                cfg = json.loads((d / "adapter_config.json").read_text())
                assert (cfg["token_dim"], cfg["num_attention_heads"]) == (192, 3)  # 3 x 64
            got = sp_logits(sp.load_adapter(base(), d), ids)
            # 3e-5 alone; 1.8e-4 after the rest of the suite in a fresh venv (2026-12-02, cause
            # not found: see the session note), hence 3e-4
            assert_close(got, peft_logits(base(), d, ids), atol=3e-4, rtol=0)
        # prefix: the MLP at its init (the model's own keys/values of 5 tokens read at -5..-1);
        # deep prompts and prompt tuning moved away from theirs. (perturb() on the MLP makes
        # keys ~10x the model's own: then float32 rotary angles alone differ by ~1e-3.)
        model = sp.attach(base(), sp.DeepPromptConfig(num_virtual_tokens=5), name="deep")
        model.add_adapter("prompt", sp.PromptTuningConfig(num_virtual_tokens=5))
        perturb(model, scale=0.2)
        model.add_adapter("prefix", sp.PrefixTuningConfig(num_virtual_tokens=5))
        for name in ("deep", "prompt", "prefix"):
            out = save_peft(model, tmp_path / f"out-{name}", name)
            want = sp_logits_named(model, ids, name)
            assert_close(peft_logits(base(), out, ids), want, atol=1e-4, rtol=0)
    finally:
        torch.set_num_threads(before)


def test_offset_rows_decode_step_by_step_with_the_returned_cache(peft_dirs):
    """A manual decoding loop (forward with past_key_values) keeps the shifted positions."""
    model = sp.load_adapter(tiny_model("gpt2"), peft_dirs["gpt2", "prefix_flat"])
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(4, ids.shape[1]):
            out = model(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
            cache = out.past_key_values
    assert_close(torch.cat(steps, 1) * mask[..., None], full * mask[..., None], atol=1e-5, rtol=0)


def test_server_refuses_a_peft_folder_for_another_model(cli_peft, tmp_path):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from softprompt import server as srv

    other = make_peft_folder(
        tiny_model("gpt2"), PEFT_CONFIGS["prefix_flat"](), tmp_path / "gpt2-prefix"
    )
    app = srv.create_app(
        AutoModelForCausalLM.from_pretrained(cli_peft["folder"]),
        cli_peft["tok"],
        {},
        srv.ServeSettings(
            max_wait_ms=5, adapter_roots=[str(tmp_path), str(cli_peft["dirs"]["prompt"].parent)]
        ),
    )
    with TestClient(app) as c:
        r = c.post("/v1/adapters", json={"name": "x", "path": str(other)})
        assert r.status_code == 409, r.text
        assert "made for another base model" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"name": "y", "path": str(cli_peft["dirs"]["prompt"])})
        assert r.status_code == 201 and r.json()["method"] == "prompt"


def test_feature_extraction_prompt_tuning_on_an_encoder(tmp_path):
    config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)
    d = make_peft_folder(tiny_model("bert"), config, tmp_path / "bert")
    pm = PeftModel.from_pretrained(tiny_model("bert"), d).eval()
    model = sp.load_adapter(tiny_model("bert"), d)
    with torch.no_grad():
        want = pm(input_ids=IDS).last_hidden_state[:, -IDS.shape[1] :]
        got = model(input_ids=IDS).last_hidden_state
    assert_close(got, want, atol=1e-4, rtol=0)
    mine = sp.attach(tiny_model("bert"), method_config("prompt"))
    perturb(mine)
    out = save_peft(mine, tmp_path / "out")
    assert (
        json.loads((out / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    )
    with torch.no_grad():
        want = mine(input_ids=IDS).last_hidden_state
        pm = PeftModel.from_pretrained(tiny_model("bert"), out).eval()
        assert_close(
            pm(input_ids=IDS).last_hidden_state[:, -IDS.shape[1] :], want, atol=1e-4, rtol=0
        )
    deep = sp.attach(tiny_model("bert"), method_config("deep"))
    with pytest.raises(sp.SoftPromptError, match="cannot tell how this model's positions"):
        save_peft(deep, tmp_path / "deep")
    with pytest.raises(sp.SoftPromptError, match="PEFT prefix needs a decoder-only model"):
        bert_prefix = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=2)
        sp.load_adapter(
            tiny_model("bert"), make_peft_folder(tiny_model("bert"), bert_prefix, tmp_path / "p")
        )


def test_a_peft_folder_with_non_finite_weights_is_refused(peft_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    d.mkdir()
    src = peft_dirs["llama", "prompt"]
    (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    table = load_file(src / "adapter_model.safetensors")["prompt_embeddings"].clone()
    table[1, 3] = float("nan")
    save_file({"prompt_embeddings": table}, d / "adapter_model.safetensors")
    model = sp.attach(tiny_model("llama"))
    with pytest.raises(sp.SoftPromptError, match="holds 1 NaN or infinite values"):
        sp.load_adapter(model, d)
    assert len(model.adapters) == 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cartridge_exports_as_peft_cartridge(tmp_path, family):
    torch.manual_seed(0)
    text = [5, 17, 33, 8, 91, 44, 12]
    model = sp.attach(
        tiny_model(family),
        sp.methods.CartridgeConfig(num_virtual_tokens=6, init_token_ids=text, num_frozen=2),
    )
    perturb(model)
    out = save_peft(model, tmp_path / "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "CARTRIDGE" and cfg["num_frozen_tokens"] == 2
    want = sp_logits(model, IDS)
    assert_close(peft_logits(tiny_model(family), out, IDS), want, atol=1e-4, rtol=0)
    back = sp.load_adapter(tiny_model(family), out, name="back")
    assert back.adapters["back"].config.method == "cartridge"
    assert back.adapters["back"].config.num_frozen == 2
    assert_close(sp_logits(back, IDS), want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ more families


def _partial_rotary(family: str):
    """Tiny causal LMs whose rotary embedding covers part of each head (Phi, Persimmon: half;
    GPT-NeoX: a quarter)."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        PersimmonConfig,
        PersimmonForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    config, cls = {
        "phi": (PhiConfig, PhiForCausalLM),
        "persimmon": (PersimmonConfig, PersimmonForCausalLM),
        "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    }[family]
    torch.manual_seed(0)
    return cls(
        config(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=120,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()


@pytest.mark.parametrize("family", ["phi", "persimmon", "gpt_neox"])
@pytest.mark.parametrize("method", ["prefix", "deep"])
def test_partial_rotary_prefix_exports_with_peft_logits(tmp_path, family, method):
    """Only the rotary dims of the keys rotate to PEFT's positions; the rest pass through."""
    base = _partial_rotary(family)
    rotary = _hf.lm_body_and_head(base)[0].rotary_emb
    cos, _ = rotary(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, dtype=torch.long))
    assert cos.shape[-1] < 8  # head dim 8: a partial rotary embedding
    model = sp.attach(base, method_config(method))
    perturb(model)
    out = save_peft(model, tmp_path / "out")
    want = sp_logits(model, IDS)
    assert_close(peft_logits(_partial_rotary(family), out, IDS), want, atol=1e-4, rtol=0)
    if method == "deep":  # the prefix unrotated: PEFT's logits differ
        flat = model.adapters["default"].prefix.detach()
        save_file({"prompt_embeddings": flat.contiguous()}, str(out / "adapter_model.safetensors"))
        assert (peft_logits(_partial_rotary(family), out, IDS) - want).abs().max() > 1e-3


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=120,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


def test_adaption_prompt_export_refuses_model_types_peft_does_not_take(tmp_path):
    from peft import AdaptionPromptConfig
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    from softprompt.peft_compat import peft_adaption_model_types

    llama_form = [
        t for t, c in TRANSFORMERS_MODEL_CONFIG.items() if c.target_modules == "self_attn"
    ]
    assert peft_adaption_model_types() == sorted(llama_form) == ["llama", "mistral"]
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'qwen2'"):
        get_peft_model(_qwen2(), AdaptionPromptConfig(adapter_len=3, adapter_layers=2))
    model = sp.attach(_qwen2(), sp.AdaptionPromptConfig(num_virtual_tokens=3, adapter_layers=2))
    perturb(model)  # softprompt serves it ...
    assert (sp_logits(model, IDS) - sp_logits(sp.attach(_qwen2()), IDS)).abs().max() > 1e-3
    with pytest.raises(  # ... but PEFT could not load the export
        sp.SoftPromptError, match=r"model_type 'qwen2': PEFT's ADAPTION_PROMPT supports only "
    ) as e:
        save_peft(model, tmp_path / "out")
    assert "['llama', 'mistral']" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_task_type_and_base_model_name_are_checked(peft_dirs, recwarn):
    """A CAUSAL_LM folder needs a causal LM; a base_model_name_or_path naming another model
    than the one given is a warning (names differ for the same weights)."""
    from transformers import LlamaModel

    src = peft_dirs["gpt2", "prompt"]  # CAUSAL_LM, made on "tiny-gpt2": 2 layers, 32 wide, 4 heads
    with pytest.raises(sp.SoftPromptError, match="task_type 'CAUSAL_LM'.*BertModel is not one"):
        sp.load_adapter(tiny_model("bert"), src)
    with pytest.raises(sp.SoftPromptError, match="LlamaModel is not one.*made for \\(tiny-gpt2\\)"):
        sp.load_adapter(LlamaModel(tiny_model("llama").config), src)
    qwen3 = tiny_model("qwen3")  # same sizes as the tiny GPT-2
    qwen3.name_or_path = "tiny-qwen3"
    with pytest.warns(UserWarning, match="base_model_name_or_path is 'tiny-gpt2', the model is"):
        sp.load_adapter(qwen3, src)
    recwarn.clear()
    same = tiny_model("gpt2")
    same.name_or_path = "/models/Tiny-GPT2/"  # a local copy: the same basename
    got = sp_logits(sp.load_adapter(same, src), IDS)
    assert not [w for w in recwarn if "base_model_name_or_path" in str(w.message)]
    assert_close(got, peft_logits(tiny_model("gpt2"), src, IDS), atol=1e-4, rtol=0)


def test_mpt_folder_exports_task_0s_prompt_as_prompt_embeds(tmp_path):
    """--format prompt-embeds of a PEFT multitask folder: the prompt PEFT runs for task 0."""
    config = MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2, num_ranks=2
    )
    d = make_peft_folder(tiny_model("llama"), config, tmp_path / "mpt")
    path = export_adapter(d, "prompt-embeds", tmp_path / "pe.safetensors")
    got = load_file(str(path))["prompt_embeds"]  # (P, hidden)
    pm = PeftModel.from_pretrained(tiny_model("llama"), d).eval()
    with torch.no_grad():
        want = pm.get_prompt(batch_size=1, task_ids=torch.tensor([0]))[0]
        other = pm.get_prompt(batch_size=1, task_ids=torch.tensor([1]))[0]
        peft_out = pm(input_ids=IDS, task_ids=torch.tensor([0, 0])).logits[:, 3:]
        base = tiny_model("llama")
        embeds = torch.cat([got[None].expand(2, -1, -1), base.get_input_embeddings()(IDS)], 1)
        fed = base(inputs_embeds=embeds).logits[:, 3:]
    assert got.shape == (3, 32)
    assert_close(got, want, atol=1e-6, rtol=0)
    assert (other - got).abs().max() > 1e-3  # task 1's prompt is another
    assert_close(fed, peft_out, atol=1e-5, rtol=0)


def _llama_dynamic_rope():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=120,
        max_position_embeddings=8,  # P + T = 9: past it, dynamic rope rescales
        pad_token_id=0,
    )
    c.rope_parameters = {**c.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    return LlamaForCausalLM(c).eval()


def _gemma2_window4():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=120,
        pad_token_id=0,
        sliding_window=4,
    )
    return Gemma2ForCausalLM(config).eval()


def test_prefix_import_on_models_with_position_ids_refuses_only_windows(tmp_path, monkeypatch):
    """Dynamic rope takes position_ids: the import gives PEFT's logits. A sliding window drops
    PEFT's prefix out of reach of later tokens: refused, for that reason (loaded anyway, the
    logits differ)."""
    from softprompt import peft_compat

    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    d = make_peft_folder(_llama_dynamic_rope(), prefix, tmp_path / "dynamic")
    got = sp_logits(sp.load_adapter(_llama_dynamic_rope(), d), IDS)
    assert_close(got, peft_logits(_llama_dynamic_rope(), d, IDS), atol=1e-4, rtol=0)
    assert (got - sp_logits(sp.attach(_llama_dynamic_rope()), IDS)).abs().max() > 1e-2
    d = make_peft_folder(_gemma2_window4(), prefix, tmp_path / "gemma2")
    with pytest.raises(sp.SoftPromptError, match="sliding-window attention \\(sliding_window=4\\)"):
        sp.load_adapter(_gemma2_window4(), d)
    monkeypatch.setattr(peft_compat, "_prefix_positions_refusal", lambda base: None)
    got = sp_logits(sp.load_adapter(_gemma2_window4(), d), IDS)
    assert (got - peft_logits(_gemma2_window4(), d, IDS)).abs().max() > 1e-2


def test_feature_extraction_prefix_on_a_bare_decoder(tmp_path):
    """A FEATURE_EXTRACTION prefix on LlamaModel (no LM head): PEFT's hidden states; a
    left-padded row those PEFT gives it alone."""
    from transformers import LlamaModel

    def bare():
        torch.manual_seed(0)
        return LlamaModel(tiny_model("llama").config).eval()

    config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)
    d = make_peft_folder(bare(), config, tmp_path / "prefix")
    model = sp.load_adapter(bare(), d)
    pm = PeftModel.from_pretrained(bare(), d).eval()
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0)
    with torch.no_grad():
        want = pm(input_ids=IDS).last_hidden_state  # (B, T, hidden): PEFT's prefix is a cache
        got = model(input_ids=IDS).last_hidden_state
        row = pm(input_ids=ids[1:, 3:]).last_hidden_state
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[1:, 3:]
        plain = sp.attach(bare())(input_ids=IDS).last_hidden_state
    assert_close(got, want, atol=1e-4, rtol=0)
    assert_close(padded, row, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-2


def _edited(tmp_path, name, config, tensors) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, d / "adapter_model.safetensors")
    return d


def test_hand_edited_configs_and_tensors_are_refused_by_field(peft_dirs, tmp_path):
    src = peft_dirs["llama", "prompt"]
    cfg = json.loads((src / "adapter_config.json").read_text())
    table = load_file(str(src / "adapter_model.safetensors"))  # prompt_embeddings (4, 32)
    mpt = {**cfg, "peft_type": "MULTITASK_PROMPT_TUNING", "num_ranks": 1}
    factors = {"prefix_task_cols": torch.ones(1, 4, 1), "prefix_task_rows": torch.ones(1, 1, 32)}
    cases = {
        "layers": ({**cfg, "num_layers": "3"}, table, "field 'num_layers' .* got '3'"),
        "dim": ({**cfg, "token_dim": 32.0}, table, "field 'token_dim' .* got 32.0"),
        "bool": ({**cfg, "num_virtual_tokens": True}, table, "'num_virtual_tokens' .* got True"),
        "tasks": ({**mpt, "num_tasks": 0}, {**table, **factors}, "field 'num_tasks' .* got 0"),
        "int": (cfg, {"prompt_embeddings": torch.zeros(4, 32, dtype=torch.int32)}, "dtype"),
    }
    for name, (config, tensors, msg) in cases.items():
        d = _edited(tmp_path, name, config, tensors)
        with pytest.raises(sp.SoftPromptError, match=msg) as e:
            sp.load_adapter(tiny_model("llama"), d)
        where = "adapter_model.safetensors" if name == "int" else "adapter_config.json"
        assert str(e.value).startswith(str(d / where)), name
    assert "has dtype torch.int32, not a float dtype" in str(e.value)
    ok = _edited(tmp_path, "tasks-null", {**mpt, "num_tasks": None}, {**table, **factors})
    assert sp.load_adapter(tiny_model("llama"), ok).adapters["default"].config.num_tasks == 1


def test_export_peft_says_the_task_template_is_dropped(tmp_path, tiny_folders, capsys):
    from transformers import AutoModelForCausalLM

    from softprompt.cli import main

    folder = tiny_folders["llama"]
    model = sp.attach(AutoModelForCausalLM.from_pretrained(folder), method_config("prompt"))
    perturb(model)
    template = "Review: {input}\nSentiment:"
    model.adapters["default"].task = {"kind": "generate", "template": template}
    model.save_adapter(tmp_path / "sp")
    args = ["export", str(tmp_path / "sp"), "--format", "peft", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["template"] == template and len(summary["warnings"]) == 1
    assert f"warning: {tmp_path / 'out'}: adapter 'default' was trained with the task " in (
        captured.err
    )
    got = peft_logits(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "out", IDS)
    assert_close(got, sp_logits(model, IDS), atol=1e-4, rtol=0)  # exported all the same
    with pytest.warns(UserWarning, match="format inputs with the template yourself"):
        save_peft(model, tmp_path / "api")
    model.adapters["default"].task = {"kind": "generate", "template": "{input}"}
    model.save_adapter(tmp_path / "plain")
    assert main(["export", str(tmp_path / "plain"), "--format", "peft"]) == 0
    captured = capsys.readouterr()
    assert "template" not in json.loads(captured.out.strip().splitlines()[-1])
    assert "warning" not in captured.err
