"""Splice layouts (softprompt.splice): where virtual tokens go and how outputs are stripped."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.splice import _splice_layout, strip_outputs


@pytest.mark.parametrize(
    ("mask", "counts", "placements", "shift"),
    [
        # shift with fillers on the left (models that take position ids) / on the right
        ([[1, 1, 1, 1], [1, 1, 1, 1]], [3, 3], ["prepend"] * 2, (3, 3)),  # training batch
        ([[1, 1, 1, 0], [1, 1, 0, 0]], [2, 2], ["prepend"] * 2, (2, 2)),  # right padding
        ([[1, 1, 1, 1], [1, 1, 1, 1]], [2, 2], ["append"] * 2, (0, 0)),  # after the last token
        ([[0, 1, 1, 1], [1, 1, 1, 1]], [2, 2], ["prepend"] * 2, (None, None)),  # left padding
        ([[1, 1, 1, 1], [1, 1, 1, 1]], [3, 1], ["prepend"] * 2, (3, None)),  # two lengths
        ([[1, 1, 1, 1], [1, 1, 1, 1]], [2, 0], ["prepend"] * 2, (2, None)),  # a row without
        ([[1, 1, 1, 1], [1, 1, 1, 1]], [2, 2], ["prepend", "append"], (None, None)),
    ],
)
def test_a_strip_by_slice_equals_the_gather(mask, counts, placements, shift):
    """Where every row's tokens are one run of the spliced sequence the layout says so
    (``shift``) and outputs are stripped by a slice; it equals the general gather, values and
    gradients, for logits, hidden states and attentions."""
    for fill_left, want_shift in zip((True, False), shift, strict=True):
        lay = _splice_layout(torch.tensor(mask), counts, placements, fill_left)
        assert lay.shift == want_shift
        general = dataclasses.replace(lay, shift=None)
        b, t2 = lay.src.shape
        logits = torch.randn(b, t2, 7, requires_grad=True)
        hidden = tuple(torch.randn(b, t2, 5) for _ in range(2))
        attn = (torch.randn(b, 2, t2, t2),)
        got, want = (
            strip_outputs(
                CausalLMOutputWithPast(logits=logits, hidden_states=hidden, attentions=attn),
                layout,
                False,
            )
            for layout in (lay, general)
        )
        assert got.logits.shape == (b, len(mask[0]), 7) and got.logits.is_contiguous()
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.hidden_states, want.hidden_states, rtol=0, atol=0)
        torch.testing.assert_close(got.attentions, want.attentions, rtol=0, atol=0)
        w = torch.randn_like(want.logits)
        (g_slice,) = torch.autograd.grad((got.logits * w).sum(), logits)
        (g_gather,) = torch.autograd.grad((want.logits * w).sum(), logits)
        torch.testing.assert_close(g_slice, g_gather, rtol=0, atol=0)
