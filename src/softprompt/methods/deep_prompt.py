"""Deep prompt tuning (P-tuning v2): per-layer key/value prompts, no reparameterisation.

Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks" (ACL). Based on THUDM/P-tuning-v2 ``model/prefix_encoder.py`` with
``prefix_projection=False``: one trainable (P, layers * 2 * kv_dim) table.

``layers`` chooses which blocks get prompts: all (default), a list of indices, or "top_half"
(the paper: prompts on the upper layers nearly match all layers). For encoder-decoder models the
encoder, decoder and cross-attention of a chosen block index each get their own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._hf import ModelInfo
from ..errors import SoftPromptError
from .base import Adapter, AdapterConfig, FlatPrefix, InitContext, init_kv_targets, register_method


@dataclass
class DeepPromptConfig(AdapterConfig):
    """Deep prompts.

    Attributes:
        num_virtual_tokens: prompt length per layer (paper: 8-20 for classification).
        init: "vocab" (the model's own K/V of sampled frequent tokens, default), "text",
            "labels" or "random" (Gaussian at each layer's activation scale).
        layers: None for all layers, a list of block indices, or "top_half".
    """

    inits: ClassVar[tuple[str, ...]] = ("vocab", "random", "text", "labels")
    default_lr: ClassVar[float] = 5e-3
    cli_fields: ClassVar[dict[str, str]] = {"layers": "layers"}
    layers: list[int] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(type(self).__name__, self.layers)


def check_layers(owner: str, layers) -> list[int] | str | None:
    """A ``layers`` value of a config (``owner``: its class name, for the message): None (all
    layers), "top_half", or a non-empty list (or tuple) of block indices >= 0; returns it with a
    tuple made a list. Whether an index exists is checked against the model (``select_slots``)."""
    if layers is None or layers == "top_half":
        return layers
    ok = (
        isinstance(layers, list | tuple)
        and len(layers) > 0
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
    )
    if not ok:
        raise SoftPromptError(
            f"{owner}.layers must be null (all layers), 'top_half' or a non-empty list of "
            f"block indices (integers >= 0), got {layers!r:.80}"
        )
    return list(layers)


def select_slots(info: ModelInfo, layers: list[int] | str | None) -> list[int]:
    """Slot indices for a layer choice (per stack: encoder and decoder count separately)."""
    if layers is None:
        return list(range(len(info.slots)))
    chosen = []
    for i, s in enumerate(info.slots):
        depth = sum(t.kind == s.kind for t in info.slots)
        if layers == "top_half":
            ok = s.layer >= depth // 2
        else:
            bad = [x for x in layers if not 0 <= x < depth]
            if bad:
                raise SoftPromptError(f"layers {bad} out of range: the model has {depth} layers")
            ok = s.layer in layers
        if ok:
            chosen.append(i)
    return chosen


class DeepPrompt(Adapter):
    def __init__(self, config: DeepPromptConfig, info: ModelInfo, ctx: InitContext | None):
        super().__init__(config, info)
        self.layout = FlatPrefix(info, select_slots(info, config.layers))
        init = (
            init_kv_targets(config, ctx, self.layout.slots)
            if ctx is not None
            else torch.zeros(config.num_virtual_tokens, self.layout.width)
        )
        self.prefix = nn.Parameter(init)  # (P, sum over slots of 2 * kv_dim)

    def kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return self.layout.split(self.prefix)

    def baked_tensors(self) -> dict[str, torch.Tensor]:
        return {"prefix": self.prefix}

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():  # bumps the version: kept tables see the new values
            self.prefix.copy_(tensors["prefix"])


register_method("deep", DeepPromptConfig, DeepPrompt)
