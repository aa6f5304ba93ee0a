"""When a kept (memoised) no-grad table is stale: one key for every memo in softprompt.

Tables computed from adapter parameters (a prefix MLP's output, prompt tokens' keys and values,
stacked per-adapter prefixes) are kept between no-grad calls until a parameter changes. A
tensor's ``_version`` counts in-place writes through autograd-visible ops, but fused and
foreach optimizer kernels (``torch.optim.AdamW(fused=True)``, which ``transformers.Trainer``
picks on torch >= 2.8) update parameters in place without bumping it. Every optimizer step
therefore also bumps a global counter (a ``torch.optim`` step post-hook, registered once), and
``tensor_versions`` folds it into each memo's key: a kept table never outlives an optimizer step.
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


def tensor_versions(tensors: Iterable[torch.Tensor]) -> tuple:
    """The memo key of tables computed from ``tensors``: the optimizer-step count and each
    tensor's identity and in-place version. Equal keys mean the tensors were not changed."""
    return (_steps, tuple((id(t), t._version) for t in tensors))
