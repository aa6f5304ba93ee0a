"""The wrapper's Trainer/TRL/pipeline-facing surface (softprompt.hf_compat), on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import method_config, perturb, tiny_model
from torch.testing import assert_close

import softprompt as sp


def wrapped(method: str = "prefix", family: str = "llama") -> sp.SoftPromptModel:
    model = sp.attach(tiny_model(family), method_config(method), name="a")
    model.add_adapter("b", method_config("prompt"))
    perturb(model)
    return model


def test_state_dict_holds_the_adapters_only_and_loads_back():
    model = wrapped()
    state = model.state_dict()
    expected = {f"adapters.{k}" for k in model.adapters.state_dict()}
    assert set(state) == expected
    assert {k.split(".")[1] for k in state} == {"a", "b"}
    other = wrapped()
    with torch.no_grad():
        for p in other.adapters.parameters():
            p.zero_()
    res = other.load_state_dict(state)
    assert (res.missing_keys, res.unexpected_keys) == ([], [])
    for k, v in other.state_dict().items():
        assert_close(v, state[k], atol=0, rtol=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_load_state_dict_strict_needs_every_adapter_tensor():
    model = wrapped()
    state = model.state_dict()
    state.pop(next(k for k in state if k.startswith("adapters.b.")))
    with pytest.raises(sp.SoftPromptError, match="missing adapter tensors"):
        model.load_state_dict(state)
    res = model.load_state_dict(state, strict=False)
    assert len(res.missing_keys) == 1 and res.missing_keys[0].startswith("adapters.b.")


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_loss_type_names_the_loss_the_forward_computes(family):
    model = sp.attach(tiny_model(family))
    # GPT2LMHeadModel's class name names no loss (its own loss_type is None)
    expected = {"gpt2": "ForCausalLM", "llama": "ForCausalLM", "t5": model.base_model.loss_type}
    assert model.loss_type == expected[family]


def test_using_picks_the_adapter_and_restores_the_active_one():
    model = wrapped()
    model.set_active("a")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want_b = model(input_ids=ids, adapter_names=["b"]).logits
        want_bare = model(input_ids=ids, adapter_names=[None]).logits
        with model.using("b"):
            assert model.active == "b"
            assert all(p.requires_grad for p in model.adapters["b"].parameters())
            assert_close(model(input_ids=ids).logits, want_b, atol=0, rtol=0)
        with model.using(None):
            assert_close(model(input_ids=ids).logits, want_bare, atol=0, rtol=0)
    assert model.active == "a"
    assert not any(p.requires_grad for p in model.adapters["b"].parameters())
    with pytest.raises(sp.SoftPromptError, match="unknown adapter"), model.using("nope"):
        pass
    assert model.active == "a"


def test_attributes_read_from_the_base_model():
    model = wrapped()
    base = model.base_model
    assert model.generation_config is base.generation_config
    assert model.can_generate() and model.dtype == base.dtype
    assert model.get_output_embeddings() is base.get_output_embeddings()
    assert model.supports_gradient_checkpointing
    with pytest.raises(AttributeError):
        model.save_pretrained  # noqa: B018  (not delegated: it would save the base weights)
