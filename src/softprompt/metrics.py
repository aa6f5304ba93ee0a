"""Evaluation metrics, computed offline (scikit-learn, rouge-score, sacrebleu; no hub downloads).

* classification: accuracy, macro F1 over the given labels, per-class precision/recall/F1/support;
* generation: ROUGE-1/2/L F-measure (Porter stemmer, mean over examples, 0..100), corpus BLEU
  (sacrebleu defaults, 0..100) and exact match after whitespace normalisation (0..1).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import SoftPromptError, require

__all__ = ["classification_metrics", "generation_metrics"]


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
