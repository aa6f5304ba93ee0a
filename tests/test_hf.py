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
    assert calls, "the decode path was not taken"
    n = len(calls)
    monkeypatch.setattr(_hf, "_decode_ok", lambda *a: False)
    slow = model.generate(**kw)
    assert len(calls) == n
    return fast, slow


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "bart"])
@pytest.mark.parametrize("method", ["prefix", "deep"])
def test_generate_with_the_decode_path_equals_joining(family, method, monkeypatch):
    """Mixed rows (prefix, none), left padding: the same greedy tokens and step scores with the
    decode path as with the prefix joined to the cache at every step."""
    model = sp.attach(tiny_model(family))
    model.add_adapter("a", method_config(method))
    perturb(model)
    model.eval()
    rows = {} if family == "bart" else {"adapter_names": ["a", None, "a"]}
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
