"""The attention seam's decoding-step path (``_hf._decode_attention``): the same attention as
joining the prefix to the cache and calling sdpa, for every mask kind, and the same tokens and
scores from ``generate`` with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import method_config, perturb, tiny_model
from torch.testing import assert_close

import softprompt as sp
from softprompt import _hf

IDS = torch.tensor([[0, 0, 5, 6, 7, 8], [0, 0, 0, 11, 12, 13], [9, 14, 15, 16, 17, 3]])
MASK = (IDS != 0).long()


def _reference(query, key, value, mask, k_p, v_p, valid, scale):
    """Join prefix and cache, expand the key/value heads, call sdpa."""
    g = query.shape[1] // key.shape[1]
    k = torch.cat([k_p, key], dim=2).repeat_interleave(g, dim=1)
    v = torch.cat([v_p, value], dim=2).repeat_interleave(g, dim=1)
    pre = valid[:, None, None, :]
    if mask is None:
        full = torch.cat([pre, torch.ones(*valid.shape[:1], 1, 1, key.shape[2]).bool()], -1)
    elif mask.dtype == torch.bool:
        full = torch.cat(
            [pre.expand(-1, mask.shape[1], -1, -1), mask.expand(len(valid), -1, -1, -1)], -1
        )
    else:
        add = torch.where(pre, 0.0, torch.finfo(torch.float32).min)
        full = torch.cat(
            [add.expand(-1, mask.shape[1], -1, -1), mask.expand(len(valid), -1, -1, -1)], -1
        )
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=full, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "bool_per_head"])
def test_decode_attention_equals_joining_prefix_and_cache(mask_kind):
    gen = torch.Generator().manual_seed(0)
    batch, heads, kvh, t, plen, hd = 3, 6, 2, 7, 4, 8
    query = torch.randn(batch, heads, 1, hd, generator=gen)
    key, value = (torch.randn(batch, kvh, t, hd, generator=gen) for _ in range(2))
    k_p, v_p = (torch.randn(batch, kvh, plen, hd, generator=gen) for _ in range(2))
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()  # mixed rows
    pad = torch.ones(batch, t).bool()
    pad[1, :2] = False  # left padding in row 1
    mask = {
        "none": None,
        "bool": pad[:, None, None, :],
        "float": torch.where(pad, 0.0, torch.finfo(torch.float32).min)[:, None, None, :],
        "bool_per_head": pad[:, None, None, :].expand(-1, heads, -1, -1).clone(),
    }[mask_kind]
    if mask_kind == "bool_per_head":
        mask[0, 3, 0, 4] = False  # one head of one row sees one key less
    with torch.no_grad():
        got = _hf._decode_attention(query, key, value, mask, k_p, v_p, valid, 0.3)
        want = _reference(query, key, value, mask, k_p, v_p, valid, 0.3)
    assert got.shape == (batch, 1, heads, hd)
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def _with_and_without_decode_path(model, monkeypatch, **kw):
    """``generate(**kw)`` twice: with the decode path (asserting it was taken), then with the
    prefix joined to the cache at every step (asserting the decode path was not taken)."""
    kw = dict(
        input_ids=IDS,
        attention_mask=MASK,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
    calls = []
    orig = _hf._decode_attention
    monkeypatch.setattr(_hf, "_decode_attention", lambda *a: calls.append(1) or orig(*a))
    fast = model.generate(**kw)
    # every decoding step, at every slot that has a prefix and runs at decode time: the prefill
    # of a decoder-only LM is the first new token; an encoder-decoder decodes all of them
    steps = kw["max_new_tokens"] - (0 if model.info.is_encoder_decoder else 1)
    slots = sum(s.kind != "encoder" for s in model.info.slots)
    n = len(calls)
    assert n == steps * slots, f"the decode path ran {n} times, not {steps} x {slots}"
    monkeypatch.setattr(_hf, "_decode_ok", lambda *a: False)
    slow = model.generate(**kw)
    assert len(calls) == n
    return fast, slow


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "bart", "t5"])
@pytest.mark.parametrize("method", ["prefix", "deep"])
def test_generate_with_the_decode_path_equals_joining(family, method, monkeypatch):
    """Mixed rows (prefix, none), left padding: the same greedy tokens and step scores with the
    decode path as with the prefix joined to the cache at every step."""
    model = sp.attach(tiny_model(family))
    model.add_adapter("a", method_config(method))
    perturb(model)
    model.eval()
    rows = {} if family in ("bart", "t5") else {"adapter_names": ["a", None, "a"]}
    fast, slow = _with_and_without_decode_path(model, monkeypatch, **rows)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.scores, slow.scores, strict=True):
        assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_beam_search_with_the_decode_path_equals_joining(monkeypatch):
    """Beam search expands each row's prefix over its beams and reorders the cache: the decode
    path must give the same beams and scores."""
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("a", method_config("prefix"))
    model.add_adapter("b", method_config("deep"))
    perturb(model)
    model.eval()
    fast, slow = _with_and_without_decode_path(
        model, monkeypatch, adapter_names=["a", "b", None], num_beams=3, num_return_sequences=2
    )
    assert fast.sequences.shape[0] == 6
    assert torch.equal(fast.sequences, slow.sequences)
    assert_close(fast.sequences_scores, slow.sequences_scores, atol=1e-4, rtol=1e-4)


def test_decode_attention_adds_t5s_position_bias_to_the_cache_only():
    """T5 hands its relative position bias (1, H, 1, T) to the attention function: it applies to
    the cache's keys, the prefix keys get none (as the joining path pads it with zeros)."""
    gen = torch.Generator().manual_seed(1)
    batch, heads, kvh, t, plen, hd = 2, 4, 4, 5, 3, 8
    query = torch.randn(batch, heads, 1, hd, generator=gen)
    key, value = (torch.randn(batch, kvh, t, hd, generator=gen) for _ in range(2))
    k_p, v_p = (torch.randn(batch, kvh, plen, hd, generator=gen) for _ in range(2))
    valid = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    bias = torch.randn(1, heads, 1, t, generator=gen)
    with torch.no_grad():
        got = _hf._decode_attention(query, key, value, None, k_p, v_p, valid, 1.0, bias)
        want = _reference(query, key, value, bias.expand(batch, -1, -1, -1), k_p, v_p, valid, 1.0)
        plain = _hf._decode_attention(query, key, value, None, k_p, v_p, valid, 1.0)
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the bias mattered


@pytest.mark.parametrize(
    "family, masks", [("llama", 1), ("qwen3", 1), ("gpt2", 1), ("bert", 1), ("bart", 2), ("t5", 3)]
)
def test_the_extended_mask_is_built_once_per_kind_of_attention_per_forward(
    family, masks, monkeypatch
):
    """Every layer of a forward shares its mask: the prefix columns are added once per kind of
    attention (self; or encoder, decoder and cross), not once per layer. BART's decoder
    self-attention gets no mask from transformers and needs none (``_sdpa_mask_free``, as on a
    GPU)."""
    from conftest import inputs_for

    monkeypatch.setattr(_hf, "MASK_FREE_DEVICES", ("cpu", "cuda"))

    model = sp.attach(tiny_model(family))
    model.add_adapter("a", method_config("deep"))
    model.eval()
    calls = []
    orig = _hf._extend_mask
    monkeypatch.setattr(_hf, "_extend_mask", lambda *a: calls.append(1) or orig(*a))
    with torch.no_grad():
        model(**inputs_for(family, IDS, MASK))
    assert len(calls) == masks


# ------------------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["prompt", "prefix", "deep", "ptuning"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_a_half_precision_base_trains_float32_adapters(family, method, dtype):
    """The frozen base runs in half precision, the adapter stays float32 (master weights: its
    gradients and optimiser state are float32), the prompt is cast at the seam; the outputs
    follow the float32 model's within half-precision rounding, and the loss falls."""
    from conftest import inputs_for, out_tensor

    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 14, 3]])
    kw = inputs_for(family, ids, torch.ones_like(ids))
    ref = sp.attach(tiny_model(family))
    ref.add_adapter("a", method_config(method))
    perturb(ref)
    half = sp.attach(tiny_model(family).to(dtype))
    half.add_adapter("a", method_config(method))
    half.adapters["a"].load_state_dict(ref.adapters["a"].state_dict())
    params = half.parameters_to_train()
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        want = out_tensor(family, ref(**kw)).float()
        got = out_tensor(family, half(**kw)).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max() + 0.02
    opt = torch.optim.AdamW(params, lr=3e-2)
    direction = torch.randn(want.shape[-1], generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        out = out_tensor(family, half(**kw)).float()
        loss = (out * direction).mean()  # push the outputs along a direction: must go down
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        assert all(torch.isfinite(p.grad).all() for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_a_bfloat16_adapter_file_loads_into_a_float32_base_and_back(tmp_path):
    from safetensors.torch import load_file, save_file

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for method in ("prompt", "prefix"):
        model = sp.attach(tiny_model("llama"))
        model.add_adapter("a", method_config(method))
        perturb(model)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        folder = model.save_adapter(tmp_path / method)
        weights = folder / "adapter.safetensors"
        save_file({k: v.bfloat16() for k, v in load_file(weights).items()}, weights)
        for dtype in (torch.float32, torch.bfloat16):
            back = sp.load_adapter(tiny_model("llama").to(dtype), folder)
            with torch.no_grad():
                got = back(input_ids=ids).logits.float()
            assert (got - want).abs().max() <= 0.02 * want.abs().max() + 0.02, (method, dtype)


# ------------------------------------------------------------------------------ attention kernels


@pytest.mark.slow  # flex attention compiles its kernel (about 20 s on 2 CPU cores)
# transformers 5.23's flex mask passes create_block_mask's deprecated _compile flag (torch 2.13)
@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")
def test_flex_attention_keeps_flex_with_the_prefix_inside():
    """A model loaded with flex attention stays on flex: the prefix columns enter its block
    mask (per-row validity, the model's causal and padding mask shifted past them). Mixed rows
    (a shared prompt, a prefix, deep prompts, none) with left padding give the sdpa logits."""
    import torch._dynamo

    # transformers compiles flex_attention with dynamic shapes after a recompile, which
    # inductor's CPU flex template cannot build (torch 2.13): keep every compile static.
    # (torch's own config.patch: a monkeypatch undo deleted the option for later tests)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        _flex_equals_sdpa()


def _flex_equals_sdpa() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13], [0, 14, 15, 16, 17], [0, 0, 0, 4, 5]])
    mask = (ids != 0).long()
    out = {}
    for attn in ("sdpa", "flex_attention"):
        model = sp.attach(tiny_model("llama", attn=attn))
        for name, method in (("p", "prompt"), ("x", "prefix"), ("d", "deep")):
            model.add_adapter(name, method_config(method))
        perturb(model)
        assert model.base_model.config._attn_implementation == f"softprompt_{attn}"
        with torch.no_grad():
            out[attn] = model(
                input_ids=ids, attention_mask=mask, adapter_names=["p", "x", "d", None]
            )
    real = mask.bool()
    assert_close(out["flex_attention"].logits[real], out["sdpa"].logits[real], atol=1e-5, rtol=1e-5)


def test_an_attention_kernel_that_cannot_take_prefixes_is_named_not_switched_silently():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("some_kernel", sdpa_attention_forward)
    AttentionMaskInterface.register("some_kernel", sdpa_mask)
    base = tiny_model("llama", attn="some_kernel")
    with pytest.warns(UserWarning, match="'some_kernel' cannot take per-row key/value prefixes"):
        model = sp.attach(base)
    assert model.base_model.config._attn_implementation == "softprompt_sdpa"


# ------------------------------------------------------------------------------ context bounds


@pytest.mark.parametrize(
    "family, context", [("gpt2", 64), ("llama", 2048), ("t5", None), ("bart", 256), ("bert", 64)]
)
def test_context_length_and_prompts_that_cannot_fit(family, context):
    base = tiny_model(family)
    assert _hf.context_length(base) == context
    model = sp.attach(base)
    limit = context if context is not None else _hf.UNKNOWN_CONTEXT + 1
    for method in ("prompt", "prefix"):
        model.add_adapter("ok", method_config(method, n=(context or 100) - 1))
        model.delete_adapter("ok")
        # 10^12 tokens would need terabytes: refused by the bound, before any allocation
        for n in (limit, 10**12):
            with pytest.raises(sp.SoftPromptError, match=f"num_virtual_tokens={n:,} "):
                model.add_adapter("big", method_config(method, n=n))
    assert list(model.adapters) == []


def test_shared_prompt_on_a_half_precision_model():
    """The prompt's keys and values computed once (prompt sharing) on an fp16 model: the fp32
    prompt is cast to the model's dtype, and the loss equals the spliced path's."""
    model = sp.attach(tiny_model("llama").half())
    model.add_adapter("a", sp.PromptTuningConfig(num_virtual_tokens=3))
    ids = torch.tensor([[5, 6, 7, 8]])
    losses = []
    for mode in ("always", "never"):
        model.prompt_sharing = mode
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.float())
    assert torch.isfinite(losses[0]) and model.adapters["a"].embedding.grad is not None
    assert_close(losses[0], losses[1], atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------ mask-free SDPA


@pytest.mark.parametrize(
    "family, method",
    [("llama", "prefix"), ("llama", "prompt"), ("gpt2", "deep"), ("bert", "prefix")],
)
def test_sdpa_without_a_mask_equals_eager(family, method, monkeypatch):
    """An unpadded batch whose rows all read the whole prefix runs SDPA with no explicit mask
    (causal: ``causal_lower_right``, so a GPU can pick the flash / efficient kernels): logits and
    adapter gradients equal eager attention's with its explicit mask."""
    monkeypatch.setattr(_hf, "MASK_FREE_DEVICES", ("cpu", "cuda"))
    calls = []
    free = _hf._sdpa_mask_free

    def counting(*a, **kw):
        calls.append(a[1].shape[2])  # (module, query, ...): the query length
        return free(*a, **kw)

    monkeypatch.setattr(_hf, "_sdpa_mask_free", counting)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    out, grads = {}, {}
    for attn in ("eager", "sdpa"):
        model = sp.attach(tiny_model(family, attn=attn))
        model.add_adapter("a", method_config(method))
        model.add_adapter("b", method_config(method))
        perturb(model)
        model.train()
        model.prompt_sharing = "always"  # prompt tuning: one row per adapter would splice
        res = model(input_ids=ids, adapter_names=["a", "b"])
        y = res.logits if "logits" in res else res.last_hidden_state
        y.float().pow(2).mean().backward()
        out[attn] = y.detach()
        grads[attn] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert calls and set(calls) == {ids.shape[1]}  # the sdpa run took the mask-free path
    assert_close(out["sdpa"], out["eager"], atol=1e-5, rtol=1e-5)
    assert len(grads["sdpa"]) == len(grads["eager"]) > 0
    for g_s, g_e in zip(grads["sdpa"], grads["eager"], strict=True):
        assert_close(g_s, g_e, atol=1e-5, rtol=1e-4)


def test_mask_free_sdpa_only_where_every_row_reads_its_whole_prefix(monkeypatch):
    """A row without an adapter, or padding, needs the explicit mask; a cached continuation of
    several tokens (q < k) keeps the bottom-right alignment and equals eager."""
    monkeypatch.setattr(_hf, "MASK_FREE_DEVICES", ("cpu", "cuda"))
    calls = []
    free = _hf._sdpa_mask_free
    monkeypatch.setattr(_hf, "_sdpa_mask_free", lambda *a, **kw: calls.append(1) or free(*a, **kw))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    logits = {}
    for attn in ("eager", "sdpa"):
        model = sp.attach(tiny_model("llama", attn=attn))
        model.add_adapter("a", method_config("prefix"))
        perturb(model)
        with torch.no_grad():
            calls.clear()
            mixed = model(input_ids=ids, adapter_names=["a", None]).logits
            assert not calls  # row 1 reads no prefix: explicit mask
            padded = model(
                input_ids=ids, attention_mask=torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
            ).logits
            assert not calls
            first = model(input_ids=ids[:, :3], use_cache=True)
            rest = model(input_ids=ids[:, 3:], past_key_values=first.past_key_values).logits
            assert bool(calls) == (attn == "sdpa")  # q=3 over 3 + 3 + P keys: mask-free
        logits[attn] = (mixed, padded[1:, 1:], rest)
    for s, e in zip(logits["sdpa"], logits["eager"], strict=True):
        assert_close(s, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["t5", "bart", "llama"])
@pytest.mark.parametrize("names", [["pre", "deep"], ["pre", None]], ids=["3+2", "3+none"])
def test_eager_attention_masks_the_padded_prefix_slots_of_shorter_rows(family, names):
    """Rows with prefixes of different lengths (or none) in one unpadded batch, eager
    attention: each row's logits are its logits alone. T5's and BART's eager functions add the
    mask to the scores; with no model mask the prefix mask was bool (adding 1 and 0, masking
    nothing): 0.28 off for the bare T5 row."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    dec = torch.tensor([[0, 5, 6]] * 2)
    model = sp.attach(tiny_model(family, "eager"))
    model.add_adapter("pre", method_config("prefix", n=3))
    model.add_adapter("deep", method_config("deep", n=2))
    perturb(model)
    model.eval()
    enc_dec = family != "llama"
    with torch.no_grad():
        kw = {"decoder_input_ids": dec} if enc_dec else {}
        mixed = model(input_ids=ids, adapter_names=names, **kw).logits
        for b in range(2):
            kw = {"decoder_input_ids": dec[:1]} if enc_dec else {}
            alone = model(input_ids=ids[b : b + 1], adapter_names=[names[b]], **kw).logits
            assert_close(mixed[b : b + 1], alone, atol=1e-5, rtol=1e-5)
