"""When a kept (memoised) no-grad table is stale: one key for every memo in softprompt.

Tables computed from adapter parameters (a prefix MLP's output, prompt tokens' keys and values,
stacked per-adapter prefixes) are kept between no-grad calls until a parameter changes. A
tensor's ``_version`` counts in-place writes through autograd-visible ops, but fused and
foreach optimizer kernels (``torch.optim.AdamW(fused=True)``, which ``transformers.Trainer``
picks on torch >= 2.8) update parameters in place without bumping it. Every optimizer step
therefore also bumps a global counter (a ``torch.optim`` step post-hook, registered once), and
``tensor_versions`` folds it into each memo's key: a kept table never outlives an optimizer step.
The key also holds the autocast state: a table computed under autocast is not reused outside it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_steps = 0


def _count_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """How many optimizer steps (any torch optimizer) ran in this process."""
    return _steps


def memo_stamp(devices: Iterable[str] = ()) -> tuple:
    """What every kept table's key starts with: the optimizer-step count, and the autocast
    state of the CPU and of ``devices`` (a table computed under bf16 autocast, as Trainer
    evaluates with ``bf16=True``, is not the float32 one)."""
    state = []
    for d in sorted({"cpu", *devices}):
        on = torch.is_autocast_enabled(d)
        state.append((d, on, torch.get_autocast_dtype(d) if on else None))
    return (_steps, tuple(state))


def tensor_versions(tensors: Iterable[torch.Tensor]) -> tuple:
    """The memo key of tables computed from ``tensors``: ``memo_stamp`` and each tensor's
    identity and in-place version. Equal keys mean the tensors were not changed."""
    tensors = list(tensors)
    return (
        memo_stamp({t.device.type for t in tensors}),
        tuple((id(t), t._version) for t in tensors),
    )
