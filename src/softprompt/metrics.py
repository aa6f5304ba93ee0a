"""Evaluation metrics, computed offline (scikit-learn, rouge-score, sacrebleu; no hub downloads).

* classification: accuracy, macro F1 over the given labels, per-class precision/recall/F1/support;
* generation: ROUGE-1/2/L F-measure (Porter stemmer, mean over examples, 0..100), corpus BLEU
  (sacrebleu defaults, 0..100) and exact match after whitespace normalisation (0..1);
* tagging: span precision/recall/F1 over BIO entity spans (conlleval's rules, 0..1);
* extractive QA: SQuAD v1.1 exact match and token F1 (0..1).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import SoftPromptError, require

__all__ = [
    "bio_spans",
    "classification_metrics",
    "extract_metrics",
    "generation_metrics",
    "span_f1",
]


def _check_lengths(a: Sequence, b: Sequence, what: tuple[str, str]) -> None:
    if len(a) != len(b):
        raise SoftPromptError(
            f"{len(a)} {what[0]} but {len(b)} {what[1]}; pass one of each per example"
        )
    if not a:
        raise SoftPromptError("no examples to score; pass at least one")


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> dict:
    """Accuracy, macro F1 and per-class scores.

    Predictions outside ``labels`` (e.g. free text a model generated) count as wrong; they lower
    the recall of the true class and no class's precision. Classes with no prediction or no
    support score 0 (``zero_division=0``).

    Args:
        y_true: gold labels.
        y_pred: predicted labels, one per gold label.
        labels: the classes to report (macro F1 averages over exactly these).

    Returns:
        ``{"accuracy", "macro_f1", "per_class": {label: {"precision", "recall", "f1",
        "support"}}, "n"}``; scores are Python floats in 0..1, supports and ``n`` ints.
    """
    sk = require("sklearn.metrics", "metrics", "classification metrics")
    accuracy_score, precision_recall_fscore_support = (
        sk.accuracy_score,
        sk.precision_recall_fscore_support,
    )

    _check_lengths(y_true, y_pred, ("gold labels", "predictions"))
    labels = list(labels)
    if not labels:
        raise SoftPromptError("no labels given; pass the label set (e.g. data.label_set(train))")
    y_true, y_pred = [str(y) for y in y_true], [str(y) for y in y_pred]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "n": len(y_true),
    }


def _normalise(text: str) -> str:
    return " ".join(text.split())


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """ROUGE, BLEU and exact match of generated texts against one reference each.

    Returns:
        ``{"rouge1", "rouge2", "rougeL"}``: mean F-measure over examples (rouge-score with the
        Porter stemmer), 0..100; ``"bleu"``: sacrebleu corpus BLEU, 0..100; ``"exact_match"``:
        fraction of predictions equal to their reference after collapsing whitespace, 0..1;
        ``"n"``. All scores are Python floats.
    """
    sacrebleu = require("sacrebleu", "metrics", "generation metrics (BLEU)")
    rouge_scorer = require("rouge_score.rouge_scorer", "metrics", "generation metrics (ROUGE)")

    _check_lengths(predictions, references, ("predictions", "references"))
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for key in keys:
            totals[key] += scores[key].fmeasure
    n = len(predictions)
    result = {key: 100.0 * totals[key] / n for key in keys}
    result["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    matches = sum(
        _normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True)
    )
    result["exact_match"] = matches / n
    result["n"] = n
    return result


# --------------------------------------------------------------------------------------------
# tagging and extractive QA (no dependency: seqeval / the SQuAD script compute the same)
# --------------------------------------------------------------------------------------------


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, first word, last word)`` of a BIO tag sequence.

    conlleval's (and seqeval's default) reading: a span starts at ``B-X``, or at ``I-X`` that
    does not continue a span of type X (so ``O I-PER`` is a PER span); it continues while the
    tags are ``I-X``; ``O`` and any other tag end it.
    """
    spans = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        if kind is not None and not (prefix == "I" and typ == kind):
            spans.add((kind, start, i - 1))
            kind = None
        if prefix in ("B", "I") and typ and kind is None:
            kind, start = typ, i
    return spans


def span_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
    """Micro span precision/recall/F1 of tagged sequences (an entity counts only when its type
    and both boundaries match), per type, and word accuracy.

    Args:
        gold: per sequence, one BIO tag per word.
        predicted: the same shape.

    Returns:
        ``{"span_f1", "precision", "recall", "token_accuracy", "per_type": {type: {"precision",
        "recall", "f1", "support"}}, "n"}``; scores in 0..1 (0 where undefined).
    """
    _check_lengths(gold, predicted, ("gold sequences", "predictions"))
    counts: dict[str, list[int]] = {}  # type -> [true positives, predicted, gold]
    right = words = 0
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if len(g) != len(p):
            raise SoftPromptError(
                f"sequence {i}: {len(g)} gold tags but {len(p)} predicted; one tag per word"
            )
        right += sum(a == b for a, b in zip(g, p, strict=True))
        words += len(g)
        gs, ps = bio_spans(g), bio_spans(p)
        for kind, *_ in gs | ps:
            counts.setdefault(kind, [0, 0, 0])
        for kind, *_ in gs & ps:
            counts[kind][0] += 1
        for kind, *_ in ps:
            counts[kind][1] += 1
        for kind, *_ in gs:
            counts[kind][2] += 1

    def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)

    per_type = {}
    for kind in sorted(counts):
        prec, rec, f1 = prf(*counts[kind])
        per_type[kind] = {"precision": prec, "recall": rec, "f1": f1, "support": counts[kind][2]}
    total = [sum(c[k] for c in counts.values()) for k in range(3)]
    prec, rec, f1 = prf(*total)
    return {
        "span_f1": f1,
        "precision": prec,
        "recall": rec,
        "token_accuracy": right / words if words else 0.0,
        "per_type": per_type,
        "n": len(gold),
    }


def _squad_normalise(text: str) -> list[str]:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no a/an/the, words."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def extract_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """SQuAD v1.1 exact match and token F1 of predicted answer texts, one gold answer each.

    Returns:
        ``{"exact_match", "f1", "n"}``: means over examples in 0..1 (the SQuAD script's numbers
        divided by 100).
    """
    _check_lengths(predictions, answers, ("predictions", "answers"))
    from collections import Counter

    em = f1 = 0.0
    for pred, gold in zip(predictions, answers, strict=True):
        p, g = _squad_normalise(str(pred)), _squad_normalise(str(gold))
        em += float(p == g)
        common = sum((Counter(p) & Counter(g)).values())
        if common:  # as the v1.1 script: no shared token is 0, even two empty answers (EM 1)
            prec, rec = common / len(p), common / len(g)
            f1 += 2 * prec * rec / (prec + rec)
    n = len(predictions)
    return {"exact_match": em / n, "f1": f1 / n, "n": n}
