"""softprompt in the Hugging Face ecosystem: transformers ``Trainer``, TRL, pipelines.

A ``SoftPromptModel`` goes to ``transformers.Trainer`` / ``trl.SFTTrainer`` as ``model=`` and to
``transformers.pipeline("text-generation", model=...)`` as it is. What makes that work lives on
the wrapper (``state_dict`` holds only the adapters, checkpointing hooks, the attributes
pipelines read); what is here:

* ``SaveAdapterCallback``: writes softprompt's adapter files into each Trainer checkpoint;
* ``fused_lm_output``: TRL's fused LM head protocol (``model(..., fused_lm_head=True)``);
* ``ClassifierView``: a classification adapter as a sequence classifier, for
  ``pipeline("text-classification")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, TrainerCallback
from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutput

from ._hf import SoftPromptError


class SaveAdapterCallback(TrainerCallback):
    """Write the trained adapter as softprompt adapter files into every Trainer checkpoint.

    ``Trainer(model=wrapped, callbacks=[SaveAdapterCallback()])``: ``checkpoint-N/`` then also
    holds ``adapter_config.json``, ``adapter.safetensors`` and ``trainable.safetensors`` (the
    folder ``softprompt.load_adapter`` and ``softprompt serve`` read). Without it the checkpoint
    still holds the adapter (``model.safetensors``: the wrapper's ``state_dict()``, the adapters
    only), which ``resume_from_checkpoint`` and ``load_best_model_at_end`` load.

    Args:
        name: the adapter to save (default: the active one).
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        from .model import SoftPromptModel

        while not isinstance(model, SoftPromptModel) and hasattr(model, "module"):
            model = model.module  # DistributedDataParallel and the like
        if not isinstance(model, SoftPromptModel):
            raise SoftPromptError(
                f"SaveAdapterCallback needs the Trainer's model to be a SoftPromptModel, got "
                f"{type(model).__name__}; pass model=softprompt.attach(base, config)"
            )
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        model.save_adapter(folder, self.name, trainable=True)


@dataclass
class FusedLMOutput(ModelOutput):
    """What TRL's trainers read from ``model(..., labels=labels, fused_lm_head=True)``.

    Per-token fields are (B, T-1) (or (B, T) with ``shift_labels``), zero where the label is
    -100; ``label_mask`` marks the others. Virtual tokens never appear: the labels are the
    caller's, position for position (TRL's prompt-learning caveat, one extra token per row, does
    not apply).
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


def fused_lm_output(
    model,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    adapter_names=None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch=None,
    **kwargs,
) -> FusedLMOutput:
    """Next-token log-probabilities of the labels, the LM head run only on labelled positions.

    Args:
        labels: (B, T), aligned with the inputs (shifted here); or ``shift_labels`` (B, T),
            already shifted.
        num_items_in_batch: divide the summed loss by this (Trainer's gradient accumulation);
            default: the number of labelled tokens.
    """
    from .lm import _head
    from .model import SoftPromptModel

    if labels is None and shift_labels is None:
        raise SoftPromptError("fused_lm_head=True needs labels")
    kwargs.pop("output_router_logits", None)
    kwargs["use_cache"] = False
    # The class's forward, not model(...): accelerate wraps an instance's forward in one
    # torch.autocast object under mixed precision, and entering that object again from inside
    # (it is not reentrant) left autocast switched on after training.
    hidden = SoftPromptModel.forward(
        model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        position_ids=position_ids,
        adapter_names=adapter_names,
        body_only=True,
        **kwargs,
    ).last_hidden_state  # (B, T, d)
    if shift_labels is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]  # (B, T-1, d), (B, T-1)
    else:
        target = shift_labels
    mask = target != -100
    logits = _head(model)(hidden[mask]).float()  # (N, V)
    logp = F.log_softmax(logits, dim=-1)
    tok = logp.gather(1, target[mask][:, None])[:, 0]  # (N,)
    log_probs = tok.new_zeros(mask.shape).masked_scatter(mask, tok)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
        top1 = logits.argmax(-1) == target[mask]
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
        is_top1=torch.zeros_like(mask).masked_scatter(mask, top1),
        label_mask=mask,
    )


class ClassifierView(nn.Module):
    """A classification adapter seen as a sequence classifier, for
    ``transformers.pipeline("text-classification", model=ClassifierView(wrapped, tok), tokenizer=tok)``.

    ``forward`` returns ``SequenceClassifierOutput(logits=...)`` with the task's class scores
    (``Task.class_scores``: label-word log-probabilities on an LM, the head's logits on an
    encoder), so the pipeline's softmax gives ``Task.predict``'s scores and ``config.id2label``
    its labels. The text is read back from the pipeline's ids (``tokenizer.decode``) and put
    through the adapter's template, exactly as ``Task.predict`` does with a row's text.

    Args:
        model: the ``SoftPromptModel``.
        tokenizer: the tokenizer the pipeline uses.
        adapter: the adapter to use; default: the model's active one at each call (so
            ``with model.using(name):`` picks it).
    """

    def __init__(self, model, tokenizer, adapter: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self._tasks: dict[str, object] = {}
        labels = self._task().spec.labels
        self.config = PretrainedConfig(
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            problem_type="single_label_classification",
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def can_generate(self) -> bool:
        return False

    def _task(self):
        from .tasks import Task, TaskSpec

        name = self.adapter or self.model.active
        if name is None or name not in self.model.adapters:
            loaded = sorted(self.model.adapters)
            raise SoftPromptError(f"ClassifierView: no adapter {name!r}; loaded: {loaded}")
        meta = self.model.adapters[name].task
        if not meta or meta.get("kind") != "classify":
            raise SoftPromptError(
                f"adapter {name!r} is not a classification adapter (its task is {meta!r}); "
                "train one with softprompt train --task classify or set adapter.task"
            )
        if name not in self._tasks:
            self._tasks[name] = Task(TaskSpec.from_dict(meta), self.model, self.tokenizer)
        labels = self._tasks[name].spec.labels
        if hasattr(self, "config") and list(self.config.id2label.values()) != labels:
            raise SoftPromptError(
                f"adapter {name!r} has labels {labels}, this view was made for "
                f"{list(self.config.id2label.values())}; make a ClassifierView per label set"
            )
        return self._tasks[name]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_
    ) -> SequenceClassifierOutput:
        """(B, T) ids of the texts -> (B, C) class scores."""
        task = self._task()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        texts = [
            self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(input_ids, attention_mask, strict=True)
        ]
        prompts = [task.prompt_ids({"text": t}) for t in texts]
        name = self.adapter or self.model.active
        scores = task.class_scores(prompts, adapter_names=[name] * len(prompts))
        return SequenceClassifierOutput(logits=scores.float())
