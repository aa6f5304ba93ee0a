"""Adaption prompts (LLaMA-Adapter): gated adapter tokens in the top layers' attention.

Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention" (arXiv 2303.16199). Based on PEFT's ``AdaptionPromptConfig`` / ``AdaptedAttention``
(``peft/tuners/adaption_prompt/layer.py``), which follows ZrrSkywalker/LLaMA-Adapter
``llama/model.py``.

Per adapted layer l (the top ``adapter_layers`` blocks) a learned prompt A_l (P, d) and a
scalar gate g_l (zero at init). The layer's own frozen projections make the adapter keys and
values, K_a = A_l W_k, V_a = A_l W_v (no rotary: adapter tokens have no position; repeated per
query-head group under GQA), and with Q the layer's (rotary) queries the attention output gets

    out = attention(Q, K, V) + g_l * softmax(Q K_a^T / sqrt(hd)) V_a

before ``o_proj`` (eq. 8-9 of the paper: the adapter tokens have their own softmax, so a zero
gate leaves the model exactly as it was). PEFT adds ``o_proj(adapter)`` after ``o_proj``
instead: the same when ``o_proj`` has no bias (Llama, Mistral, SmolLM); with a bias PEFT adds
it a second time, gate zero or not, which ``softprompt.peft_compat`` refuses to import.

The addition enters through softprompt's attention seam (``_hf.gated_attention``, through
``PrefixState.gated_for``): no module is patched, rows of different adapters share a batch, and
the KV cache holds only real tokens (the adapter term is recomputed from each step's query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._hf import ModelInfo
from ..errors import SoftPromptError
from .base import Adapter, AdapterConfig, InitContext, register_method


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """Adaption prompts.

    Attributes:
        num_virtual_tokens: adapter tokens per layer (PEFT's ``adapter_len``; the paper: 10).
        init: "random" only: N(0, 1) prompts, as PEFT and the official code (an Embedding's
            init); the zero gates make the model exact at step 0 whatever the prompts.
        adapter_layers: how many of the top layers get a prompt (PEFT's ``adapter_layers``;
            the paper: 30 of LLaMA-7B's 32); None: every layer.
    """

    inits: ClassVar[tuple[str, ...]] = ("random",)
    default_lr: ClassVar[float] = 9e-3  # the paper's base rate (AdamW, weight decay 0.02)
    cli_fields: ClassVar[dict[str, str]] = {"adapter_layers": "adapter_layers"}
    init: str = "random"
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.adapter_layers
        if a is not None and (not isinstance(a, int) or isinstance(a, bool) or a < 1):
            raise SoftPromptError(
                f"AdaptionPromptConfig.adapter_layers must be None (every layer) or a positive "
                f"integer, got {a!r}"
            )


def top_slots(info: ModelInfo, adapter_layers: int | None) -> list[int]:
    """Slot indices of the top ``adapter_layers`` self-attention layers (None: all)."""
    slots = [i for i, s in enumerate(info.slots) if s.kind == "self"]
    slots.sort(key=lambda i: info.slots[i].layer)
    if adapter_layers is None:
        return slots
    if adapter_layers > len(slots):
        raise SoftPromptError(
            f"adapter_layers={adapter_layers} but the model has {len(slots)} layers; use at most "
            f"{len(slots)} (--adapter-layers)"
        )
    return slots[-adapter_layers:]


class AdaptionPrompt(Adapter):
    """The prompts (L, P, d) and gates (L, 1) of the L adapted layers, lowest layer first
    (per layer the shapes of PEFT's ``adaption_prompt`` (1, P, d) less its leading 1, and
    ``adaption_gate`` (1,))."""

    def __init__(self, config: AdaptionPromptConfig, info: ModelInfo, ctx: InitContext | None):
        super().__init__(config, info)
        self.slots = top_slots(info, config.adapter_layers)
        n, d, layers = config.num_virtual_tokens, info.hidden_size, len(self.slots)
        if ctx is not None:
            from .._hf import check_adaption  # the seam knows the attention modules

            check_adaption(ctx.model, info, self.slots)
            init = torch.randn(layers, n, d, generator=ctx.generator)
        else:
            init = torch.zeros(layers, n, d)
        self.adaption_prompt = nn.Parameter(init)  # (L, P, d)
        self.adaption_gate = nn.Parameter(torch.zeros(layers, 1))  # (L, 1): zero-init

    @property
    def first_layer(self) -> int:
        return min(self.info.slots[s].layer for s in self.slots)

    def gated_prompts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {
            s: (self.adaption_prompt[i], self.adaption_gate[i]) for i, s in enumerate(self.slots)
        }

    def baked_tensors(self) -> dict[str, torch.Tensor]:
        return {"adaption_prompt": self.adaption_prompt, "adaption_gate": self.adaption_gate}

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in ("adaption_prompt", "adaption_gate"):
            param = getattr(self, name)
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise SoftPromptError(
                    f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}"
                )
            with torch.no_grad():  # bumps the version: kept tables see the new values
                param.copy_(tensors[name])


register_method("adaption_prompt", AdaptionPromptConfig, AdaptionPrompt)
