"""What ``transformers.Trainer``, TRL's trainers and pipelines expect of a model, for the wrapper.

``SoftPromptModel`` is an ``nn.Module``, not a ``PreTrainedModel``; these trainers and pipelines
accept any module but read a few things off it. ``ModelCompat`` (a base class of the wrapper)
answers them:

* ``state_dict()`` holds the adapters only (``adapters.<name>.*``). Trainer saves a non-
  ``PreTrainedModel``'s ``state_dict()`` as ``model.safetensors``: with the base model in it a
  checkpoint would be the whole model, and on models with tied embeddings (SmolLM2) safetensors
  refuses the shared tensors with a RuntimeError. ``load_state_dict`` takes it back
  (``resume_from_checkpoint``, ``load_best_model_at_end``).
* ``activation_checkpointing_enable`` / ``supports_gradient_checkpointing``
  (``TrainingArguments(gradient_checkpointing=True)``).
* ``loss_type``, ``generation_config``, ``can_generate``, ``get_output_embeddings``, ...: the
  base model's. ``loss_type`` matters: without it Trainer counts the labels of a causal LM
  unshifted and divides the summed loss by B too many tokens (``_hf.loss_type`` also names
  GPT-2's causal LM loss, which its class name does not).
* ``fused_lm_head=True`` calls (TRL): renamed before the forward runs, see
  ``_rename_fused_lm_head``.
"""

from __future__ import annotations

from torch import nn

from . import _hf
from ._hf import SoftPromptError

# Attributes transformers' Trainer, TRL and pipelines read off a model; the base model answers.
FROM_BASE = frozenset(
    {
        "can_generate",
        "add_model_tags",
        "model_tags",
        "dtype",
        "main_input_name",
        "input_modalities",
        "output_modalities",
        "get_input_embeddings",
        "get_output_embeddings",
        "name_or_path",
    }
)


def _rename_fused_lm_head(module, args, kwargs):
    """Forward pre-hook: TRL's trainers call ``model(..., fused_lm_head=True)`` after replacing
    the model's forward by one whose fused branch runs ``self.base_model`` as the backbone (true
    of a ``PreTrainedModel``; here ``base_model`` is the whole frozen LM, without the adapters).
    Renamed before that forward runs, the call reaches the wrapper's own forward, which answers it
    with the adapters applied (``softprompt.integrations.fused_lm_output``)."""
    if "fused_lm_head" in kwargs:
        kwargs["softprompt_fused_lm_head"] = kwargs.pop("fused_lm_head")
    return args, kwargs


class ModelCompat(nn.Module):
    """Base class of ``SoftPromptModel``: the hooks transformers' Trainer, TRL and pipelines use.

    Needs ``self.base_model`` (the frozen ``PreTrainedModel``), ``self.adapters`` and
    ``gradient_checkpointing_enable``.
    """

    _keys_to_ignore_on_save = None  # Trainer reads it when a checkpoint lacks keys

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_rename_fused_lm_head, with_kwargs=True)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in FROM_BASE and "base_model" in self.__dict__.get("_modules", {}):
                return getattr(self._modules["base_model"], name)
            raise

    @property
    def generation_config(self):
        """The base model's generation config (its ``generate`` reads it)."""
        return self.base_model.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.base_model.generation_config = value

    @property
    def loss_type(self) -> str | None:
        """The base model's loss, as its forward resolves it (``_hf.loss_type``)."""
        if self.info.is_causal_lm:
            return _hf.loss_type(self.base_model)
        return getattr(self.base_model, "loss_type", None)

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "supports_gradient_checkpointing", False))

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **_
    ) -> None:
        """transformers 5's name for ``gradient_checkpointing_enable`` (what Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapters' tensors only (``adapters.<name>.*``, reparameterisation included): the
        frozen base model is not the wrapper's state."""
        out = self.adapters.state_dict(prefix=prefix + "adapters.", keep_vars=keep_vars)
        if destination is None:
            return out
        destination.update(out)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what ``state_dict()`` gave. ``strict``: every adapter tensor must be there and
        nothing unknown; base-model keys, when given, are loaded too but never required."""
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in res.missing_keys if k.startswith("adapters.")]
        if strict and (missing or res.unexpected_keys):
            raise SoftPromptError(
                f"load_state_dict: missing adapter tensors {missing}, unexpected keys "
                f"{res.unexpected_keys}; loaded adapters: {sorted(self.adapters)}"
            )
        return type(res)(missing, res.unexpected_keys)
