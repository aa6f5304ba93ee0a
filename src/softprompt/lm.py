"""Language-model losses and scores that run the LM head only where they need it.

A 49k-word LM head over every position of a batch costs as much as several transformer layers
on a small model; classification and answer-only supervision need it on a handful of positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _hf
from .errors import SoftPromptError
from .model import SoftPromptModel


def _head(model: SoftPromptModel):
    parts = _hf.lm_body_and_head(model.base_model)
    if parts is None:
        raise SoftPromptError(f"{type(model.base_model).__name__} is not a decoder-only LM")
    return parts[1]


def lm_loss(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter_names: Sequence[str | None] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not -100.

    Equal to ``model(..., labels=labels).loss`` (for ``reduction="mean"``), but the LM head runs
    only on the supervised positions.

    Args:
        input_ids, attention_mask, labels: (B, T); labels are aligned with input_ids (shifted here).
        reduction: "mean" over supervised tokens, "sum", "row_sum" (B,) or "none" (B,): one loss
            per row, the mean over that row's supervised tokens.
    """
    if model.info.is_encoder_decoder:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            adapter_names=adapter_names,
        )
        return out.loss
    hidden = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        adapter_names=adapter_names,
        body_only=True,
        use_cache=False,
    ).last_hidden_state  # (B, T, d)
    target = labels[:, 1:]
    sel = target != -100  # (B, T-1)
    logits = _head(model)(hidden[:, :-1][sel]).float()  # (N, V)
    tok = F.cross_entropy(logits, target[sel], reduction="none")  # (N,)
    if reduction == "mean":
        return tok.mean()
    if reduction == "sum":
        return tok.sum()
    per_row = _sum_rows(tok, sel)
    if reduction == "row_sum":
        return per_row
    return per_row / sel.sum(1).clamp(min=1)


def sequence_logprobs(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter_names: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each row.  Returns (B,)."""
    return -lm_loss(model, input_ids, attention_mask, labels, adapter_names, reduction="row_sum")


def _sum_rows(tok: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    rows = sel.nonzero()[:, 0]
    return torch.zeros(sel.shape[0], device=tok.device).index_add(0, rows, tok)


def answer_logprobs(
    model: SoftPromptModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    adapter_names: Sequence[str | None] | None = None,
    pad_id: int = 0,
) -> torch.Tensor:
    """log P(answer_c | prompt_b) for every prompt b and candidate answer c (full sequence).

    Multi-token answers are scored by the sum of their tokens' log-probabilities. When every
    answer is one token, one forward over the prompts scores all of them.

    Args:
        prompts: B token-id lists (negative ids mark template virtual tokens).
        answers: C token-id lists (the verbalizer's label words).

    Returns:
        (B, C) log-probabilities; differentiable with respect to the adapter.
    """
    rows = row_answer_logprobs(model, prompts, [answers] * len(prompts), adapter_names, pad_id)
    return torch.stack(rows)


def row_answer_logprobs(
    model: SoftPromptModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    adapter_names: Sequence[str | None] | None = None,
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """``answer_logprobs`` where each prompt has its own candidates (rows of different
    classification adapters in one batch, as the server runs them): ``answers[b]`` are row b's
    C_b token-id lists.

    Returns:
        One (C_b,) tensor of log-probabilities per row.
    """
    head = _head(model)
    device = model.device
    if all(len(a) == 1 for row in answers for a in row):
        ids, mask = pad_left(prompts, pad_id, device)
        hidden = model(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=adapter_names,
            body_only=True,
            use_cache=False,
        ).last_hidden_state[:, -1]  # (B, d)
        logp = F.log_softmax(head(hidden).float(), dim=-1)  # (B, V)
        return [
            logp[b, torch.tensor([a[0] for a in row], device=device)]
            for b, row in enumerate(answers)
        ]
    seqs, labels, names = [], [], []  # one sequence per (row, candidate)
    for b, (p, row) in enumerate(zip(prompts, answers, strict=True)):
        for a in row:
            seqs.append(list(p) + list(a))
            labels.append([-100] * len(p) + list(a))
            names.append(adapter_names[b] if adapter_names is not None else model.active)
    ids, mask = pad_left(seqs, pad_id, device)
    lab, _ = pad_left(labels, -100, device)
    hidden = model(
        input_ids=ids, attention_mask=mask, adapter_names=names, body_only=True, use_cache=False
    ).last_hidden_state  # (S, T, d)
    target = lab[:, 1:]
    sel = target != -100  # (S, T-1)
    logp = F.log_softmax(head(hidden[:, :-1][sel]).float(), dim=-1)  # (N, V)
    tok = logp.gather(1, target[sel][:, None])[:, 0]  # (N,)
    per_seq = _sum_rows(tok, sel)  # (S,)
    out, i = [], 0
    for row in answers:
        out.append(per_seq[i : i + len(row)])
        i += len(row)
    return out


def pad_left(
    rows: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu", right: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists (``right``: pad on the right).  Returns ids (B, T) and attention
    mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(0, len(r)) if right else slice(width - len(r), width)
            ids[i, cols] = torch.tensor(list(r))
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def pad_prompts(
    model: SoftPromptModel, rows: Sequence[Sequence[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt rows padded for ``model``, on its device: on the left for a decoder (generation
    continues at the end), on the right for an encoder-decoder's encoder. The encoder is
    bidirectional, and learned absolute positions (BART's) count from column 0 whatever the
    mask: left padding would shift a row's positions by its pads, so a row's result would
    depend on the longest row beside it."""
    return pad_left(rows, pad, model.device, right=model.info.is_encoder_decoder)
