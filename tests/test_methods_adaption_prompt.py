"""Adaption prompts (softprompt.methods.adaption_prompt): PEFT's logits, zero-init exactness,
training and files, mixed batches and generation, refusals."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import method_config, perturb, tiny_model
from peft import AdaptionPromptConfig as PeftAdaptionPromptConfig
from peft import get_peft_model
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import softprompt as sp
from softprompt.errors import SoftPromptError

IDS = torch.tensor([[5, 17, 33, 8, 61, 9, 40], [70, 12, 3, 99, 45, 21, 6]])


def peft_adaption(base, adapter_len: int, adapter_layers: int, seed: int = 0):
    """PEFT's adaption-prompt model on ``base`` with random non-zero gates (PEFT inits them at
    zero) and its N(0, 1) prompts."""
    with warnings.catch_warnings():  # peft reads a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(
            base,
            PeftAdaptionPromptConfig(
                adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM"
            ),
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("adaption_gate"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
            elif name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=g))
    return pm.eval()


def save_peft_folder(pm, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pm.save_pretrained(path)
    return path


def logits(model, ids=IDS, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# ------------------------------------------------------------------------------ PEFT's logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])  # flex: 7e-8 too, but 46 s to compile
def test_peft_folder_gives_peft_logits(tmp_path, attn):
    """A PEFT ADAPTION_PROMPT folder (GQA: 4 query / 2 key-value heads, top 2 of 3 layers)
    loads with PEFT's logits; the adapter changes them."""
    base = tiny_model("llama", attn)
    pm = peft_adaption(copy.deepcopy(base), adapter_len=4, adapter_layers=2)
    path = save_peft_folder(pm, tmp_path / "peft")
    model = sp.load_adapter(base, path)
    ad = model.adapters["default"]
    assert ad.config.method == "adaption_prompt" and ad.adaption_gate.shape == (2, 1)
    want = logits(pm)
    assert_close(logits(model), want, atol=1e-4, rtol=0)
    assert (logits(model, adapter_names=[None, None]) - want).abs().max() > 1e-2


def test_bfloat16_base_matches_peft_within_rounding(tmp_path):
    """A bf16 base: the float32 prompt is cast where it enters (k_proj's dtype), as PEFT keeps
    its prompt in the model's dtype; logits agree to bf16 rounding (0.002 seen at |logit| 0.4)."""
    base = tiny_model("llama").to(torch.bfloat16)
    pm = peft_adaption(copy.deepcopy(base), adapter_len=4, adapter_layers=2)
    want = logits(pm).float()
    model = sp.load_adapter(base, save_peft_folder(pm, tmp_path / "peft"))
    assert model.adapters["default"].adaption_prompt.dtype == torch.float32  # master weights
    assert_close(logits(model).float(), want, atol=8e-3, rtol=0)
    assert (logits(model, adapter_names=[None, None]).float() - want).abs().max() > 5e-2


def test_export_to_peft_gives_peft_the_same_logits(tmp_path):
    """softprompt's adaption prompt written as a PEFT folder: PEFT loads it with softprompt's
    logits, and softprompt reads it back exactly."""
    from peft import PeftModel

    from softprompt.peft_compat import save_peft

    model = sp.attach(tiny_model("llama"), sp.AdaptionPromptConfig(num_virtual_tokens=4))
    with torch.no_grad():
        model.adapters["default"].adaption_gate.copy_(torch.tensor([[0.5], [1.2], [-0.9]]))
    out = save_peft(model, tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["adapter_layers"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pm = PeftModel.from_pretrained(tiny_model("llama"), out).eval()
    assert_close(logits(pm), logits(model), atol=1e-4, rtol=0)
    assert torch.equal(logits(sp.load_adapter(tiny_model("llama"), out)), logits(model))


def test_zero_gates_give_the_bare_model_exactly():
    """Zero-init gates: logits equal the bare model's bit for bit, whatever the prompts; the
    first gradient reaches only the gates (the paper's zero-init attention)."""
    for attn in ("eager", "sdpa"):
        base = tiny_model("llama", attn)
        bare = logits(base)
        model = sp.attach(base, sp.AdaptionPromptConfig(num_virtual_tokens=5))
        ad = model.adapters["default"]
        assert ad.adaption_prompt.abs().min() > 0 and not ad.adaption_gate.any()
        assert torch.equal(logits(model), bare)
        assert torch.equal(logits(model, adapter_names=[None, None]), bare)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        assert ad.adaption_gate.grad.abs().min() > 0
        assert not ad.adaption_prompt.grad.any()


# ------------------------------------------------------------------------------ training, files


def test_training_moves_only_prompts_and_gates_and_files_reload(tmp_path):
    """Loss falls on a memorisation task; only the prompt and gate train; the saved file has
    exactly their two tensors and reloads with equal logits."""
    base = tiny_model("llama")
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = sp.attach(base, sp.AdaptionPromptConfig(num_virtual_tokens=4, adapter_layers=2))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.adaption_prompt", "adapters.default.adaption_gate"}
    assert model.parameters_to_train() == [
        model.adapters["default"].adaption_prompt,
        model.adapters["default"].adaption_gate,
    ]
    # a random tiny model is near uniform (ln 120 = 4.79) and its 0.02-scale weights damp the
    # adapter: a higher rate than the default shows the fall within 60 steps
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=5e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15 and losses[-1] < min(losses[:30]), losses
    model.eval()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    from softprompt.transfer import prompt_rows  # SPoT similarity: the layers' prompts side by side

    ad = model.adapters["default"]
    assert torch.equal(prompt_rows(ad), torch.cat(list(ad.adaption_prompt.detach()), dim=1))
    out = model.save_adapter(tmp_path / "ad", trainable=True)
    assert set(load_file(out / "adapter.safetensors")) == {"adaption_prompt", "adaption_gate"}
    assert set(load_file(out / "trainable.safetensors")) == {"adaption_prompt", "adaption_gate"}
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["method"] == "adaption_prompt" and meta["config"]["adapter_layers"] == 2
    assert meta["slots"] == ["self.1", "self.2"]  # the top two of three layers
    for trainable_form in (False, True):
        again = sp.load_adapter(tiny_model("llama"), out, trainable=trainable_form)
        assert_close(logits(again), logits(model), atol=0, rtol=0)


def test_checkpointing_and_lower_layer_cache_give_the_same_gradients():
    """Gradient checkpointing (the prompt is projected outside the checkpointed layers) and the
    trainer's cache of the frozen layers below the lowest adapted one change nothing."""

    def grads(checkpoint: bool, cache: bool):
        model = sp.attach(
            tiny_model("llama"), sp.AdaptionPromptConfig(num_virtual_tokens=4, adapter_layers=2)
        )
        with torch.no_grad():
            model.adapters["default"].adaption_gate.fill_(1.3)
        if checkpoint:
            model.gradient_checkpointing_enable()
        model.train()
        if cache:
            assert model.cache_lower_layers() is not None
        out = []
        for _ in range(2):  # the second call reads the cache
            model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
            out += [p.grad.clone() for p in model.parameters_to_train()]
            model.zero_grad()
        return out

    ref = grads(False, False)
    assert ref[0].abs().max() > 0
    for flags in ((True, False), (False, True)):
        for a, b in zip(grads(*flags), ref, strict=True):
            assert_close(a, b, atol=1e-6, rtol=0)


def test_cli_trains_adaption_prompt(tmp_path, capsys, tiny_folders):
    from softprompt.cli import main

    rows = [{"text": f"word {i}", "label": ["negative", "positive"][i % 2]} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["train", "--model", tiny_folders["llama"], "--method", "adaption_prompt"]
    argv += ["--train", data, "--output", out, "--max-steps", 2, "--batch-size", 4]
    argv += ["--num-virtual-tokens", 3, "--adapter-layers", 2, "--no-progress"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["config"]["num_virtual_tokens"] == 3 and meta["config"]["adapter_layers"] == 2
    tensors = load_file(out / "adapter" / "adapter.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "adaption_prompt": (2, 3, 32),
        "adaption_gate": (2, 1),
    }
    bad = ["train", "--model", tiny_folders["llama"], "--method", "prefix", "--adapter-layers", 2]
    bad += ["--train", data, "--output", tmp_path / "bad"]
    assert main([str(a) for a in bad]) != 0
    assert "--adapter-layers applies to --method adaption_prompt" in capsys.readouterr().err


# ------------------------------------------------------------------------------ batches, generate


def mixed_model(attn: str):
    model = sp.attach(tiny_model("llama", attn))
    model.add_adapter("prefix", method_config("prefix"))
    model.add_adapter("ap", sp.AdaptionPromptConfig(num_virtual_tokens=4, adapter_layers=2))
    model.add_adapter("ap_all", sp.AdaptionPromptConfig(num_virtual_tokens=6, seed=3))
    perturb(model)
    with torch.no_grad():  # perturb moves zero gates by 0.05 only
        for name in ("ap", "ap_all"):
            gate = model.adapters[name].adaption_gate
            gate.copy_(torch.linspace(1.0, 2.0, gate.numel()).view_as(gate))
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mixed_batch_rows_equal_rows_alone(attn):
    """Rows of no adapter, a prefix and two adaption prompts (other lengths, other layers) in
    one forward each give what they give alone."""
    model = mixed_model(attn)
    names = [None, "prefix", "ap", "ap_all"]
    ids = torch.randint(3, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    got = logits(model, ids, adapter_names=names)
    for b, name in enumerate(names):
        alone = logits(model, ids[b : b + 1], adapter_names=[name])
        assert_close(got[b : b + 1], alone, atol=1e-5, rtol=0)
    assert (got[2] - logits(model, ids[2:3], adapter_names=[None])[0]).abs().max() > 1e-2


def test_left_padded_mixed_batch_rows_equal_rows_alone():
    """Rows of different lengths, left padded: each row's real tokens get what the row gets
    alone (the adapter term reads only the row's own query)."""
    from softprompt.lm import pad_left

    model = mixed_model("sdpa")
    names = ["ap", None, "ap_all", "prefix"]
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [18, 19]]
    ids, mask = pad_left(rows, 0)
    got = logits(model, ids, attention_mask=mask, adapter_names=names)
    for b, (row, name) in enumerate(zip(rows, names, strict=True)):
        alone = logits(model, torch.tensor([row]), adapter_names=[name])
        assert_close(got[b : b + 1, -len(row) :], alone, atol=1e-5, rtol=0)


def test_generate_mixed_equals_alone_and_step_by_step():
    """Greedy generate with the KV cache (adapter term recomputed from each step's query): a
    mixed batch equals each row alone, and equals argmax decoding by full forwards."""
    model = mixed_model("sdpa")
    names = [None, "prefix", "ap", "ap_all"]
    ids = torch.randint(3, 100, (4, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, adapter_names=names, **kw)
    for b, name in enumerate(names):
        alone = model.generate(input_ids=ids[b : b + 1], adapter_names=[name], **kw)
        assert torch.equal(out[b : b + 1], alone)
        seq = ids[b : b + 1]
        for _ in range(6):
            nxt = logits(model, seq, adapter_names=[name])[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(out[b : b + 1], seq)


def test_serving_engine_batches_adaption_prompts_with_other_rows(tiny_folders):
    """``engine.generate_rows`` (what ``softprompt serve`` runs): greedy rows of an adaption
    prompt, a prefix and the bare model in one call give their tokens alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.engine import GenerationRow, generate_rows

    tok = AutoTokenizer.from_pretrained(tiny_folders["llama"])
    model = sp.attach(AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]), tokenizer=tok)
    model.add_adapter("prefix", method_config("prefix"))
    model.add_adapter("ap", sp.AdaptionPromptConfig(num_virtual_tokens=3))
    perturb(model)
    with torch.no_grad():
        model.adapters["ap"].adaption_gate.fill_(1.5)
    prompts = [tok(t).input_ids for t in ("say hello", "a moving film", "what a waste")]
    names = ["ap", "prefix", None]
    rows = [GenerationRow(ids, name, 5) for ids, name in zip(prompts, names, strict=True)]
    together = generate_rows(model, tok, rows)
    alone = [generate_rows(model, tok, [r])[0] for r in rows]
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]
    bare = generate_rows(model, tok, [GenerationRow(prompts[0], None, 5)])[0]
    assert bare["token_ids"] != together[0]["token_ids"]


# ------------------------------------------------------------------------------ refusals


def test_refuses_what_it_cannot_serve(tmp_path):
    for family, message in (
        ("gpt2", "need separate k_proj and v_proj"),
        ("qwen3", "normalises queries/keys per head (q_norm, k_norm)"),
        ("t5", "are for decoder-only causal LMs"),
        ("bert", "are for decoder-only causal LMs"),
    ):
        with pytest.raises(SoftPromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sp.attach(tiny_model(family), sp.AdaptionPromptConfig())
    # built without init (as from a file): refused at the first forward
    model = sp.attach(tiny_model("gpt2"))
    model.add_adapter("ap", sp.AdaptionPromptConfig(), _init=False)
    with pytest.raises(SoftPromptError, match="need separate k_proj and v_proj"):
        logits(model)
    with pytest.raises(SoftPromptError, match="adapter_layers=4 but the model has 3 layers"):
        sp.attach(tiny_model("llama"), sp.AdaptionPromptConfig(adapter_layers=4))
    with pytest.raises(SoftPromptError, match="adapter_layers must be None .* got 0"):
        sp.AdaptionPromptConfig(adapter_layers=0)


def test_export_formats_other_engines_refused(tmp_path):
    from softprompt.export import export_prefix_kv, export_prompt_embeds

    model = sp.attach(tiny_model("llama"), sp.AdaptionPromptConfig(num_virtual_tokens=2))
    folder = model.save_adapter(tmp_path / "ad")
    for export in (export_prompt_embeds, export_prefix_kv):
        with pytest.raises(SoftPromptError, match="is an adaption prompt: .* --format peft"):
            export(folder)


def test_o_proj_bias_native_works_peft_folder_refused(tmp_path):
    """With a bias on o_proj the seam's form (before o_proj) still starts exact; PEFT's form
    (o_proj(adapter) after o_proj) adds the bias twice, so its folders are refused."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=120,
        attention_bias=True,
    )
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises biases at zero
        for layer in base.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.5)
    bare = logits(base)
    model = sp.attach(copy.deepcopy(base), sp.AdaptionPromptConfig(num_virtual_tokens=3))
    assert torch.equal(logits(model), bare)
    pm = peft_adaption(copy.deepcopy(base), adapter_len=3, adapter_layers=1)
    with torch.no_grad():
        pm.base_model.model.model.layers[1].self_attn.adaption_gate.zero_()
        assert (logits(pm) - bare).abs().max() > 1e-3  # PEFT: not the bare model at gate 0
    path = save_peft_folder(pm, tmp_path / "peft")
    with pytest.raises(SoftPromptError, match="o_proj has a bias .* a second time"):
        sp.load_adapter(base, path)


# ------------------------------------------------------------------------------ real weights


@pytest.mark.slow
def test_smollm2_peft_folder_gives_peft_logits(tmp_path):
    """SmolLM2-135M (9 query / 3 key-value heads, head dim 64): a PEFT adaption-prompt folder
    on its top 4 layers loads with PEFT's logits, in eager and sdpa."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.assets import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["Review: a joy to watch.\nSentiment:"], return_tensors="pt").input_ids
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for attn in ("eager", "sdpa"):
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation=attn
            ).eval()
            pm = peft_adaption(copy.deepcopy(base), adapter_len=10, adapter_layers=4)
            want = logits(pm, ids)
            folder = save_peft_folder(pm, tmp_path / attn)
            del pm
            model = sp.load_adapter(base, folder)
            got = logits(model, ids)
            assert_close(got, want, atol=1e-4, rtol=0)
            assert (logits(model, ids, adapter_names=[None]) - want).abs().max() > 1e-2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_smollm2_learns_label_words_at_the_default_rate():
    """Real weights, the default rate (9e-3): the label-word loss of four reviews falls within
    five steps (3.85 -> 3.22 seen, falling faster; 0.09 after 15 steps on the top 8 layers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.assets import resolve_model
    from softprompt.lm import lm_loss, pad_left

    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = sp.attach(base, sp.AdaptionPromptConfig(num_virtual_tokens=10, adapter_layers=4))
    rows = [
        ("A joy to watch.", " positive"),
        ("Dull and overlong.", " negative"),
        ("Great fun.", " positive"),
        ("A waste of time.", " negative"),
    ]
    texts = [tok(f"Review: {t}\nSentiment:{a}").input_ids for t, a in rows]
    ids, mask = pad_left(texts, tok.pad_token_id)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=sp.AdaptionPromptConfig.lr_for(base))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.train()
        losses = []
        for _ in range(5):
            loss = lm_loss(model, ids, mask, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(before)
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses
