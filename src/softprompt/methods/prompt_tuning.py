"""Prompt tuning: trainable virtual-token embeddings at the input layer.

Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691). Reference implementation: google-research/prompt-tuning.

The virtual tokens go before the input (``placement="prepend"``, the paper's setting), after it
(``"append"``), or wherever a template puts them (``"template"``: the input ids carry markers
``-1 .. -P`` for virtual tokens 0 .. P-1, see ``softprompt.templates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._hf import ModelInfo
from ..errors import SoftPromptError
from .base import Adapter, AdapterConfig, InitContext, init_embeddings, register_method

PLACEMENTS = ("prepend", "append", "template")


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning.

    Attributes:
        num_virtual_tokens: prompt length (Lester et al.: 20 nearly as good as 100).
        init: "vocab" (sampled frequent vocabulary, default), "random" (scaled to the embedding
            table's statistics), "text" (``init_text``) or "labels" (class-label words).
        placement: "prepend" (default), "append" or "template".
    """

    inits: ClassVar[tuple[str, ...]] = ("vocab", "random", "text", "labels")
    level: ClassVar[str] = "input"
    default_lr: ClassVar[float] = 0.075
    lr_relative_to_embeddings: ClassVar[bool] = True
    placement: str = "prepend"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise SoftPromptError(
                f"PromptTuningConfig.placement must be one of {list(PLACEMENTS)}, "
                f"got {self.placement!r}"
            )


class PromptTuning(Adapter):
    """A (P, d) table of virtual-token embeddings."""

    def __init__(self, config: PromptTuningConfig, info: ModelInfo, ctx: InitContext | None):
        super().__init__(config, info)
        init = (
            init_embeddings(config, ctx)
            if ctx is not None
            else torch.zeros(config.num_virtual_tokens, info.hidden_size)
        )
        self.embedding = nn.Parameter(init)  # (P, d)

    def input_prompt(self) -> torch.Tensor:
        return self.embedding

    def baked_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.embedding}

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():  # bumps the version: kept tables see the new values
            self.embedding.copy_(tensors["prompt"])


register_method("prompt", PromptTuningConfig, PromptTuning)
