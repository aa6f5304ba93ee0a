"""Encoder tasks of P-tuning v2: token classification (``tag``) and extractive QA (``extract``).

Liu et al. 2022 (P-tuning v2, arXiv 2110.07602) train deep prompts on a frozen encoder with a
task head on top: a linear layer on every token for sequence tagging, start/end logits for
extractive QA (reference: THUDM/P-tuning-v2 ``model/token_classification.py``,
``model/question_answering.py``). Here the head is the adapter's ``task_head`` (an
``nn.Linear(hidden, C)``), trained with the prompt and saved in its ``adapter.safetensors``
(``task_head.weight`` (C, hidden), ``task_head.bias`` (C,)), one head per adapter, so rows of one
batch may use different adapters.

Outputs are aligned to the real tokens: ``SoftPromptModel`` strips input-level virtual tokens from
the encoder's hidden states and per-layer prompts never enter the sequence, so the head sees
(B, T, d) for T real tokens (PEFT returns P + T positions for prompt tuning / P-tuning).

``tag`` (rows ``{"tokens": [...], "tags": [...]}``, one BIO tag per word): the words are
tokenized with ``is_split_into_words``; the first subword of each word carries its tag, the other
subwords and the special tokens are ignored (label -100), and a word's prediction is the argmax at
its first subword. Words beyond ``max_length`` tokens are predicted ``"O"`` (with a warning).

``extract`` (rows ``{"question", "context", "answer"}``, optional ``"answer_start"``): question and
context are encoded as a pair (``token_type_ids`` 0 / 1); the head gives start and end logits
(C = 2), taken over context tokens only; the predicted span is the best start <= end within
``MAX_ANSWER_TOKENS`` tokens, mapped back to characters of the context with the fast tokenizer's
offset mapping. A context longer than ``max_length`` tokens (with the question) is truncated
(``truncation="only_second"``), not split into stride windows: a training row whose answer lies
in the cut-off part trains nothing (warned once per row), and predictions come from the kept part.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import Example
from .errors import SoftPromptError
from .metrics import extract_metrics, span_f1
from .tasks import Task, TaskSpec, pad_id
from .templates import Template

__all__ = ["ENCODER_TEMPLATES", "ExtractTask", "MAX_ANSWER_TOKENS", "TagTask", "tag_label_set"]

MAX_ANSWER_TOKENS = 30
"""Longest answer span (in tokens) ``extract`` predicts (SQuAD scripts' default)."""

ENCODER_TEMPLATES = {"tag": "{tokens}", "extract": "{question} [SEP] {context}"}
"""What each task reads, recorded as its template (the encoder tasks take no --template)."""

EXTRACT_LABELS = ["start", "end"]
"""The ``extract`` head's two outputs, stored as the task's labels."""


def tag_label_set(examples: Sequence[Example]) -> list[str]:
    """The tag set of ``tag`` examples: ``"O"`` first (if present), then the others sorted."""
    tags = {t for ex in examples for t in ex.fields["tags"]}
    return (["O"] if "O" in tags else []) + sorted(tags - {"O"})


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class _EncoderTask(Task):
    """Shared parts: an encoder, a fast tokenizer, right-padded batches, per-adapter heads."""

    def __init__(self, spec: TaskSpec, model, tokenizer) -> None:
        self.spec = spec
        self.model = model
        self.tok = tokenizer
        self.chat = None  # encoder tasks have no chat form
        self.enc_dec = model.info.is_encoder_decoder
        self.encoder_only = not self.enc_dec and not model.info.is_causal_lm
        if not self.encoder_only:
            raise SoftPromptError(
                f"--task {spec.kind} needs an encoder model (BERT, MiniLM: a per-token head), "
                "not a language model; use --task classify or generate there"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise SoftPromptError(
                f"--task {spec.kind} needs a fast tokenizer (word ids / offset mappings); load "
                "the model's tokenizer with use_fast=True"
            )
        if not spec.head:
            raise SoftPromptError(f"task {spec.kind!r} reads a head: its field 'head' must be true")
        self.template = Template.parse(spec.template or ENCODER_TEMPLATES[spec.kind])
        self.pad_id = pad_id(tokenizer)

    # ------------------------------------------------------------------ model pieces
    def _pad(self, items: Sequence[dict], key: str, value: int) -> torch.Tensor:
        width = max(len(it["prompt"]) for it in items)
        out = torch.full((len(items), width), value, dtype=torch.long)
        for i, it in enumerate(items):
            out[i, : len(it[key])] = torch.tensor(it[key], dtype=torch.long)
        return out.to(self.model.device)

    def token_logits(
        self, items: Sequence[dict], adapter_names: Sequence[str | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token head logits of encoded rows, right-padded.

        Returns:
            logits (B, T, C), T the longest row's real tokens (no virtual positions), and the
            attention mask (B, T).
        """
        model = self.model
        ids = self._pad(items, "prompt", self.pad_id)  # (B, T)
        mask = self._pad([{**it, "m": [1] * len(it["prompt"])} for it in items], "m", 0)
        types = self._pad(items, "token_type_ids", 0)
        out = model(
            input_ids=ids, attention_mask=mask, token_type_ids=types, adapter_names=adapter_names
        )
        hidden = out.last_hidden_state  # (B, T, d): virtual tokens already stripped
        names = [model.active] * len(items) if adapter_names is None else list(adapter_names)
        logits = None
        for name in dict.fromkeys(names):
            head = model.adapters[name].task_head if name is not None else None
            if head is None:
                raise SoftPromptError(
                    f"adapter {name!r} has no task head; --task {self.spec.kind} needs one "
                    f"(an adapter trained with softprompt train --task {self.spec.kind})"
                )
            rows = [b for b, n in enumerate(names) if n == name]
            part = head(hidden[rows])  # (b, T, C)
            if logits is None:
                logits = part.new_zeros(len(items), *part.shape[1:])
            logits[rows] = part
        return logits, mask

    def _batches(self, examples: Sequence[Example], batch_size: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SoftPromptError(f"--batch-size must be >= 1, got {batch_size!r}")
        items = [self.encode(ex, train=False) for ex in examples]
        order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt"]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield idx, [items[i] for i in idx]


class TagTask(_EncoderTask):
    """Token classification: a BIO tag per word from a linear head on its first subword."""

    def encode(self, ex: Example, train: bool = True) -> dict:
        """``prompt``: token ids; ``labels``: tag index at each word's first subword, -100
        elsewhere; ``first``: token index of each word's first subword (-1: not kept)."""
        words = list(ex.fields["tokens"])
        enc = self.tok(
            words, is_split_into_words=True, truncation=True, max_length=self.spec.max_length
        )
        word_ids = enc.word_ids()
        first = [-1] * len(words)
        for i, w in enumerate(word_ids):
            if w is not None and first[w] < 0:
                first[w] = i
        index = {t: k for k, t in enumerate(self.spec.labels)}
        labels = [-100] * len(word_ids)
        if train:
            for w, i in enumerate(first):
                if i >= 0:
                    labels[i] = index[ex.fields["tags"][w]]
        lost = [w for w, i in enumerate(first) if i < 0]
        seen = {w for w in word_ids if w is not None}
        cut = len(word_ids) >= self.spec.max_length
        # words with no subword at all; when truncated, the lost ones after the last kept word
        # are the truncation's
        empty = [w for w in lost if not cut or w < max(seen, default=-1)]
        what = "not trained" if train else "predicted O"
        if empty:  # a word the tokenizer turns into no subword at all (e.g. "\u200b")
            _warn(
                f"{ex.source}:{ex.line}: word {empty[0]} ({words[empty[0]]!r})"
                + (f" and {len(empty) - 1} more" if len(empty) > 1 else "")
                + f" tokenize to no subword: {what}"
            )
        if len(lost) > len(empty):
            _warn(
                f"{ex.source}:{ex.line}: {len(lost) - len(empty)} of {len(words)} words lie "
                f"beyond max_length {self.spec.max_length} tokens: they are {what}; "
                "raise --max-length"
            )
        return {
            "prompt": enc["input_ids"],
            "token_type_ids": enc.get("token_type_ids", [0] * len(word_ids)),
            "labels": labels,
            "first": first,
            "source": f"{ex.source}:{ex.line}",
        }

    def loss_units(self, item: dict) -> int:
        """The row's tagged words (the terms of ``loss``'s mean)."""
        return sum(x >= 0 for x in item["labels"])

    def loss(self, batch: list[dict]) -> torch.Tensor:
        """Mean cross-entropy over the words' first subwords."""
        logits, _ = self.token_logits(batch)  # (B, T, C)
        labels = self._pad(batch, "labels", -100)  # (B, T)
        if not (labels >= 0).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def predict(
        self, examples: Sequence[Example], batch_size: int = 16, progress=None, **_
    ) -> list[dict]:
        """Each row with ``"prediction"``: one tag per word."""
        fallback = "O" if "O" in self.spec.labels else self.spec.labels[0]
        results: dict[int, list[str]] = {}
        for idx, items in self._batches(examples, batch_size):
            best = self.token_logits(items)[0].argmax(-1).cpu()  # (B, T)
            for b, (i, it) in enumerate(zip(idx, items, strict=True)):
                results[i] = [
                    self.spec.labels[int(best[b, t])] if t >= 0 else fallback for t in it["first"]
                ]
            if progress is not None:
                progress(len(idx))
        return [{**ex.fields, "prediction": results[i]} for i, ex in enumerate(examples)]

    def metrics(self, examples: Sequence[Example], predictions: Sequence[dict]) -> dict:
        return span_f1(
            [list(ex.fields["tags"]) for ex in examples], [p["prediction"] for p in predictions]
        )


class ExtractTask(_EncoderTask):
    """Extractive QA: start/end logits over the context's tokens of a (question, context) pair."""

    def __init__(self, spec: TaskSpec, model, tokenizer) -> None:
        super().__init__(spec, model, tokenizer)
        if list(spec.labels) != EXTRACT_LABELS:
            raise SoftPromptError(f"task 'extract' has labels {EXTRACT_LABELS}, got {spec.labels}")

    def encode(self, ex: Example, train: bool = True) -> dict:
        """``prompt``: pair ids; ``context``: 1 on context tokens; ``offsets``: (start, end)
        characters of each token in the context; ``start``/``end``: the answer's token span, or
        -100 when truncation cut it off."""
        f = ex.fields
        try:
            enc = self.tok(
                str(f["question"]),
                str(f["context"]),
                truncation="only_second",
                max_length=self.spec.max_length,
                return_offsets_mapping=True,
            )
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise SoftPromptError(
                f"{ex.source}:{ex.line}: the question leaves no room for the context within "
                f"max_length {self.spec.max_length} tokens ({err}); raise --max-length or "
                "shorten the question"
            ) from None
        seq = enc.sequence_ids()
        ctx = [1 if s == 1 else 0 for s in seq]
        offsets = [
            tuple(o) if s == 1 else (0, 0) for o, s in zip(enc["offset_mapping"], seq, strict=True)
        ]
        start = end = -100
        if train:
            a = int(f["answer_start"])
            b = a + len(str(f["answer"]))
            toks = [i for i, c in enumerate(ctx) if c]
            hits = [i for i in toks if offsets[i][0] < b and offsets[i][1] > a]
            if hits and offsets[hits[-1]][1] >= b:
                start, end = hits[0], hits[-1]
            else:
                _warn(
                    f"{ex.source}:{ex.line}: the answer lies beyond max_length "
                    f"{self.spec.max_length} tokens of question + context (the context is "
                    "truncated): the row trains nothing; raise --max-length"
                )
        elif len(seq) >= self.spec.max_length and len(str(f["context"])) > offsets[-2][1]:
            _warn(
                f"{ex.source}:{ex.line}: the context is truncated to fit max_length "
                f"{self.spec.max_length} tokens; the answer is sought in the kept part only"
            )
        return {
            "prompt": enc["input_ids"],
            "token_type_ids": enc.get("token_type_ids", [0] * len(seq)),
            "context": ctx,
            "offsets": offsets,
            "start": start,
            "end": end,
            "source": f"{ex.source}:{ex.line}",
        }

    def span_logits(
        self, items: Sequence[dict], adapter_names: Sequence[str | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) start and end logits, -inf outside the context tokens."""
        logits, _ = self.token_logits(items, adapter_names)  # (B, T, 2)
        ctx = self._pad(items, "context", 0).bool()  # (B, T)
        low = torch.finfo(logits.dtype).min
        start = logits[..., 0].masked_fill(~ctx, low)
        end = logits[..., 1].masked_fill(~ctx, low)
        return start, end

    def loss_units(self, item: dict) -> int:
        """1, or 0 for a row whose answer was truncated away (``loss`` ignores it)."""
        return int(item["start"] >= 0)

    def loss(self, batch: list[dict]) -> torch.Tensor:
        """(CE(start) + CE(end)) / 2 over the context tokens; truncated-away answers ignored."""
        start, end = self.span_logits(batch)
        ys = torch.tensor([b["start"] for b in batch], device=start.device)
        ye = torch.tensor([b["end"] for b in batch], device=start.device)
        if not (ys >= 0).any():  # a zero that keeps the graph (masked logits would give nan)
            return start.clamp(min=-1.0).sum() * 0.0
        return (
            F.cross_entropy(start, ys, ignore_index=-100)
            + F.cross_entropy(end, ye, ignore_index=-100)
        ) / 2

    @torch.no_grad()
    def predict(
        self, examples: Sequence[Example], batch_size: int = 16, progress=None, **_
    ) -> list[dict]:
        """Each row with ``"prediction"`` (the answer text, a slice of the context),
        ``"prediction_start"`` (its first character) and ``"score"`` (start + end logit)."""
        results: dict[int, dict] = {}
        for idx, items in self._batches(examples, batch_size):
            start, end = self.span_logits(items)
            t = start.shape[1]
            pair = start[:, :, None] + end[:, None, :]  # (B, T, T): span i..j
            i = torch.arange(t, device=start.device)
            ok = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < MAX_ANSWER_TOKENS)
            pair = pair.masked_fill(~ok, torch.finfo(pair.dtype).min)
            score, flat = pair.flatten(1).max(-1)
            for b, (row, it) in enumerate(zip(idx, items, strict=True)):
                s, e = divmod(int(flat[b]), t)
                a, z = it["offsets"][s][0], it["offsets"][e][1]
                context = str(examples[row].fields["context"])
                results[row] = {
                    "prediction": context[a:z],
                    "prediction_start": a,
                    "score": round(float(score[b]), 4),
                }
            if progress is not None:
                progress(len(idx))
        return [{**ex.fields, **results[i]} for i, ex in enumerate(examples)]

    def metrics(self, examples: Sequence[Example], predictions: Sequence[dict]) -> dict:
        return extract_metrics(
            [p["prediction"] for p in predictions], [str(ex.fields["answer"]) for ex in examples]
        )


TASK_CLASSES = {"tag": TagTask, "extract": ExtractTask}
