"""Tests for softprompt.metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from softprompt import SoftPromptError
from softprompt.metrics import classification_metrics, generation_metrics


def test_classification_two_classes():
    # pos: 1 predicted, 1 right -> P 1, R 1/2, F1 2/3; neg: 3 predicted, 2 right -> P 2/3, R 1,
    # F1 4/5. Accuracy 3/4, macro F1 (2/3 + 4/5) / 2 = 11/15.
    m = classification_metrics(
        ["pos", "pos", "neg", "neg"], ["pos", "neg", "neg", "neg"], ["neg", "pos"]
    )
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx(11 / 15)
    assert m["n"] == 4
    assert m["per_class"] == {
        "neg": {
            "precision": pytest.approx(2 / 3),
            "recall": 1.0,
            "f1": pytest.approx(0.8),
            "support": 2,
        },
        "pos": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
    }
    assert type(m["accuracy"]) is float and type(m["macro_f1"]) is float
    assert type(m["per_class"]["neg"]["precision"]) is float
    assert type(m["per_class"]["neg"]["support"]) is int


def test_classification_unseen_class_and_out_of_set_prediction():
    # "neu" never occurs: all zeros (zero_division=0) and it still counts in the macro average.
    # The free-text prediction "maybe" is wrong: it lowers pos recall, no class's precision.
    m = classification_metrics(
        ["pos", "pos", "neg"], ["pos", "maybe", "neg"], ["neg", "neu", "pos"]
    )
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_class"]["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["pos"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert m["per_class"]["neg"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)


def test_classification_errors():
    with pytest.raises(
        SoftPromptError, match="^2 gold labels but 1 predictions; pass one of each per example$"
    ):
        classification_metrics(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(SoftPromptError, match="^no examples to score; pass at least one$"):
        classification_metrics([], [], ["a"])


def test_generation_identical():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    m = generation_metrics(list(refs), refs)
    assert m == {
        "rouge1": 100.0,
        "rouge2": 100.0,
        "rougeL": 100.0,
        "bleu": pytest.approx(100.0),
        "exact_match": 1.0,
        "n": 2,
    }


def test_generation_rouge_by_hand():
    # unigrams: 3 of 3 predicted match, 3 of 6 reference -> F = 2 * 1 * 0.5 / 1.5 = 2/3
    # bigrams: 2 of 2 match, 2 of 5 reference -> F = 2 * 1 * 0.4 / 1.4 = 4/7
    # LCS = 3 -> same as unigrams
    m = generation_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert m["rouge1"] == pytest.approx(200 / 3)
    assert m["rouge2"] == pytest.approx(400 / 7)
    assert m["rougeL"] == pytest.approx(200 / 3)
    assert m["exact_match"] == 0.0


def test_generation_rouge_uses_stemmer_and_averages():
    # "cats running" and "cat runs" stem to the same words: 100; the second pair shares nothing.
    m = generation_metrics(["cats running", "alpha"], ["cat runs", "beta"])
    assert m["rouge1"] == pytest.approx(50.0)
    assert m["rougeL"] == pytest.approx(50.0)


def test_generation_bleu_by_hand():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths -> no brevity penalty.
    m = generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert m["bleu"] == pytest.approx(
        100 * math.exp(sum(map(math.log, [5 / 6, 3 / 5, 2 / 4, 1 / 3])) / 4)
    )
    assert m["bleu"] == pytest.approx(53.7284965911771)


def test_generation_exact_match_normalises_whitespace():
    m = generation_metrics(["a  b", "x", " Same\ttext\n"], [" a b\n", "y", "Same text"])
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["n"] == 3
    assert all(type(m[k]) is float for k in ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"))


def test_generation_errors():
    with pytest.raises(
        SoftPromptError, match="^1 predictions but 2 references; pass one of each per example$"
    ):
        generation_metrics(["a"], ["a", "b"])
