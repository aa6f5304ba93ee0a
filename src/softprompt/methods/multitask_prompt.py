"""Multitask prompt tuning: a shared prompt times a per-task rank-r multiplicative update.

Wang et al. 2023, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning"
(arXiv:2303.02861); PEFT's ``MultitaskPromptEmbedding`` (peft 0.21.2) is the reference for the
math and the tensor names:

    prompt_t = shared * (cols[t] @ rows[t])      # (P, d) = (P, d) * ((P, r) @ (r, d))

``shared`` is PEFT's ``prompt_embeddings`` (P, d), ``cols`` its ``prefix_task_cols`` (num_tasks, P,
r) and ``rows`` its ``prefix_task_rows`` (num_tasks, r, d). The virtual tokens enter as prompt
tuning's do (input level); the adapter's prompt is task ``task_id``'s.

Two stages, as in the paper:

1. source tasks: train ``shared`` together with each source task's factors:
   ``softprompt.multitask.MultiTaskTrainer`` (``train --method mpt --tasks``) ties one ``shared``
   parameter across one MPT adapter per source task (``tie_shared_prompts``) and saves it as
   ``OUTPUT/shared/adapter``; or simply prompt tuning on the mixed source data (its prompt is
   then the shared prompt);
2. target task: a new adapter whose shared prompt starts from stage 1 (``shared_init_from``: a
   softprompt adapter folder of prompt tuning or MPT, or a PEFT PROMPT_TUNING /
   MULTITASK_PROMPT_TUNING folder), training the rank-r factors, with the shared prompt frozen
   (``train_shared=False``) or not.

Differences from PEFT, on purpose: PEFT draws ``cols`` and ``rows`` from N(0, 0.02), so the
prompt starts near zero whatever the shared prompt is; here ``cols`` start at 1 and ``rows`` at
1/r (plus 1e-3 noise that breaks the symmetry between ranks), so the product is ~1 and the
target task starts from the shared prompt itself. ``bake()`` stores the (P, d) product only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from .._hf import ModelInfo
from ..errors import SoftPromptError
from .base import Adapter, AdapterConfig, InitContext, init_embeddings, register_method


@dataclass
class MultitaskPromptConfig(AdapterConfig):
    """Multitask prompt tuning.

    Attributes:
        num_ranks: rank r of the per-task multiplicative update (the paper: 1).
        num_tasks: how many tasks' factors the adapter holds (1 for a target task).
        task_id: the task whose prompt the adapter gives (0 <= task_id < num_tasks).
        train_shared: train the shared prompt too (False: only the rank-r factors train).
        shared_init_from: an adapter folder whose prompt initialises the shared prompt (a
            softprompt prompt-tuning or MPT folder, or a PEFT PROMPT_TUNING /
            MULTITASK_PROMPT_TUNING folder); None: ``init`` as for prompt tuning.
        placement: "prepend" (default), "append" or "template" (as for prompt tuning).
    """

    inits: ClassVar[tuple[str, ...]] = ("vocab", "random", "text", "labels")
    level: ClassVar[str] = "input"
    default_lr: ClassVar[float] = 0.075
    lr_relative_to_embeddings: ClassVar[bool] = True
    cli_fields: ClassVar[dict[str, str]] = {
        "num_ranks": "num_ranks",
        "train_shared": "train_shared",
        "shared_init_from": "shared_init_from",
    }
    num_ranks: int = 1
    num_tasks: int = 1
    task_id: int = 0
    train_shared: bool = True
    shared_init_from: str | None = None
    placement: str = "prepend"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for key in ("num_ranks", "num_tasks"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SoftPromptError(f"{name}.{key} must be a positive integer, got {value!r}")
        if not isinstance(self.task_id, int) or not 0 <= self.task_id < self.num_tasks:
            raise SoftPromptError(
                f"{name}.task_id must be in 0..{self.num_tasks - 1} (num_tasks={self.num_tasks}), "
                f"got {self.task_id!r}"
            )
        if self.placement not in ("prepend", "append", "template"):
            raise SoftPromptError(
                f"{name}.placement must be one of ['prepend', 'append', 'template'], "
                f"got {self.placement!r}"
            )


def read_shared_prompt(directory: str | Path) -> torch.Tensor:
    """The (P, d) prompt a stage-1 folder holds, for ``shared_init_from``.

    A softprompt folder gives its baked ``prompt`` (prompt tuning, P-tuning, MPT: the task's
    product); a PEFT folder its ``prompt_embeddings`` (for MULTITASK_PROMPT_TUNING: the shared
    prompt itself).
    """
    d = Path(directory)
    cfg = d / "adapter_config.json"
    if not cfg.is_file():
        raise SoftPromptError(f"shared_init_from: {d} is not an adapter folder (no {cfg.name})")
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise SoftPromptError(f"shared_init_from: {cfg} is not valid JSON ({e})") from e
    key, path = ("prompt_embeddings", d / "adapter_model.safetensors")
    if "peft_type" not in meta:
        key, path = ("prompt", d / "adapter.safetensors")
    if not path.is_file():
        raise SoftPromptError(f"shared_init_from: {d} has no {path.name}")
    tensors = load_file(str(path))
    if key not in tensors or tensors[key].dim() != 2:
        raise SoftPromptError(
            f"shared_init_from: {path} has no 2-D tensor {key!r}; the shared prompt comes from "
            "an input-level adapter (prompt tuning, P-tuning, MPT)"
        )
    return tensors[key].float()


class MultitaskPrompt(Adapter):
    """``shared`` (P, d), ``cols`` (num_tasks, P, r), ``rows`` (num_tasks, r, d)."""

    def __init__(self, config: MultitaskPromptConfig, info: ModelInfo, ctx: InitContext | None):
        super().__init__(config, info)
        n, d, r, t = config.num_virtual_tokens, info.hidden_size, config.num_ranks, config.num_tasks
        shared = torch.zeros(n, d)
        cols, rows = torch.ones(t, n, r), torch.full((t, r, d), 1.0 / r)
        if ctx is not None:
            if config.shared_init_from:
                shared = read_shared_prompt(config.shared_init_from)
                if tuple(shared.shape) != (n, d):
                    raise SoftPromptError(
                        f"shared_init_from: {config.shared_init_from} holds a prompt of shape "
                        f"{tuple(shared.shape)}, this adapter takes (num_virtual_tokens, hidden) = "
                        f"{(n, d)}"
                    )
            else:
                shared = init_embeddings(config, ctx)
            if r > 1:
                cols = cols + 1e-3 * torch.randn(cols.shape, generator=ctx.generator)
                rows = rows + 1e-3 * torch.randn(rows.shape, generator=ctx.generator) / r
        self.shared = nn.Parameter(shared, requires_grad=config.train_shared)
        self.cols = nn.Parameter(cols)
        self.rows = nn.Parameter(rows)
        self.register_buffer("baked", None)
        # Bumped when config.task_id changes, so that caches keyed by tensor versions (shared
        # prompt prefixes, softprompt.sharing) see the new task.
        self.register_buffer("task_index", torch.tensor(config.task_id), persistent=False)
        self._task_seen = config.task_id

    @property
    def is_baked(self) -> bool:
        return self.baked is not None

    def trains(self, param: str) -> bool:
        return super().trains(param) and (param != "shared" or self.config.train_shared)

    def task_prompt(self, task_id: int) -> torch.Tensor:
        """(P, d) prompt of task ``task_id``: shared * (cols[t] @ rows[t])."""
        return self.shared * (self.cols[task_id] @ self.rows[task_id])

    def set_task(self, task_id: int) -> None:
        """Give task ``task_id``'s prompt from now on (PEFT's ``task_ids``, one per adapter)."""
        n = self.config.num_tasks
        if not isinstance(task_id, int) or not 0 <= task_id < n:
            raise SoftPromptError(f"MPT task_id must be in 0..{n - 1}, got {task_id!r}")
        if self.baked is not None:
            raise SoftPromptError("a baked MPT adapter holds one task's prompt only")
        self.config.task_id = task_id
        self.input_prompt()

    def input_prompt(self) -> torch.Tensor:
        if self.baked is not None:
            return self.baked
        t = self.config.task_id
        if t != self._task_seen:
            with torch.no_grad():
                self.task_index.fill_(t)
            self._task_seen = t
        return self.task_prompt(t)

    def baked_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.input_prompt()}

    def load_baked(self, tensors: dict[str, torch.Tensor]) -> None:
        self.baked = tensors["prompt"].detach().clone().to(self.shared.device)
        for p in self.parameters():
            p.requires_grad_(False)

    def load_factors(self, shared: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> None:
        """Set the reparameterisation (e.g. from a PEFT MULTITASK_PROMPT_TUNING folder).

        Args:
            shared: (P, d); cols: (num_tasks, P, r); rows: (num_tasks, r, d).
        """
        for name, value in (("shared", shared), ("cols", cols), ("rows", rows)):
            param = getattr(self, name)
            if tuple(value.shape) != tuple(param.shape):
                raise SoftPromptError(
                    f"MPT {name}: got shape {tuple(value.shape)}, the adapter takes "
                    f"{tuple(param.shape)}"
                )
            with torch.no_grad():  # bumps the version: kept tables see the new values
                param.copy_(value.to(param.device, param.dtype))


register_method("mpt", MultitaskPromptConfig, MultitaskPrompt)
