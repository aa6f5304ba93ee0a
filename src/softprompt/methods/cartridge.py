"""Cartridges: a trained key/value prefix that stands for a corpus the model no longer reads.

Eyuboglu et al. 2025, "Cartridges: Lightweight and general-purpose long context representations
via self-study" (arXiv 2506.06266); PEFT 0.21's ``CartridgeConfig`` / ``CartridgeEncoder``
(``peft.tuners.cartridge``) hold the same parameterisation.

One flat (P, layers * 2 * kv_dim) key/value table (softprompt's ``FlatPrefix`` layout, which is
PEFT's), P up to a few thousand, no reparameterisation. The first ``num_frozen`` tokens never
change (the paper freezes the first one: the attention sink): ``kv()`` reads them detached, so
their gradient is exactly zero and (with weight decay 0, the default) AdamW never moves them.

Init:

* ``prefill`` (default, the paper's best): the model's own keys and values of the first P tokens of
  ``init_text`` (or ``init_token_ids``), read in one prefill. At step 0 the model with the
  cartridge gives exactly what it gives with those P tokens in its context (on rotary models
  the prefill runs at positions -P..-1, see ``_hf.capture_attention_kv``; on other models the
  real tokens are numbered from P, ``position_offset``).
* ``vocab``: K/V of randomly sampled frequent real tokens (the paper's "random tokens").

Training is context distillation on self-study conversations: ``softprompt.cartridge``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._hf import ModelInfo
from ..errors import SoftPromptError
from .base import (
    Adapter,
    AdapterConfig,
    FlatPrefix,
    InitContext,
    capture_kv,
    frequent_vocab_ids,
    register_method,
    text_token_ids,
)


@dataclass
class CartridgeConfig(AdapterConfig):
    """A cartridge.

    Attributes:
        num_virtual_tokens: P, the cartridge's length in key/value tokens (its KV memory is that
            of P tokens of context).
        init: "prefill" (the K/V of ``init_text``'s / ``init_token_ids``' first P tokens, read
            in one prefill; a config loaded from a file needs neither) or "vocab" (K/V of random
            frequent tokens).
        num_frozen: leading tokens kept frozen (1: the attention sink, as in the paper and PEFT's
            ``num_frozen_tokens``).
    """

    inits: ClassVar[tuple[str, ...]] = ("prefill", "vocab")
    default_lr: ClassVar[float] = 2e-2  # the paper's Adam rate on a text-initialised cache
    cli_fields: ClassVar[dict[str, str]] = {}
    init: str = "prefill"
    num_frozen: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.num_frozen, int)
            or not 0 <= self.num_frozen <= self.num_virtual_tokens
        ):
            raise SoftPromptError(
                f"CartridgeConfig.num_frozen must be an integer in [0, num_virtual_tokens="
                f"{self.num_virtual_tokens}], got {self.num_frozen!r}"
            )


def prefill_targets(config: CartridgeConfig, ctx: InitContext, layout: FlatPrefix) -> torch.Tensor:
    """(P, width) flat K/V of the first P tokens of the init text, read in one prefill (or of
    sampled frequent tokens for ``init="vocab"``).

    Raises:
        SoftPromptError: a text shorter than P tokens (a cartridge is never padded with
            repeats: that would not be the text's own K/V).
    """
    n = config.num_virtual_tokens
    if config.init == "prefill":
        if not (config.init_text or config.init_token_ids):
            raise SoftPromptError(
                "a cartridge with init='prefill' needs init_text (and a tokenizer) or "
                "init_token_ids: the text whose first P tokens' keys and values it starts from"
            )
        ids = text_token_ids(config, ctx)
        if len(ids) < n:
            raise SoftPromptError(
                f"cartridge of P={n:,} tokens from a text of {len(ids):,} tokens: P is larger than "
                f"the text; use at most {len(ids):,} tokens (--tokens) or a longer text"
            )
        ids = ids[:n]
    else:
        vocab = ctx.model.get_input_embeddings().weight.shape[0]
        ids = frequent_vocab_ids(n, vocab, ctx.generator, ctx.tokenizer)
    acts = capture_kv(ctx, ids)
    parts = []
    for s in layout.slots:
        k, v = acts[s]
        parts += [k.reshape(n, -1), v.reshape(n, -1)]
    return torch.cat(parts, dim=1).float()


def check_decoder_only(info: ModelInfo) -> None:
    """Refuse a model a cartridge cannot stand in for a context of.

    Raises:
        SoftPromptError: an encoder-decoder (T5, BART) or encoder (BERT) model: a cartridge is
            the key/value cache of a corpus that a decoder-only LM read before the input.
    """
    if info.is_causal_lm and not info.is_encoder_decoder:
        return
    name = info.identity.get("architecture", "this model")
    kind = "an encoder-decoder" if info.is_encoder_decoder else "an encoder without an LM head"
    raise SoftPromptError(
        f"cartridges need a decoder-only LM (Llama, Qwen, SmolLM, GPT-2, ...): a cartridge is "
        f"the key/value cache of a corpus read before the input, and {name} is {kind}; "
        "use a decoder-only model (--model)"
    )


class Cartridge(Adapter):
    def __init__(self, config: CartridgeConfig, info: ModelInfo, ctx: InitContext | None):
        check_decoder_only(info)
        super().__init__(config, info)
        self.layout = FlatPrefix(info, list(range(len(info.slots))))
        init = (
            prefill_targets(config, ctx, self.layout)
            if ctx is not None
            else torch.zeros(config.num_virtual_tokens, self.layout.width)
        )
        self.prefix = nn.Parameter(init)  # (P, layers * 2 * kv_dim)
        # Without shared rotary positions the prefill read the text at 0..P-1: number the real
        # tokens after it, as they were when the text was in the context.
        self.position_offset = 0 if info.shares_prompt else config.num_virtual_tokens

    def flat(self) -> torch.Tensor:
        """(P, width): the frozen leading rows detached (zero gradient), the rest trainable."""
        f = self.config.num_frozen
        if f == 0 or not self.prefix.requires_grad:
            return self.prefix
        return torch.cat([self.prefix[:f].detach(), self.prefix[f:]], dim=0)

    def kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return self.layout.split(self.flat())

    def baked_tensors(self) -> dict[str, torch.Tensor]:
        return {"prefix": self.prefix}

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        if tuple(tensors["prefix"].shape) != tuple(self.prefix.shape):
            raise SoftPromptError(
                f"cartridge prefix has shape {tuple(tensors['prefix'].shape)}, expected "
                f"{tuple(self.prefix.shape)}"
            )
        with torch.no_grad():  # bumps the version: kept tables see the new values
            self.prefix.copy_(tensors["prefix"])


register_method("cartridge", CartridgeConfig, Cartridge)
