"""Properties of the wrapper, for every method on every family it applies to (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DECODER_ONLY,
    ENC_DEC,
    ENCODER,
    FAMILIES,
    METHODS,
    inputs_for,
    method_config,
    out_tensor,
    perturb,
    tiny_model,
)
from torch import nn
from torch.testing import assert_close
from transformers import AutoTokenizer, DynamicCache, StaticCache

import softprompt as sp
from softprompt.model import PrefixState

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0], [14, 15, 16, 17, 0, 0]])
MASK = (IDS != 0).long()
LENS = MASK.sum(1).tolist()
TOL = dict(atol=1e-4, rtol=0)


def left_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [r[m.bool()] for r, m in zip(ids, mask, strict=True)]
    t = ids.shape[1]
    new = torch.stack([torch.cat([torch.zeros(t - len(r), dtype=r.dtype), r]) for r in rows])
    return new, (new != 0).long()


def attached(family: str, method: str | None, attn: str = "sdpa", **kw) -> sp.SoftPromptModel:
    model = sp.attach(tiny_model(family, attn))
    if method is not None:
        model.add_adapter("a", method_config(method, **kw))
        perturb(model)
    return model


def applicable(family: str, method: str) -> bool:
    return True  # every method applies to every family: input-level and per-layer both work


# ------------------------------------------------------------------------------ the bare model


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_without_adapter_is_the_base_model(family):
    base = tiny_model(family)
    kw = inputs_for(family, IDS, MASK)
    with torch.no_grad():
        ref = out_tensor(family, base(**kw))
        got = out_tensor(family, sp.attach(base)(**kw))
    assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_is_frozen_and_in_eval(family):
    model = attached(family, "prefix")
    assert not model.base_model.training
    model.train()
    assert not model.base_model.training and model.adapters["a"].training
    frozen = [k for k, p in model.named_parameters() if not k.startswith("adapters.")]
    assert frozen and all(not dict(model.named_parameters())[k].requires_grad for k in frozen)
    assert all(p.requires_grad for p in model.adapters["a"].parameters())


# ------------------------------------------------------------------------------ shapes and rows


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_have_base_shapes(family, method):
    base = tiny_model(family)
    kw = inputs_for(family, IDS, MASK)
    with torch.no_grad():
        ref = base(**kw, output_hidden_states=True)
        model = attached(family, method)
        out = model(**kw, output_hidden_states=True)
    assert out_tensor(family, out).shape == out_tensor(family, ref).shape
    hs = "encoder_hidden_states" if family in ENC_DEC else "hidden_states"
    assert [h.shape for h in out[hs]] == [h.shape for h in ref[hs]]
    # the adapter changes the output (it is really injected)
    assert (out_tensor(family, out) - out_tensor(family, ref)).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_unbatched(family, method):
    model = attached(family, method)
    pads = [("right", IDS, MASK)]
    if family not in ENC_DEC:  # BART's learned encoder positions take no position_ids
        pads.append(("left", *left_pad(IDS, MASK)))
    with torch.no_grad():
        for side, ids, mask in pads:
            out = out_tensor(family, model(**inputs_for(family, ids, mask)))
            for b, n in enumerate(LENS):
                sl = slice(0, n) if side == "right" else slice(ids.shape[1] - n, None)
                alone = model(**inputs_for(family, ids[b : b + 1, sl], mask[b : b + 1, sl]))
                alone = out_tensor(family, alone)[0]
                got = out[b] if family in ENC_DEC else out[b, sl]
                assert_close(got, alone, **TOL, msg=f"{side} padding, row {b}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", DECODER_ONLY + ENCODER)
def test_caller_position_ids_are_honoured(family, method):
    model = attached(family, method)
    ids, mask = IDS[:1], MASK[:1]
    with torch.no_grad():
        plain = out_tensor(family, model(input_ids=ids, attention_mask=mask))
        zero = out_tensor(
            family, model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(6)[None])
        )
        gap = torch.arange(6)[None] + 40 * (torch.arange(6)[None] >= 3)  # RoPE: shifts cancel
        shifted = out_tensor(family, model(input_ids=ids, attention_mask=mask, position_ids=gap))
    assert_close(zero, plain, **TOL)
    assert (shifted - plain).abs().max() > 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_token_type_ids_are_honoured(method):
    model = attached("bert", method)
    with torch.no_grad():
        t0 = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        t1 = model(input_ids=IDS, attention_mask=MASK, token_type_ids=torch.ones_like(IDS))
        alone = model(input_ids=IDS[1:2, :3], token_type_ids=torch.ones(1, 3, dtype=torch.long))
    assert (t1.last_hidden_state - t0).abs().max() > 1e-3
    assert_close(t1.last_hidden_state[1, :3], alone.last_hidden_state[0], **TOL)


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_agree(family, method):
    kw = inputs_for(family, IDS, MASK)
    sdpa, eager = attached(family, method, "sdpa"), attached(family, method, "eager")
    assert sdpa.base_model.config._attn_implementation == "softprompt_sdpa"
    assert eager.base_model.config._attn_implementation == "softprompt_eager"
    with torch.no_grad():
        a = out_tensor(family, sdpa(**kw))
        b = out_tensor(family, eager(**kw))
    real = MASK.bool() if family != "t5" else torch.ones(a.shape[:2], dtype=torch.bool)
    assert_close(a[real], b[real], **TOL)


# ------------------------------------------------------------------------------ several adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_bank_one_adapter_per_row(family):
    model = sp.attach(tiny_model(family))
    for i, method in enumerate(METHODS):
        model.add_adapter(method, method_config(method, n=2 + i))
    perturb(model)
    names = ["prefix", None, "prompt"]
    kw = inputs_for(family, IDS, MASK)
    with torch.no_grad():
        mixed = out_tensor(family, model(**kw, adapter_names=names))
        bare = out_tensor(family, model.base_model(**kw))
        for b, name in enumerate(names):
            n = LENS[b]
            one = inputs_for(family, IDS[b : b + 1, :n], MASK[b : b + 1, :n])
            alone = out_tensor(family, model(**one, adapter_names=[name]))[0]
            got = mixed[b] if family in ENC_DEC else mixed[b, :n]
            assert_close(got, alone, **TOL, msg=f"row {b} ({name})")
        ref = bare[1] if family in ENC_DEC else bare[1, : LENS[1]]
        assert_close(mixed[1] if family in ENC_DEC else mixed[1, : LENS[1]], ref, **TOL)
        # every method in one batch
        k = len(METHODS)
        four = model(
            **inputs_for(family, IDS[:1].repeat(k, 1), MASK[:1].repeat(k, 1)),
            adapter_names=list(METHODS),
        )
        for b, name in enumerate(METHODS):
            alone = out_tensor(
                family, model(**inputs_for(family, IDS[:1], MASK[:1]), adapter_names=[name])
            )
            assert_close(out_tensor(family, four)[b], alone[0], **TOL)


def test_unknown_adapter_names_are_rejected():
    model = attached("gpt2", "prompt")
    with pytest.raises(sp.SoftPromptError, match="unknown adapter"):
        model(input_ids=IDS, adapter_names=["a", "nope", None])
    with pytest.raises(sp.SoftPromptError, match="3 rows"):
        model(input_ids=IDS, adapter_names=["a"])


def test_only_the_active_adapter_trains():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("x", method_config("deep"))
    model.add_adapter("y", method_config("prompt"))
    model.set_active("x")
    train = {k for k, p in model.named_parameters() if p.requires_grad}
    assert train == {"adapters.x.prefix"}
    assert model.parameters_to_train() == [model.adapters["x"].prefix]
    n, total, line = model.trainable_parameters()
    assert n == model.adapters["x"].prefix.numel() == 3 * 3 * 2 * 2 * 8
    assert line == f"trainable {n:,} of {total:,} ({100 * n / total:.3f}%)"


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_moves_only_the_adapter(family, method):
    model = attached(family, method)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters_to_train(), lr=1e-2)
    model.train()
    kw = inputs_for(family, IDS, MASK)
    losses = []
    for _ in range(5):
        out = model(**kw)
        if family in ENCODER:
            target = torch.linspace(-1, 1, out.last_hidden_state.shape[-1])
            loss = (out.last_hidden_state[:, 0] - target).pow(2).mean()
        else:
            labels = (
                kw["decoder_input_ids"] if family in ENC_DEC else IDS.masked_fill(MASK == 0, -100)
            )
            loss = model(**kw, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", ENC_DEC)
@pytest.mark.parametrize("method", ["prefix", "deep"])
def test_encoder_decoder_prefixes_are_distinct_and_all_trained(family, method):
    model = attached(family, method)
    ad = model.adapters["a"]
    kinds = {model.info.slots[s].kind for s in ad.layout.slots}
    assert kinds == {"encoder", "decoder", "cross"}
    n_dec = sum(s.kind == "decoder" for s in model.info.slots)
    assert sum(model.info.slots[s].kind == "cross" for s in ad.layout.slots) == n_dec
    kw = inputs_for(family, IDS, MASK)
    model(**kw, labels=kw["decoder_input_ids"]).loss.backward()
    grads = ad.layout.split(ad.prefix.grad if method == "deep" else _flat_grad(model, kw))
    for slot, (gk, gv) in grads.items():
        assert gk.abs().sum() > 0 and gv.abs().sum() > 0, model.info.slots[slot]
    # distinct: every slot's key prefix is its own tensor region (no shared storage/values)
    kv = ad.kv()
    keys = [kv[s][0] for s in ad.layout.slots]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.equal(keys[i], keys[j])


def _flat_grad(model, kw):
    ad = model.adapters["a"]
    flat = ad.flat().detach().requires_grad_(True)
    ad.baked = flat
    model.zero_grad()
    model(**kw, labels=kw["decoder_input_ids"]).loss.backward()
    ad.baked = None
    return flat.grad


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bart", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(family, method):
    from transformers.modeling_layers import GradientCheckpointingLayer

    grads = []
    for ckpt in (False, True):
        model = attached(family, method)
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        # a layer's submodules run again in backward exactly when the layer is recomputed
        layers = [
            m for m in model.base_model.modules() if isinstance(m, GradientCheckpointingLayer)
        ]
        runs = []
        for layer in layers:
            inner = next(
                m for m in layer.modules() if m is not layer and not isinstance(m, nn.ModuleList)
            )
            inner.register_forward_pre_hook(lambda *a, runs=runs: runs.append(1))
        kw = inputs_for(family, IDS, MASK)
        out = model(**kw)
        t = out_tensor(family, out)
        in_forward = len(runs)
        (t * torch.linspace(-1, 1, t.shape[-1])).sum().backward()
        assert in_forward >= len(layers)
        assert len(runs) - in_forward == (in_forward if ckpt else 0)  # each layer call recomputed
        grads.append([p.grad.clone() for p in model.parameters_to_train()])
    for a, b in zip(*grads, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ generation


def _manual_greedy(model, ids, mask, steps, **kw):
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, **kw).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", DECODER_ONLY)
def test_greedy_generate_equals_manual_loop(family, method):
    model = attached(family, method)
    ids, mask = left_pad(IDS, MASK)
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        ref = _manual_greedy(model, ids, mask, 6)
    assert torch.equal(gen, ref)


def _greedy_scores(model, ids, mask, **kw):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences, torch.stack(out.scores, 1)  # (B, T + 5), (B, 5, V)


@pytest.mark.parametrize("method", ["prompt", "ptuning", None])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_takes_caller_position_ids(family, method):
    """Caller position ids are extended over the spliced virtual tokens at every step: the
    positions generate would make give the same tokens and scores; other positions are used."""
    model = attached(family, method)
    ids, mask = left_pad(IDS, MASK)
    pos = sp.model.mask_positions(mask)  # (B, T): what generate makes from the mask
    with torch.no_grad():
        seqs, scores = _greedy_scores(model, ids, mask)
        got_seqs, got_scores = _greedy_scores(model, ids, mask, position_ids=pos)
        assert torch.equal(got_seqs, seqs)
        assert_close(got_scores, scores, atol=1e-5, rtol=0)
        # positions 7 on: GPT-2's learned positions see them; the manual loop agrees at each step
        later = pos + 7
        got_seqs, got_scores = _greedy_scores(model, ids, mask, position_ids=later)
        steps = got_seqs.shape[1] - ids.shape[1]
        full = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], 1)
        full_pos = torch.cat([later, later[:, -1:] + 1 + torch.arange(steps)], 1)
        for t in range(steps):
            n = ids.shape[1] + t
            logits = model(
                input_ids=got_seqs[:, :n], attention_mask=full[:, :n], position_ids=full_pos[:, :n]
            ).logits[:, -1]
            assert_close(got_scores[:, t], logits, atol=1e-4, rtol=0)
            assert torch.equal(got_seqs[:, n], logits.argmax(-1))
        if method is None:  # the bare model: exactly the base model's generate
            base = _greedy_scores(model.base_model, ids, mask, position_ids=later)
            assert torch.equal(base[0], got_seqs)
            assert_close(base[1], got_scores, atol=0, rtol=0)
    if family == "gpt2":
        assert (got_scores - scores).abs().max() > 1e-3  # the later positions were used


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ENC_DEC)
def test_encoder_decoder_greedy_generate_equals_manual_loop(family, method):
    model = attached(family, method)
    with torch.no_grad():
        gen = model.generate(
            input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, eos_token_id=None
        )
        dec = gen[:, :1]
        for _ in range(5):
            logits = model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, dec)


@pytest.mark.parametrize("method", METHODS)
def test_generate_beam_sampling_static_cache_and_rows(method):
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("a", method_config(method))
    model.add_adapter("b", method_config("prefix" if method != "prefix" else "prompt", n=2))
    perturb(model)
    ids, mask = left_pad(IDS, MASK)
    names = ["a", "b", None]
    with torch.no_grad():
        greedy = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
        static = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
            return_dict_in_generate=True,
        )
        assert isinstance(static.past_key_values, StaticCache)  # the static cache was used
        assert torch.equal(greedy, static.sequences)
        for b, name in enumerate(names):  # each row alone, with its adapter
            n = LENS[b]
            alone = model.generate(
                input_ids=ids[b : b + 1, -n:],
                adapter_names=[name],
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
            )
            assert torch.equal(greedy[b, -(n + 5) :], alone[0])
        beams = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=5,
            num_beams=3,
            do_sample=False,
            pad_token_id=0,
            num_return_sequences=2,
        )
        assert beams.shape == (6, ids.shape[1] + 5)
        # beam search of width 1 is greedy
        one = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=5,
            num_beams=1,
            do_sample=False,
            pad_token_id=0,
        )
        assert torch.equal(one, greedy)
        torch.manual_seed(0)
        s1 = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=5,
            do_sample=True,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        s2 = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=5,
            do_sample=True,
            pad_token_id=0,
        )
        assert torch.equal(s1, s2) and s1.shape == greedy.shape


@pytest.mark.parametrize("method", METHODS)
def test_continue_generation_from_returned_cache(method):
    model = attached("llama", method)
    ids = IDS[:1]
    with torch.no_grad():
        full = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        first = model.generate(
            input_ids=ids,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
        seen = []  # query lengths entering block 0: the continuation must read only new tokens
        hook = model.base_model.model.layers[0].register_forward_pre_hook(
            lambda m, args, kw: seen.append((args[0] if args else kw["hidden_states"]).shape[1]),
            with_kwargs=True,
        )
        more = model.generate(
            input_ids=first.sequences,
            past_key_values=first.past_key_values,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        hook.remove()
    assert torch.equal(more, full)
    assert seen == [1, 1, 1, 1], seen  # the cache was used, nothing recomputed


@pytest.mark.parametrize("method", METHODS)
def test_manual_incremental_decoding_with_cache(method):
    model = attached("llama", method)
    ids, mask = left_pad(IDS, MASK)
    with torch.no_grad():
        ref = _manual_greedy(model, ids, mask, 4)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        seq, m = ids, mask
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            out = model(
                input_ids=nxt, attention_mask=m, past_key_values=out.past_key_values, use_cache=True
            )
    assert torch.equal(seq, ref)


# ------------------------------------------------------------------------------ placement / init


def test_template_markers_equal_prepend_and_append():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("pre", sp.PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("tpl", sp.PromptTuningConfig(num_virtual_tokens=3, placement="template"))
    with torch.no_grad():
        model.adapters["tpl"].embedding.copy_(model.adapters["pre"].embedding)
        ids = IDS[:1]
        marks = torch.tensor([[-1, -2, -3]])
        pre = model(input_ids=ids, adapter_names=["pre"]).logits
        tpl = model(input_ids=torch.cat([marks, ids], 1), adapter_names=["tpl"]).logits
        assert_close(pre[0], tpl[0, 3:], atol=1e-5, rtol=0)
        # append: after the real tokens, which a bidirectional encoder reads (a decoder-only LM
        # never would: refused there, below)
        enc = sp.attach(tiny_model("bert"))
        enc.add_adapter("app", sp.PromptTuningConfig(num_virtual_tokens=3, placement="append"))
        enc.add_adapter("tpl", sp.PromptTuningConfig(num_virtual_tokens=3, placement="template"))
        enc.adapters["tpl"].embedding.copy_(enc.adapters["app"].embedding)
        app = enc(input_ids=ids, adapter_names=["app"]).last_hidden_state
        tpl = enc(input_ids=torch.cat([ids, marks], 1), adapter_names=["tpl"]).last_hidden_state
        assert_close(app[0], tpl[0, :6], atol=1e-5, rtol=0)
        assert (app - enc(input_ids=ids, adapter_names=[None]).last_hidden_state).abs().max() > 1e-3
    for config in (
        sp.PromptTuningConfig(num_virtual_tokens=3, placement="append"),
        sp.PTuningConfig(num_virtual_tokens=3, placement="append"),
    ):
        with pytest.raises(sp.SoftPromptError, match="causal attention never reads them"):
            model.add_adapter("app", config)
        # soft segments inside a template: [soft 0..1] x x [soft 2] x
        mid = torch.tensor([[-1, -2, 5, 6, -3, 7]])
        emb = model.base_model.get_input_embeddings()(torch.tensor([[1, 1, 5, 6, 1, 7]]))
        table = model.adapters["tpl"].embedding
        emb[0, [0, 1, 4]] = table
        ref = model.base_model(inputs_embeds=emb).logits
        got = model(input_ids=mid, adapter_names=["tpl"]).logits
        assert_close(got, ref, atol=1e-5, rtol=0)


def test_random_init_is_scaled_to_the_embedding_table():
    model = sp.attach(tiny_model("llama"))
    model.base_model.get_input_embeddings().weight.data.mul_(0.02)
    ad = model.add_adapter("r", sp.PromptTuningConfig(num_virtual_tokens=200, init="random"))
    table = model.base_model.get_input_embeddings().weight
    assert abs(ad.embedding.std().item() - table.std().item()) < 0.1 * table.std().item()


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_text_init_equals_reading_the_text(method):
    model = sp.attach(tiny_model("llama"))
    text = [21, 22, 23, 24]
    cfg = method_config(method, n=4, init="text", init_token_ids=text)
    model.add_adapter("t", cfg)
    ids = IDS[:1]
    with torch.no_grad():
        got = model(input_ids=ids).logits[0]
        ref = model.base_model(input_ids=torch.cat([torch.tensor([text]), ids], 1)).logits[0, 4:]
    assert_close(got, ref, atol=1e-5, rtol=0)


def test_label_init_uses_the_label_words():
    model = sp.attach(tiny_model("llama"))
    ad = model.add_adapter(
        "l", sp.PromptTuningConfig(num_virtual_tokens=5, init="labels", init_token_ids=[30, 31])
    )
    table = model.base_model.get_input_embeddings().weight
    assert_close(ad.embedding[:2], table[[30, 31]])


def test_text_init_without_tokenizer_is_a_clear_error():
    model = sp.attach(tiny_model("llama"))
    with pytest.raises(sp.SoftPromptError, match="tokenizer"):
        model.add_adapter("t", sp.PromptTuningConfig(init="text", init_text="hello"))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_prefix_mlp_init_reproduces_the_activations(family):
    """Prefix tuning's MLP starts out producing exactly deep prompt's flat init (same targets)."""
    model = sp.attach(tiny_model(family))
    text = [21, 22, 23]
    pre = model.add_adapter(
        "p", sp.PrefixTuningConfig(num_virtual_tokens=3, init="text", init_token_ids=text)
    )
    deep = model.add_adapter(
        "d", sp.DeepPromptConfig(num_virtual_tokens=3, init="text", init_token_ids=text)
    )
    with torch.no_grad():
        assert_close(pre.flat(), deep.prefix, atol=1e-4, rtol=1e-4)
        # and the prefix is the model's own keys/values of the text at layer 0
        k0, v0 = deep.kv()[0]
        cap = sp._hf.capture_attention_kv(model.base_model, model.info, text)
        assert_close(k0, cap[0][0]) and assert_close(v0, cap[0][1])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method", ["deep", "prefix"])
def test_text_init_prefix_equals_reading_the_text_first(family, method):
    """On rotary causal LMs a prefix from text init is the text's K/V at positions -P..-1, so at
    step 0 the adapter gives exactly what the text prepended to the input gives."""
    model = sp.attach(tiny_model(family))
    text = [21, 22, 23, 24]
    model.add_adapter("t", method_config(method, n=4, init="text", init_token_ids=text))
    ids = IDS[:1]
    with torch.no_grad():
        got = model(input_ids=ids).logits[0]
        ref = model.base_model(input_ids=torch.cat([torch.tensor([text]), ids], 1)).logits[0, 4:]
        bare = model.base_model(input_ids=ids).logits[0]
    assert_close(got, ref, atol=1e-4, rtol=0)
    assert (got - bare).abs().max() > 1e-2  # the prefix does change the output


def test_deep_prompt_on_top_half_only():
    model = sp.attach(tiny_model("llama"))  # 3 layers
    ad = model.add_adapter("d", sp.DeepPromptConfig(num_virtual_tokens=2, layers="top_half"))
    assert [model.info.slots[s].layer for s in ad.layout.slots] == [1, 2]
    ad2 = model.add_adapter("e", sp.DeepPromptConfig(num_virtual_tokens=2, layers=[0]))
    assert ad2.prefix.shape == (2, 2 * 2 * 8)
    with pytest.raises(sp.SoftPromptError, match="out of range"):
        model.add_adapter("f", sp.DeepPromptConfig(layers=[5]))


def test_prefix_memoises_in_eval_and_reruns_after_an_update():
    model = attached("llama", "prefix")
    ad = model.adapters["a"]
    calls = []
    ad.mlp.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
        model(input_ids=IDS)
    assert len(calls) == 1
    with torch.no_grad():
        ad.embedding.weight.add_(1.0)
        model(input_ids=IDS)
    assert len(calls) == 2


def test_prefix_mlp_runs_once_per_forward_not_per_row():
    model = attached("llama", "prefix")
    calls = []
    model.adapters["a"].mlp.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    model.train()
    model(input_ids=IDS.repeat(8, 1)).logits.sum().backward()
    ad = model.adapters["a"]
    assert calls == [(ad.num_virtual_tokens, model.info.hidden_size)]  # (P, d), not B copies


def test_generate_with_different_prompt_lengths_and_no_padding():
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("short", sp.PromptTuningConfig(num_virtual_tokens=2))
    model.add_adapter("long", sp.PTuningConfig(num_virtual_tokens=5, encoder_hidden_size=16))
    perturb(model)
    ids = IDS[:1].repeat(2, 1)
    with torch.no_grad():
        both = model.generate(
            input_ids=ids,
            adapter_names=["short", "long"],
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        for b, name in enumerate(["short", "long"]):
            alone = model.generate(
                input_ids=ids[:1],
                adapter_names=[name],
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            assert torch.equal(both[b], alone[0])


# ------------------------------------------------------------------------------ shared prompts


def _bank(family: str) -> sp.SoftPromptModel:
    model = sp.attach(tiny_model(family))
    model.add_adapter("p3", sp.PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("p5", sp.PTuningConfig(num_virtual_tokens=5, encoder_hidden_size=16))
    model.add_adapter("pre", sp.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    perturb(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_applies_to_rotary_causal_lms_only(family):
    info = sp.attach(tiny_model(family)).info
    assert info.shares_prompt == (family in ("llama", "qwen3"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shared_prompt_equals_splicing(family):
    """Prepended virtual tokens run once as a key/value prefix: the same logits, gradients and
    generated tokens as splicing them into every row (left padding, mixed adapters)."""
    model = _bank(family)
    ids, mask = left_pad(IDS.repeat(2, 1), MASK.repeat(2, 1))
    rows = ["p3", "p5", "pre", None, "p5", "p3"]

    def run(shared: bool):
        model.prompt_sharing = "always" if shared else "never"
        model.zero_grad()
        model.set_active("p5")
        out = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        (out * mask[..., None]).square().sum().backward()
        grad = model.adapters["p5"].embedding.grad.clone()
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=rows,
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out.detach() * mask[..., None], grad, gen

    calls, splices = [], []
    orig, orig_splice = sp._hf.prompt_kv, model._splice
    sp._hf.prompt_kv = lambda *a: calls.append(1) or orig(*a)
    model._splice = lambda *a: splices.append(1) or orig_splice(*a)
    try:
        fast = run(True)
        # p3 and p5 differ in length: one pass each in the forward and in generate
        assert len(calls) == 4, f"the shared path ran {len(calls)} times"
        assert not splices, "the shared run spliced"
        slow = run(False)
        assert len(calls) == 4, "the splice path computed shared prompts"
        assert splices, "the 'never' run did not splice"
    finally:
        sp._hf.prompt_kv = orig
        del model._splice
    assert_close(fast[0], slow[0], **TOL)
    assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-4)
    assert fast[1].abs().max() > 1e-3
    assert torch.equal(fast[2], slow[2])


def test_prompt_sharing_auto_splices_under_autograd_on_an_accelerator(monkeypatch):
    """The default shares on the CPU (under autograd only where an adapter has two rows or
    more: with one row each there is nothing to share); on an accelerator only without autograd
    (serving), where the shared prefix is memoised; 'always'/'never' override; nonsense is
    refused."""
    model = _bank("llama")
    prompts = model._prompts(["p5"])

    def shares(grad: bool, rows=None) -> bool:
        with torch.set_grad_enabled(grad):
            return model._shared_ok(prompts, False, None, None, {}, rows)

    assert model.prompt_sharing == "auto"
    assert shares(True) and shares(False)
    assert shares(True, ["p5", "p5", None]) and shares(False, ["p5"])
    assert not shares(True, ["p5"]) and not shares(True, ["p5", None])
    # a training forward of one row splices (no shared pass), two rows of the adapter share
    calls = []
    real = model._kept.prompt_kvs
    model._kept.prompt_kvs = lambda *a: calls.append(1) or real(*a)
    try:
        for n in (1, 2):
            model(input_ids=torch.tensor([[5, 6, 7]] * n), adapter_names=["p5"] * n)
    finally:
        del model._kept.prompt_kvs
    assert calls == [1]
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert not shares(True) and shares(False)
    model.prompt_sharing = "always"
    assert shares(True) and shares(False)
    model.prompt_sharing = "never"
    assert not shares(True) and not shares(False)
    with pytest.raises(sp.SoftPromptError, match="prompt_sharing must be"):
        model.prompt_sharing = "sometimes"


def test_shared_prompt_keeps_the_cache_to_real_tokens():
    model = _bank("llama")
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK, adapter_names="p5", use_cache=True)
    assert out.past_key_values.get_seq_length() == IDS.shape[1]
    model.info.shares_prompt = False
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK, adapter_names="p5", use_cache=True)
    assert out.past_key_values.get_seq_length() == IDS.shape[1] + 5


def test_shared_prompt_is_memoised_without_grad_until_the_adapter_changes():
    model = _bank("llama")
    calls = []
    orig = sp._hf.prompt_kv
    sp._hf.prompt_kv = lambda *a: calls.append(1) or orig(*a)
    try:
        with torch.no_grad():
            first = model(input_ids=IDS, adapter_names="p3").logits
            again = model(input_ids=IDS, adapter_names="p3").logits
            assert len(calls) == 1
            model.adapters["p3"].embedding.add_(0.5)
            moved = model(input_ids=IDS, adapter_names="p3").logits
            assert len(calls) == 2
        model(input_ids=IDS, adapter_names="p3")  # with autograd: always computed afresh
        model(input_ids=IDS, adapter_names="p3")
        assert len(calls) == 4
    finally:
        sp._hf.prompt_kv = orig
    assert torch.equal(first, again)
    assert (moved - first).abs().max() > 1e-4
    model.delete_adapter("p3")
    model.add_adapter("p3", sp.PromptTuningConfig(num_virtual_tokens=3, seed=7))
    with torch.no_grad():
        fresh = model(input_ids=IDS, adapter_names="p3").logits
        model.info.shares_prompt = False
        spliced = model(input_ids=IDS, adapter_names="p3").logits
    assert_close(fresh, spliced, **TOL)


# ------------------------------------------------------------------------------ prefix tables
def test_mixed_prefix_tables_are_kept_across_no_grad_calls_until_an_adapter_changes():
    """A mixed batch reads its per-slot prefixes from stacked tables; without autograd they are
    built once per adapter set and reused, and rebuilt when any adapter's prefix changes."""
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("a", sp.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    model.add_adapter("b", sp.DeepPromptConfig(num_virtual_tokens=2))
    perturb(model)
    model.eval()
    rows = ["a", "b", None]
    ids, mask = left_pad(IDS.repeat(2, 1)[:3], MASK.repeat(2, 1)[:3])
    built = []
    orig = PrefixState._table
    PrefixState._table = lambda self, *a: built.append(1) or orig(self, *a)
    try:
        with torch.no_grad():
            first = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            n = len(built)
            assert n == len(model.info.slots)
            again = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            assert len(built) == n, "tables were rebuilt for the same adapters"
            model.adapters["b"].prefix.add_(0.25)  # in place: the version moves
            moved_prefix = model.adapters["b"].prefix.detach().clone()
            moved = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            assert len(built) == 2 * n
        with torch.enable_grad():
            model(input_ids=ids, attention_mask=mask, adapter_names=rows)
            assert len(built) == 3 * n, "under autograd the tables are built afresh"
    finally:
        PrefixState._table = orig
    assert torch.equal(first, again)
    assert len(model._kept.banks) == 1
    model.delete_adapter("b")  # a deleted adapter's tensors are not kept alive by the tables
    assert not model._kept.banks
    model.add_adapter("b", sp.DeepPromptConfig(num_virtual_tokens=2))
    with torch.no_grad():
        model.adapters["b"].prefix.copy_(moved_prefix)
    # row by row, each adapter alone (no tables): the same logits as the mixed batch
    for b, name in enumerate(rows):
        with torch.no_grad():
            alone = model(
                input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], adapter_names=[name]
            )
        real = mask[b].bool()
        assert_close(moved[b][real], alone.logits[0][real], **TOL)
    assert not torch.allclose(moved[1][mask[1].bool()], first[1][mask[1].bool()])
    assert_close(moved[0], first[0], **TOL)  # row "a" did not change


@pytest.mark.parametrize("opt", ["fused", "foreach"])
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_kept_no_grad_tables_follow_an_optimizer_step(tmp_path, method, opt):
    """Fused and foreach AdamW update parameters in place without bumping their versions: the
    kept no-grad tables (shared prompt keys/values, prefix MLP output, stacked mixed-batch
    tables) must still be rebuilt after the step, as a saved-and-reloaded copy shows."""
    model = attached("llama", method)
    ids, mask = left_pad(IDS, MASK)
    rows = ["a", None, "a"]  # mixed rows: the stacked per-adapter tables are kept too
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model(input_ids=ids, attention_mask=mask, adapter_names=rows)
    opt_cls = torch.optim.AdamW(model.parameters_to_train(), lr=0.05, **{opt: True})
    model.train()
    model(
        input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
    ).loss.backward()
    opt_cls.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
        after_rows = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    model.save_adapter(tmp_path / "ad", trainable=True)
    fresh = sp.load_adapter(tiny_model("llama"), tmp_path / "ad")
    with torch.no_grad():
        ref = fresh(input_ids=ids, attention_mask=mask).logits
        ref_rows = fresh(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    real = mask.bool()
    assert_close(after[real], ref[real], **TOL)
    assert_close(after_rows[real], ref_rows[real], **TOL)
    assert (ref - before)[real].abs().max() > 1e-2  # the step moved the adapter


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_kept_no_grad_tables_are_not_reused_across_autocast(method):
    """A table kept from a call under bf16 autocast (Trainer/TRL evaluate so with bf16=True) is
    not reused by a float32 call, nor the other way round."""

    def build():
        model = attached("llama", method)
        model.add_adapter("b", method_config(method, n=2))
        perturb(model)
        return model.eval()

    model = build()
    ids, mask = left_pad(IDS, MASK)
    real = mask.bool()
    for rows in (["a"] * 3, ["a", None, "b"]):  # one adapter; mixed rows (stacked tables)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            got = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            ref = build()(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            other = build()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low_again = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
                low_ref = other(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        assert (low.float() - ref)[real].abs().max() > 1e-3  # bf16 is visibly different here
        assert_close(got[real], ref[real], atol=1e-6, rtol=0)
        assert_close(low_again[real], low_ref[real], atol=1e-6, rtol=0)


def test_prompts_of_one_length_share_one_pass_and_each_slot_prefix_is_built_once(monkeypatch):
    """Two prompt adapters of one length in one batch run as ONE pass of n=2 virtual-token
    sequences; a generate call builds each slot's prefix once, not once per step."""
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("a", sp.PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("b", sp.PromptTuningConfig(num_virtual_tokens=3, seed=7))
    perturb(model)
    model.eval()
    passes, builds = [], []
    kv = sp._hf.prompt_kv
    monkeypatch.setattr(sp._hf, "prompt_kv", lambda m, i, e: passes.append(e.shape) or kv(m, i, e))
    build = sp.model.PrefixState._build
    monkeypatch.setattr(
        sp.model.PrefixState, "_build", lambda self, *a: builds.append(a[0]) or build(self, *a)
    )
    with torch.no_grad():
        model.generate(
            input_ids=IDS,
            adapter_names=["a", "b", "a"],
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
    assert passes == [(2, 3, model.info.hidden_size)]
    assert sorted(builds) == list(range(len(model.info.slots)))  # each slot once


# ------------------------------------------------------------------------------ host syncs


def _softprompt_syncs(fn) -> list[tuple[str, str, int]]:
    """Run ``fn``; return the tensor-to-host reads (``bool``, ``item``, ``tolist``, ``int``,
    ``float``, ``index``) made by softprompt's own code, as (what, file, line). On a GPU each is a
    host-device sync; on the CPU they are counted the same way."""
    import sys

    calls = []
    saved = {}
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        orig = saved[name] = getattr(torch.Tensor, name)

        def wrap(self, *a, _orig=orig, _name=name, **kw):
            frame = sys._getframe(1)
            if "/softprompt/" in frame.f_code.co_filename.replace("\\", "/"):
                calls.append((_name, frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_lineno))
            return _orig(self, *a, **kw)

        setattr(torch.Tensor, name, wrap)
    try:
        fn()
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
    return calls


@pytest.mark.parametrize(
    "family, method, most",
    [("llama", "prefix", 1), ("llama", "prompt", 1), ("bert", "deep", 1), ("gpt2", "prompt", 2)],
)
def test_a_training_forward_reads_the_device_at_most_once_or_twice(family, method, most):
    """A left-padded training forward and backward: one read of the ids (template markers), plus
    one of the mask where virtual tokens are spliced into each row; none per layer."""
    model = sp.attach(tiny_model(family))
    model.add_adapter("a", method_config(method))
    model.train()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])

    def step():
        out = model(input_ids=ids, attention_mask=mask)
        (out.logits if "logits" in out else out.last_hidden_state).float().sum().backward()

    calls = _softprompt_syncs(step)
    assert 1 <= len(calls) <= most, calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_of_prepended_prompts_keep_them_beside_a_template_row(family):
    """A batch with template markers in one row (virtual tokens inside its prompt) still
    prepends the other rows' prompts: every row's logits equal that row alone. (Before the
    fix, any marker in the batch dropped every other row's virtual tokens.)"""
    from softprompt.lm import pad_left

    model = sp.attach(tiny_model(family))
    model.add_adapter("pre", sp.PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("tmpl", sp.PromptTuningConfig(num_virtual_tokens=2, placement="template"))
    model.add_adapter("pt", sp.PTuningConfig(num_virtual_tokens=2, encoder_hidden_size=16))
    perturb(model)
    rows = [[5, 6, 7, 8, 9, 10], [11, -1, -2, 12, 13], [14, 15, 16]]
    names = ["pre", "tmpl", "pt"]
    for sharing in ("auto", "never"):
        model.prompt_sharing = sharing
        ids, mask = pad_left(rows, 0)
        with torch.no_grad():
            mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            for b, (r, name) in enumerate(zip(rows, names, strict=True)):
                alone = model(input_ids=torch.tensor([r]), adapter_names=[name]).logits[0]
                torch.testing.assert_close(mixed[b, -len(r) :], alone, atol=1e-5, rtol=0)
    model.prompt_sharing = "auto"


def _varied_batches(n: int, seed: int = 0) -> list[list[list[int]]]:
    """n batches of 8, 8, 8 or 3 rows (a short last batch) of 3 to 80 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lens = torch.randint(3, 80 if i % 2 else 30, ([8, 8, 8, 3][i % 4],), generator=g)
        out.append([torch.randint(3, 100, (int(k),), generator=g).tolist() for k in lens])
    return out


def _step(model, rows) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(training loss, its gradients on the adapter, a no-grad loss on the first 5 rows); the
    first real token of a row is not a target (a padding position predicts it)."""
    from softprompt.lm import lm_loss, pad_left

    ids, mask = pad_left(rows, 0)
    prev = torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    labels = torch.where((mask * prev).bool(), ids, -100)
    loss = lm_loss(model, ids, mask, labels)
    grads = torch.autograd.grad(loss, model.parameters_to_train())
    with torch.no_grad():
        scored = lm_loss(model, ids[:5], mask[:5], labels[:5])
    return loss.detach(), list(grads), scored


def _counting(backend: str, graphs: list):
    def compile_fn(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    return compile_fn


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # the blocks' code objects hold other tests' compiled entries
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("family", "method", "bucket"),
    [("llama", "prompt", None), ("llama", "prefix", "pow2"), ("qwen3", "deep", 32)],
)
def test_compiled_body_equals_eager_and_compiles_a_bounded_number_of_graphs(
    family, method, bucket, fresh_dynamo
):
    """compile_body on Llama and Qwen3 (shared prompt prefix, per-layer prefixes): the same
    losses and adapter gradients as eager over 12 batches of 3 batch sizes and lengths 3-80,
    trained and scored without grad; no graph break; the graphs stop growing after the first
    batches (torch's automatic dynamic shapes): as many after 12 batches as after 6."""
    batches = _varied_batches(12)
    eager = attached(family, method)
    perturb(eager)
    eager.train()
    compiled = attached(family, method)
    perturb(compiled)
    compiled.train()
    graphs: list = []
    compiled.compile_body(bucket=bucket, backend=_counting("aot_eager", graphs))
    after_half = None
    for i, rows in enumerate(batches):
        want, got = _step(eager, rows), _step(compiled, rows)
        assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for g, w in zip(got[1], want[1], strict=True):
            assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
        if i == 5:
            after_half = len(graphs)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert 2 <= after_half == len(graphs) <= 12, (after_half, len(graphs))


@pytest.mark.slow  # inductor compiles C++ kernels (about 30 s on 2 loaded CPU cores)
def test_compiled_body_with_inductor_equals_eager(fresh_dynamo):
    """The default backend (inductor, C++ on the CPU): losses and adapter gradients within
    1e-5 of eager for two batches of one bucket (training and no-grad scoring)."""
    eager = attached("llama", "prefix")
    perturb(eager)
    compiled = attached("llama", "prefix")
    perturb(compiled)
    compiled.compile_body(bucket="pow2")
    for rows in (_varied_batches(3, seed=2)[1][:4], _varied_batches(3, seed=3)[1][:4]):
        rows = [r[:30] for r in rows]  # one bucket (32): one graph per kind of call
        want, got = _step(eager, rows), _step(compiled, rows)
        assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for g, w in zip(got[1], want[1], strict=True):
            assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiled_body_leaves_generate_and_checkpointing_eager(fresh_dynamo):
    """generate (a growing cache) and gradient-checkpointed training run the blocks eagerly:
    no graph is compiled, and the tokens and gradients are the eager ones."""
    eager = attached("llama", "prefix")
    perturb(eager)
    compiled = attached("llama", "prefix")
    perturb(compiled)
    graphs: list = []
    compiled.compile_body(backend=_counting("aot_eager", graphs))
    ids, mask = left_pad(IDS, MASK)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(compiled.generate(**kw), eager.generate(**kw))
    for model in (eager, compiled):
        model.gradient_checkpointing_enable()
        model.train()
    rows = _varied_batches(1)[0]
    want, got = _step(eager, rows), _step(compiled, rows)
    for g, w in zip(got[1], want[1], strict=True):
        assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not graphs


def test_a_compiled_body_keeps_adaption_prompts(fresh_dynamo):
    """Adaption prompts add their gated tokens per attention call: a compiled body runs the
    blocks of such a forward eagerly, so the logits and gradients equal the uncompiled model's
    (and differ from the bare model's)."""
    from softprompt.lm import lm_loss, pad_left

    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ids, mask = pad_left(rows, 0)
    out = []
    for compiled in (False, True):
        model = sp.attach(tiny_model("llama"))
        model.add_adapter("a", sp.AdaptionPromptConfig(num_virtual_tokens=3, adapter_layers=1))
        perturb(model)
        if compiled:
            model.compile_body(backend="aot_eager")
        loss = lm_loss(model, ids, mask, torch.where(mask.bool(), ids, -100))
        out.append((loss.detach(), torch.autograd.grad(loss, model.parameters_to_train())))
    assert_close(out[1][0], out[0][0], atol=1e-6, rtol=0)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert_close(b, a, atol=1e-6, rtol=0)
    bare = sp.attach(tiny_model("llama"))
    with torch.no_grad():
        assert (
            abs(
                float(lm_loss(bare, ids, mask, torch.where(mask.bool(), ids, -100)))
                - float(out[0][0])
            )
            > 1e-4
        )


def _packed(method: str):
    torch.manual_seed(0)
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("a", method_config(method))
    perturb(model)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])  # three sequences in one row
    return model, ids, pos


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_packed_rows_are_refused_for_virtual_tokens_at_the_input(method):
    """TRL's packing: position_ids restart inside a row. Virtual tokens at the input would go
    once, before the first sequence (the others' losses matched neither their own nor the bare
    model's); refused, naming packing. Left padding's filler positions are not a restart."""
    model, ids, pos = _packed(method)
    with torch.no_grad(), pytest.raises(sp.SoftPromptError, match="packed sequences"):
        model(input_ids=ids, position_ids=pos)
    left = torch.tensor([[0, 0, 5, 6, 7]])
    mask = (left != 0).long()
    fill = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # generate's positions: pads at 1
    with torch.no_grad():
        a = model(input_ids=left, attention_mask=mask, position_ids=fill).logits[:, 2:]
        b = model(input_ids=left[:, 2:]).logits
    assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "deep", "mpt"])
def test_new_weights_loaded_into_an_adapter_reach_the_kept_no_grad_tables(method):
    """``load_baked`` / ``load_factors`` on an adapter that already ran a no-grad forward: the
    next forward uses the new weights (the kept tables are keyed by the tensors' versions, which
    a write through ``.data`` did not bump: the old output came back), mixed batches too."""
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    config = (
        method_config(method) if method != "mpt" else sp.MultitaskPromptConfig(num_virtual_tokens=4)
    )
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("a", config)
    model.add_adapter("b", method_config("deep"))
    perturb(model)
    model.eval()
    ad = model.adapters["a"]
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "a"])
        model(input_ids=ids, adapter_names=["a", "b"])
        if method == "mpt":
            ad.load_factors(ad.shared.detach() * 3, ad.cols.detach(), ad.rows.detach())
        else:
            ad.load_baked({k: v.detach() * 2 for k, v in ad.baked_tensors().items()})
        fresh = sp.attach(tiny_model("llama"))
        fresh.add_adapter("a", config)
        fresh.adapters["a"].load_state_dict(ad.state_dict())
        want = fresh(input_ids=ids).logits
        assert_close(model(input_ids=ids, adapter_names=["a", "a"]).logits, want, atol=1e-5, rtol=0)
        mixed = model(input_ids=ids, adapter_names=["a", "b"]).logits
        assert_close(mixed[:1], want[:1], atol=1e-5, rtol=0)


def test_an_odd_lstm_width_is_refused_by_the_config():
    with pytest.raises(sp.SoftPromptError, match="must be even"):
        sp.PTuningConfig(encoder="lstm", encoder_hidden_size=15)
    sp.PTuningConfig(encoder="mlp", encoder_hidden_size=15)  # the MLP takes any width


def test_vocab_init_on_a_wordpiece_vocabulary_samples_words():
    """BERT-style vocabularies put [unusedN] slots (never trained) and single characters of
    every script before their frequent words: vocab init (prompts, prefix targets, text fill)
    skips them and the special tokens; a BPE vocabulary keeps ids 100..4999 as before."""
    from conftest import _tokenizer

    from softprompt.assets import resolve_model
    from softprompt.methods.base import frequent_vocab_ids

    bert = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))
    ids = frequent_vocab_ids(2000, len(bert), torch.Generator().manual_seed(0), bert)
    toks = bert.convert_ids_to_tokens(ids)
    assert not set(ids) & set(bert.all_special_ids)
    assert not [t for t in toks if t.startswith("[unused") or len(t.removeprefix("##")) < 2]
    assert bert.convert_tokens_to_ids("the") <= min(ids) and max(ids) < 12000
    bpe = _tokenizer()
    same = frequent_vocab_ids(50, len(bpe), torch.Generator().manual_seed(0), bpe)
    assert same == frequent_vocab_ids(50, len(bpe), torch.Generator().manual_seed(0))
    assert all(100 <= i < 5000 for i in same)


def test_label_init_gives_each_class_one_virtual_token_the_mean_of_its_words():
    """Lester et al. 3.2: a multi-token label's one virtual token is the mean of its token
    embeddings; the slots after the labels are sampled vocabulary."""
    from conftest import BUILDERS, _tokenizer

    tok = _tokenizer()
    torch.manual_seed(0)
    base = BUILDERS["llama"](
        vocab=len(tok), pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id
    )
    model = sp.attach(base, tokenizer=tok)
    labels = ["very good", "bad"]
    cfg = sp.PromptTuningConfig(num_virtual_tokens=4, init="labels", init_text=labels)
    table = model.add_adapter("a", cfg, tok).embedding.detach()
    emb = base.get_input_embeddings().weight.detach()
    for row, label in zip(table, labels, strict=False):
        ids = tok(" " + label, add_special_tokens=False)["input_ids"]
        assert_close(row, emb[ids].mean(0))
    assert len(tok(" very good", add_special_tokens=False)["input_ids"]) == 2
    assert not any(
        torch.allclose(table[2], emb[i]) for i in tok(" bad", add_special_tokens=False)["input_ids"]
    )
