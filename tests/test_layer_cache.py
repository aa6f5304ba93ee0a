"""Caching the frozen lower blocks while training prompts on the top blocks (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from conftest import method_config, perturb, tiny_model
from torch.testing import assert_close

import softprompt as sp
from softprompt import _hf
from softprompt.layer_cache import LayerCache
from softprompt.lm import lm_loss

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0], [14, 15, 16, 17, 0, 0]])
MASK = (IDS != 0).long()
LABELS = torch.where(MASK.bool(), IDS, -100)


def top_model(family: str = "llama", method: str = "deep", layers=(1,)) -> sp.SoftPromptModel:
    model = sp.attach(tiny_model(family))
    model.add_adapter("a", method_config(method, layers=list(layers)))
    perturb(model)
    model.train()
    return model


def loss_and_grads(model, ids=IDS, mask=MASK, labels=LABELS):
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, ids, mask, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters_to_train()]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method", ["deep", "prefix"])
def test_cached_steps_equal_full_steps(family, method):
    model = top_model(family, method)
    ref_loss, ref_grads = loss_and_grads(model)
    lc = model.cache_lower_layers()
    assert lc is not None and lc.layer == 1
    first = loss_and_grads(model)  # fills the cache
    second = loss_and_grads(model)  # starts at block 1
    assert (lc.misses, lc.hits, len(lc.rows)) == (1, 1, 3)
    for loss, grads in (first, second):
        assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        for g, r in zip(grads, ref_grads, strict=True):
            assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_rows_are_found_again_in_other_batches_and_paddings():
    model = top_model()
    lc = model.cache_lower_layers()
    loss_and_grads(model)
    # the same rows, reordered and left-padded to another width: every row is a hit
    rows = [IDS[i][MASK[i].bool()] for i in (2, 0, 1)]
    width = 8
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=r.dtype), r]) for r in rows])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids, -100)
    lc_off = model._layer_cache
    model._layer_cache = None
    ref_loss, ref_grads = loss_and_grads(model, ids, mask, labels)
    model._layer_cache = lc_off
    loss, grads = loss_and_grads(model, ids, mask, labels)
    assert lc.hits == 1
    assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_lower_blocks_do_not_run_on_a_hit():
    model = top_model()
    model.cache_lower_layers()
    loss_and_grads(model)
    calls = []
    block0 = _hf.decoder_layers(model.base_model)[0]
    handle = block0.register_forward_hook(lambda *a: calls.append(1))
    try:
        loss_and_grads(model)
    finally:
        handle.remove()
    assert calls == []
    assert _hf.decoder_layers(model.base_model)[0] is block0  # put back after the call


@pytest.mark.parametrize(
    "family, method, layers",
    [
        ("llama", "deep", None),
        ("llama", "prompt", None),
        ("gpt2", "deep", (1,)),
        ("t5", "deep", (1,)),
    ],
)
def test_not_applicable(family, method, layers):
    model = sp.attach(tiny_model(family))
    kw = {} if layers is None else {"layers": list(layers)}
    model.add_adapter("a", method_config(method, **kw))
    assert model.cache_lower_layers() is None


def test_eval_and_mixed_rows_bypass_the_cache():
    model = top_model()
    model.add_adapter("low", method_config("deep", layers=[0]))
    model.set_active("a")
    lc = model.cache_lower_layers()
    with torch.no_grad():
        model.eval()
        model(input_ids=IDS, attention_mask=MASK, use_cache=False)
        model.train()
        model(input_ids=IDS, attention_mask=MASK, use_cache=False, adapter_names=["a", "low", "a"])
        model(input_ids=IDS, attention_mask=MASK)  # use_cache not turned off
    assert (lc.hits, lc.misses, len(lc.rows)) == (0, 0, 0)


def test_byte_limit_and_holes():
    lc = LayerCache(layer=1, max_bytes=3 * 4 * 4)  # room for one row of 3 tokens x 4 floats
    hidden = torch.randn(3, 6, 4)
    lc.store(IDS, MASK, hidden)
    assert len(lc.rows) == 0 and lc.full  # the first row (6 tokens) does not fit
    lc = LayerCache(layer=1, max_bytes=1 << 20)
    holes = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    lc.store(IDS, holes, hidden)
    assert lc.rows == {} and lc.lookup(IDS, holes) is None
    lc.store(IDS, MASK, hidden)
    got = lc.lookup(IDS, MASK)
    assert_close(got[MASK.bool()], hidden[MASK.bool()])
    assert (got[~MASK.bool()] == 0).all()


def test_store_reuses_the_lookups_keys_unless_the_ids_were_written_to():
    """A missed lookup's row keys serve the store that follows it; ids rewritten in place (a
    reused buffer) are keyed afresh."""
    lc = LayerCache(layer=1, max_bytes=1 << 20)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    hidden = torch.randn(2, 3, 4)
    computed = []
    orig = lc._keys
    lc._keys = lambda *a: computed.append(1) or orig(*a)
    assert lc.lookup(ids, None) is None
    lc.store(ids, None, hidden)
    assert len(computed) == 1
    assert_close(lc.lookup(ids, None), hidden)
    ids[0, 0] = 11  # the same tensor, new content
    assert lc.lookup(ids, None) is None
    assert len(computed) == 3
    lc.store(ids, None, hidden * 2)  # row 1 is known already and keeps its first value
    assert_close(lc.lookup(ids, None), torch.stack([hidden[0] * 2, hidden[1]]))
