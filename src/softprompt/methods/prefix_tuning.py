"""Prefix tuning: per-layer key/value prefixes from an MLP reparameterisation.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL).
Based on XiangLi1999/PrefixTuning and THUDM/P-tuning-v2 ``model/prefix_encoder.py``:
Embedding(P, d) -> Linear(d, h) -> tanh -> Linear(h, layers * 2 * kv_dim), h = 512.

The MLP runs once per forward on the P prefix positions (not once per row: PEFT runs it on B
copies). ``bake()`` replaces it by its output, a plain (P, layers * 2 * kv_dim) table; training
checkpoints keep the MLP so training can resume. In eval mode without grad the MLP output is
memoised until a parameter changes, so inference never reruns it.

Init: the MLP's output layer is solved by least squares so that at step 0 the prefix is the
closest the MLP can come to the target activations: the model's own K/V of sampled vocabulary
("vocab"), of a text ("text" / "labels"), or Gaussian at the activation scale ("random").
Exact when P <= encoder_hidden_size + 1 (the output layer sees P points in h+1 dimensions: the
defaults, 10 or 20 tokens and h=512, are); for longer prefixes it is the least-squares fit
(measured: 0.25-0.33 max error at an activation scale of about 0.4, P=40 with h=16 or P=600
with h=512).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .._hf import ModelInfo
from .._versions import tensor_versions
from ..errors import SoftPromptError
from .base import Adapter, AdapterConfig, FlatPrefix, InitContext, init_kv_targets, register_method
from .deep_prompt import check_layers, select_slots


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning.

    Attributes:
        num_virtual_tokens: prefix length (paper: 10 for table-to-text, 200 for summarisation).
        encoder_hidden_size: MLP hidden width h (paper: 512; PEFT's default, the model width,
            gives 1e9 parameters on a 7B model).
        layers: None for all layers, a list of block indices, or "top_half".
    """

    inits: ClassVar[tuple[str, ...]] = ("vocab", "random", "text", "labels")
    default_lr: ClassVar[float] = 3e-5
    cli_fields: ClassVar[dict[str, str]] = {
        "prefix_hidden": "encoder_hidden_size",
        "layers": "layers",
    }
    encoder_hidden_size: int = 512
    layers: list[int] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size < 1:
            raise SoftPromptError("PrefixTuningConfig.encoder_hidden_size must be positive")
        self.layers = check_layers(type(self).__name__, self.layers)


class PrefixTuning(Adapter):
    def __init__(self, config: PrefixTuningConfig, info: ModelInfo, ctx: InitContext | None):
        super().__init__(config, info)
        self.layout = FlatPrefix(info, select_slots(info, config.layers))
        d, h, n = info.hidden_size, config.encoder_hidden_size, config.num_virtual_tokens
        self.embedding = nn.Embedding(n, d)
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, self.layout.width))
        self.register_buffer("baked", None)
        self._memo: tuple[tuple, torch.Tensor] | None = None
        if ctx is not None:
            gen = ctx.generator
            with torch.no_grad():
                self.embedding.weight.copy_(torch.randn(n, d, generator=gen))
                lin1 = self.mlp[0]
                bound = 1 / d**0.5
                lin1.weight.copy_(torch.empty(h, d).uniform_(-bound, bound, generator=gen))
                lin1.bias.copy_(torch.empty(h).uniform_(-bound, bound, generator=gen))
                self._fit_output_layer(init_kv_targets(config, ctx, self.layout.slots))

    def _fit_output_layer(self, target: torch.Tensor) -> None:
        """Solve the last Linear so that the MLP's output equals ``target`` (P, width)."""
        hidden = self.mlp[1](self.mlp[0](self.embedding.weight))  # (P, h)
        a = torch.cat([hidden, torch.ones(hidden.shape[0], 1)], dim=1)  # (P, h + 1)
        sol = torch.linalg.lstsq(a.double(), target.double(), driver="gelsd").solution  # (h+1, W)
        self.mlp[2].weight.copy_(sol[:-1].T.float())
        self.mlp[2].bias.copy_(sol[-1].float())

    @property
    def is_baked(self) -> bool:
        return self.baked is not None

    def flat(self) -> torch.Tensor:
        """(P, width) prefix: the baked table, or the MLP's output (run once, memoised in eval)."""
        if self.baked is not None:
            return self.baked
        if torch.is_grad_enabled() or self.training:
            return self.mlp(self.embedding.weight)
        version = tensor_versions(self.parameters())
        if self._memo is None or self._memo[0] != version:
            self._memo = (version, self.mlp(self.embedding.weight))
        return self._memo[1]

    def kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return self.layout.split(self.flat())

    def baked_tensors(self) -> dict[str, torch.Tensor]:
        return {"prefix": self.flat()}

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors["prefix"].shape != (self.config.num_virtual_tokens, self.layout.width):
            raise SoftPromptError(
                f"baked prefix has shape {tuple(tensors['prefix'].shape)}, expected "
                f"{(self.config.num_virtual_tokens, self.layout.width)}"
            )
        self.baked = tensors["prefix"].detach().clone().to(self.embedding.weight.device)
        self._memo = None
        for p in self.parameters():
            p.requires_grad_(False)


register_method("prefix", PrefixTuningConfig, PrefixTuning)
