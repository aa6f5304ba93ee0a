"""P-tuning: input-level virtual tokens produced by a prompt encoder (BiLSTM + MLP, or MLP).

Liu et al. 2021, "GPT Understands, Too" (arXiv:2103.10385). Based on THUDM/P-tuning
``PromptEncoder`` (LSTM head) and PEFT's ``PromptEncoder`` (MLP head).

One difference from the reference, on purpose: the encoder is residual with a zero-initialised
last layer, ``prompt = E + head(encoder(E))``, so at step 0 the prompt equals its initialisation
(text/label init then means what it says) while the encoder still trains. The encoder runs once
per step, never once per row. ``bake()`` stores its output as a plain (P, d) table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._hf import ModelInfo
from ..errors import SoftPromptError
from .base import Adapter, AdapterConfig, InitContext, init_embeddings, register_method


@dataclass
class PTuningConfig(AdapterConfig):
    """P-tuning.

    Attributes:
        encoder: "lstm" (bidirectional LSTM then MLP, as in the paper) or "mlp".
        encoder_hidden_size: hidden width of the encoder.
        placement: "prepend", "append" or "template" (as for prompt tuning).
    """

    inits: ClassVar[tuple[str, ...]] = ("vocab", "random", "text", "labels")
    level: ClassVar[str] = "input"
    default_lr: ClassVar[float] = 0.0075
    lr_relative_to_embeddings: ClassVar[bool] = True
    cli_fields: ClassVar[dict[str, str]] = {"encoder": "encoder"}
    encoder: str = "mlp"
    encoder_hidden_size: int = 512
    placement: str = "prepend"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ("lstm", "mlp"):
            raise SoftPromptError(
                f"PTuningConfig.encoder must be 'lstm' or 'mlp', got {self.encoder!r}"
            )
        if self.encoder_hidden_size < 1:
            raise SoftPromptError("PTuningConfig.encoder_hidden_size must be positive")
        if self.encoder == "lstm" and (
            self.encoder_hidden_size < 2 or self.encoder_hidden_size % 2
        ):
            raise SoftPromptError(
                "PTuningConfig.encoder_hidden_size must be even (>= 2) with encoder='lstm': the "
                f"bidirectional LSTM gives half of it each way, got {self.encoder_hidden_size}"
            )
        if self.placement not in ("prepend", "append", "template"):
            raise SoftPromptError(f"PTuningConfig.placement: unknown {self.placement!r}")


class PTuning(Adapter):
    def __init__(self, config: PTuningConfig, info: ModelInfo, ctx: InitContext | None):
        super().__init__(config, info)
        d, h = info.hidden_size, config.encoder_hidden_size
        init = (
            init_embeddings(config, ctx)
            if ctx is not None
            else torch.zeros(config.num_virtual_tokens, d)
        )
        self.embedding = nn.Parameter(init)  # (P, d)
        if config.encoder == "lstm":
            self.lstm = nn.LSTM(d, h // 2, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        else:
            self.lstm = None
            self.head = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
            )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("baked", None)

    @property
    def is_baked(self) -> bool:
        return self.baked is not None

    def input_prompt(self) -> torch.Tensor:
        if self.baked is not None:
            return self.baked
        x = self.embedding  # (P, d)
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # (P, h)
        return self.embedding + self.head(x)  # (P, d)

    def baked_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.input_prompt()}

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        self.baked = tensors["prompt"].detach().clone().to(self.embedding.device)
        for p in self.parameters():
            p.requires_grad_(False)


register_method("ptuning", PTuningConfig, PTuning)
