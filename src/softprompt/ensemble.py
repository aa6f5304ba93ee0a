"""Prompt ensembles (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", section 6): several adapters of one task on one frozen model, combined per input.

For a batch of n inputs and K adapters, the K x n prompts run as the rows of **one** batch (row
k*n+i is input i through adapter k, ``adapter_names``), so the model weights are read once for
the whole ensemble. Classification combines the K label distributions:

* ``mean``: the mean of the K adapters' label probabilities; the prediction is its argmax.
* ``vote``: each adapter votes for its argmax; the most votes win, a tie goes to the tied label
  with the highest mean probability (the paper's majority vote).

Generation ensembles (greedy; generate and chat adapters) combine the K adapters in one of two
ways:

* ``vote``: each adapter decodes alone; the most common output wins (exact string match; a tie
  goes to the output of the earliest listed adapter among the tied).
* ``mean``: the K adapters decode ONE output together: every step's token is the argmax of
  the mean of their K next-token distributions, and every adapter continues from it
  (``GenerationRow.group``, ``softprompt.decoding``). Each member's own output (``members``)
  is decoded in the same batch beside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from .data import Example
from .errors import SoftPromptError
from .tasks import ENCODER_TASKS, Task, TaskSpec

COMBINE = ("mean", "vote")


def load_ensemble(model_name: str | None, adapters: Sequence[str], dtype: str = "float32"):
    """Load every adapter of ``adapters`` onto one base model as ``e0``, ``e1``, ...

    Returns:
        (model, tokenizer, tasks: one Task per adapter, names).

    Raises:
        SoftPromptError: adapters of other base models (each is checked against the one
            loaded), without a task, or of different tasks (kind, labels, label words).
    """
    import softprompt as sp

    from .io import read_adapter_config, recorded_base_model
    from .loading import load_base

    if len(adapters) < 2:
        raise SoftPromptError("an ensemble needs at least 2 --adapter folders")
    meta = read_adapter_config(adapters[0])
    kind = (meta.get("task") or {}).get("kind")
    if kind in ENCODER_TASKS:  # before loading the model: a per-word or span answer
        raise SoftPromptError(
            f"--adapter {adapters[0]} is a {kind!r} adapter: ensembles combine classify, "
            f"generate and chat adapters only; run a {kind} adapter alone (one --adapter)"
        )
    base, tok = load_base(model_name or recorded_base_model(meta, adapters[0]), dtype)
    model = sp.attach(base, tokenizer=tok)
    tasks, names = [], []
    for k, folder in enumerate(adapters):
        name = f"e{k}"
        sp.load_adapter(model, folder, name=name)
        spec = model.adapters[name].task
        if not spec:
            raise SoftPromptError(f"{folder} has no task in its adapter_config.json")
        task = Task(TaskSpec.from_dict(spec), model, tok)
        if tasks:
            first = tasks[0]
            same = task.spec.kind == first.spec.kind and task.spec.labels == first.spec.labels
            if same and task.spec.kind == "classify":
                same = task.answers == first.answers
            if not same:
                raise SoftPromptError(
                    f"--adapter {folder} is for another task than {adapters[0]} (kind, labels "
                    "or label words differ); an ensemble combines adapters of one task"
                )
        tasks.append(task)
        names.append(name)
    return model, tok, tasks, names


def combine_probs(probs: torch.Tensor, combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (K, n, C) label probabilities of K adapters.

    Returns:
        (n,) predicted label indices and (n, C) mean probabilities.
    """
    if combine not in COMBINE:
        raise SoftPromptError(f"--combine must be one of {list(COMBINE)}, got {combine!r}")
    mean = probs.mean(0)  # (n, C)
    if combine == "mean":
        return mean.argmax(-1), mean
    votes = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0)  # (n, C)
    # the most votes; among tied labels, the highest mean probability (mean < 1 breaks ties only)
    return (votes + mean).argmax(-1), mean


def majority(outputs: Sequence[str]) -> tuple[int, int]:
    """The winning member of a generation vote: (its index, its votes). The most common output
    (exact string match) wins; among tied outputs, the earliest listed member's."""
    counts = Counter(outputs)
    top = max(counts.values())
    return next(k for k, o in enumerate(outputs) if counts[o] == top), top


@torch.no_grad()
def ensemble_predict(
    model,
    tasks: Sequence[Task],
    names: Sequence[str],
    examples: Sequence[Example],
    batch_size: int = 16,
    combine: str = "mean",
) -> list[dict]:
    """Predictions of the ensemble for ``examples``; each row also lists every member's answer
    (``members``) and, for classification, the votes per label (``votes``).

    ``batch_size`` counts inputs: each forward pass holds ``batch_size * K`` rows.
    """
    if combine not in COMBINE:
        raise SoftPromptError(f"--combine must be one of {list(COMBINE)}, got {combine!r}")
    first = tasks[0]
    kind = first.spec.kind
    labels = first.spec.labels
    k = len(names)
    out: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        n = len(chunk)
        prompts = [t.prompt_ids(ex.fields) for t in tasks for ex in chunk]  # (K*n): k-major
        rows = [name for name in names for _ in chunk]
        if kind == "classify":
            probs = first.class_scores(prompts, rows).float().softmax(-1).cpu()  # (K*n, C)
            probs = probs.view(k, n, -1)  # (K, n, C)
            pred, mean = combine_probs(probs, combine)
            votes = torch.nn.functional.one_hot(probs.argmax(-1), len(labels)).sum(0)  # (n, C)
            for i, ex in enumerate(chunk):
                out.append(
                    {
                        **ex.fields,
                        "prediction": labels[int(pred[i])],
                        "scores": {
                            lab: round(float(s), 6) for lab, s in zip(labels, mean[i], strict=True)
                        },
                        "votes": {lab: int(v) for lab, v in zip(labels, votes[i], strict=True)},
                        "members": [labels[int(probs[j, i].argmax())] for j in range(k)],
                    }
                )
        elif combine == "vote":
            texts = first.generate_ids(prompts, adapter_names=rows)  # (K*n)
            for i, ex in enumerate(chunk):
                members = [texts[j * n + i] for j in range(k)]
                winner = members[majority(members)[0]]
                out.append({**ex.fields, "prediction": winner, "members": members})
        else:
            texts = _mean_generate(model, first, prompts, rows, n)
            for i, ex in enumerate(chunk):
                members = [texts[n + j * n + i] for j in range(k)]
                out.append({**ex.fields, "prediction": texts[i], "members": members})
    return out


def _mean_generate(model, task: Task, prompts, rows, n: int) -> list[str]:
    """Greedy mean-probability decoding of n inputs by K adapters (``prompts`` / ``rows``
    k-major, K*n), and each adapter alone, in ONE batch: the n ensemble outputs, then the K*n
    members' own (k-major)."""
    from .decoding import GenerationRow
    from .engine import generate_rows

    stop_ids = tuple(task.stop_ids) or None

    def row(b: int, group: int | None) -> GenerationRow:
        return GenerationRow(
            list(prompts[b]), rows[b], task.spec.max_new_tokens, stop_ids=stop_ids, group=group
        )

    together = [row(b, b % n) for b in range(len(prompts))]  # group i: input i's K rows
    alone = [row(b, None) for b in range(len(prompts))]
    gens = together + alone
    results = generate_rows(model, task.tok, gens)
    texts = [r["text"].strip() for r in results]
    return texts[:n] + texts[len(prompts) :]  # every member of group i has its one text


def cmd_eval_ensemble(args) -> dict:
    """``softprompt eval --adapter A B C [--combine mean|vote]``: the ensemble's metrics (and
    each member's alone, from the same forward passes) as JSON on stdout."""
    import json

    from .cli import _err, _warn, _write_jsonl
    from .data import check_eval_labels, load_examples
    from .io import check_output_path, resolve_adapter_dir

    target = (  # checked before the models load: a bad path fails at once
        check_output_path(args.predictions, "--predictions", "ensemble_predictions.jsonl")
        if args.predictions
        else resolve_adapter_dir(args.adapter[0]) / "ensemble_predictions.jsonl"
    )
    model, tok, tasks, names = load_ensemble(args.model, args.adapter, args.dtype)
    fields = set().union(*(t.template.fields for t in tasks))
    rows = load_examples(
        args.data,
        tasks[0].spec.kind,
        skip_bad=args.skip_bad,
        required_fields=sorted(fields),
        warn=_warn,
    )
    if tasks[0].spec.kind == "classify":
        rows = check_eval_labels(tasks[0].spec.labels, rows, args.skip_bad, _warn)
    preds = ensemble_predict(model, tasks, names, rows, args.batch_size, args.combine)
    metrics = tasks[0].metrics(rows, preds)
    metrics["combine"] = args.combine
    metrics["members"] = []
    for j, folder in enumerate(args.adapter):
        alone = [{"prediction": p["members"][j]} for p in preds]
        m = tasks[0].metrics(rows, alone)
        metrics["members"].append(
            {"adapter": str(folder), **{k: v for k, v in m.items() if k != "per_class"}}
        )
    _write_jsonl(target, preds)
    print(json.dumps(metrics))
    _err(f"predictions: {target}")
    return metrics


def cmd_generate_ensemble(args) -> list[dict]:
    """``softprompt generate --adapter A B C [--combine ...] TEXT...``: one JSON line per input,
    the single-adapter line (``softprompt generate``) plus the ensemble's ``votes`` (classify)
    or each member's own output (``members``: generate, chat)."""
    import json

    from .cli import _main_field, generate_rows

    model, tok, tasks, names = load_ensemble(args.model, args.adapter, args.dtype)
    kind = tasks[0].spec.kind
    field = _main_field(kind)
    rows = generate_rows(args, kind)  # as the single-adapter path reads them
    if kind in ("generate", "chat") and args.max_new_tokens is not None:
        for t in tasks:
            t.spec.max_new_tokens = args.max_new_tokens
    preds = ensemble_predict(model, tasks, names, rows, args.batch_size, args.combine)
    for p in preds:
        if kind == "classify":
            line = {
                "text": p[field],
                "label": p["prediction"],
                "scores": p["scores"],
                "votes": p["votes"],
            }
        elif kind == "chat":
            line = {
                "messages": tasks[0].chat_messages(p),
                "output": p["prediction"],
                "members": p["members"],
            }
        else:
            line = {"input": p[field], "output": p["prediction"], "members": p["members"]}
        print(json.dumps(line, ensure_ascii=False))
    return preds
