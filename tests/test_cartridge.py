"""Cartridges: the method (init from prefill, frozen sink, files) and context distillation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import softprompt as sp
from softprompt.errors import SoftPromptError
from softprompt.methods.cartridge import CartridgeConfig

TEXT = [5, 17, 33, 8, 91, 44, 12, 60, 71, 9, 3, 27]
CONT = [14, 55, 23, 81, 6]


def _attach(family: str, n: int, text=TEXT, **kw) -> sp.SoftPromptModel:
    torch.manual_seed(0)
    base = tiny_model(family)
    cfg = CartridgeConfig(num_virtual_tokens=n, init_token_ids=list(text), **kw)
    return sp.attach(base, cfg, name="cart")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_init_from_prefill_equals_text_in_context(family):
    n = 10
    model = _attach(family, n)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([CONT])).logits[0]
        full = model.base_model(input_ids=torch.tensor([TEXT[:n] + CONT])).logits[0, n:]
    assert torch.allclose(got, full, atol=1e-5), (got - full).abs().max()


def test_frozen_token_gets_no_gradient():
    model = _attach("llama", 10, num_frozen=2)
    model.train()
    out = model(input_ids=torch.tensor([CONT])).logits
    out.float().pow(2).mean().backward()
    grad = model.adapters["cart"].prefix.grad
    assert grad[:2].abs().max().item() == 0.0
    assert grad[2:].abs().max().item() > 0.0


def test_save_load_round_trip(tmp_path):
    model = _attach("llama", 10)
    with torch.no_grad():
        model.adapters["cart"].prefix.add_(0.1 * torch.randn_like(model.adapters["cart"].prefix))
    model.eval()
    ids = torch.tensor([CONT])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_adapter(tmp_path / "a")
    torch.manual_seed(0)
    other = sp.load_adapter(tiny_model("llama"), tmp_path / "a")
    assert other.adapters["cart"].config.num_frozen == 1
    with torch.no_grad():
        got = other(input_ids=ids).logits
    assert torch.equal(got, want)


def test_p_larger_than_text_is_refused():
    with pytest.raises(SoftPromptError, match="larger than the text"):
        _attach("llama", 20)


def test_bad_num_frozen_is_refused():
    with pytest.raises(SoftPromptError, match="num_frozen"):
        CartridgeConfig(num_virtual_tokens=4, init_token_ids=[1], num_frozen=5)
