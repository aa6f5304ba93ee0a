"""LM-head-on-supervised-positions losses and answer scoring equal the plain computations."""

from __future__ import annotations

import pytest
import torch
from conftest import METHODS, method_config, perturb, tiny_model
from torch.testing import assert_close

import softprompt as sp
from softprompt.lm import answer_logprobs, lm_loss, pad_left, sequence_logprobs


def _model(method):
    model = sp.attach(tiny_model("llama"))
    model.add_adapter("a", method_config(method))
    perturb(model)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_lm_loss_equals_full_head_loss(method):
    model = _model(method)
    ids, mask = pad_left([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-2] = -100  # answer-only supervision
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    head_inputs = []
    hook = model.base_model.lm_head.register_forward_hook(
        lambda m, args, out: head_inputs.append(tuple(args[0].shape))
    )
    got = lm_loss(model, ids, mask, labels)
    hook.remove()
    assert head_inputs == [(2 * 2, 32)]  # 2 rows x 2 supervised targets, not (B, T, d)
    assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # gradients agree too
    g1 = torch.autograd.grad(ref, model.parameters_to_train())
    g2 = torch.autograd.grad(lm_loss(model, ids, mask, labels), model.parameters_to_train())
    for a, b in zip(g1, g2, strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_answer_logprobs_match_manual_scoring(method):
    model = _model(method)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    head_inputs = []
    hook = model.base_model.lm_head.register_forward_hook(
        lambda m, args, out: head_inputs.append(tuple(args[0].shape))
    )
    with torch.no_grad():
        single = answer_logprobs(model, prompts, [[20], [21], [22]])
        multi = answer_logprobs(model, prompts, [[20, 30], [21]])
    hook.remove()
    # one-token answers: the head reads each prompt's last position only; multi-token: only
    # the answer tokens' positions (2 prompts x (2 + 1) answer tokens)
    assert head_inputs == [(2, 32), (6, 32)]
    with torch.no_grad():
        for b, p in enumerate(prompts):
            logits = model(input_ids=torch.tensor([p + [20, 30]])).logits[0].log_softmax(-1)
            n = len(p)
            assert_close(single[b, 0], logits[n - 1, 20], atol=1e-5, rtol=0)
            assert_close(multi[b, 0], logits[n - 1, 20] + logits[n, 30], atol=1e-5, rtol=0)
            assert_close(multi[b, 1], single[b, 1], atol=1e-5, rtol=0)
        ids, mask = pad_left([prompts[0] + [20, 30]], 0)
        lab = torch.tensor([[-100, -100, -100, 20, 30]])
        assert_close(sequence_logprobs(model, ids, mask, lab)[0], multi[0, 0], atol=1e-5, rtol=0)
