"""Metrics against values computed by hand and by the reference implementations' rules."""

from __future__ import annotations

import math

import pytest
import torch

from mtreg.errors import MtregError
from mtreg.training.metrics import evaluate


def test_classification_metrics() -> None:
    predictions, references = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    scores = evaluate(["accuracy", "f1", "mcc", "macro_f1"], predictions, references)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # 2x2 MCC: (tp*tn - fp*fn) / sqrt(...) with tp=2, tn=1, fp=1, fn=1.
    assert scores["mcc"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # class 1, class 0


def test_mcc_is_zero_when_one_class_is_predicted() -> None:
    assert evaluate(["mcc"], [1, 1, 1], [0, 1, 1])["mcc"] == 0.0


def test_regression_metrics_with_ties() -> None:
    scores = evaluate(["pearson", "spearman", "neg_mse"], [1.0, 2.0, 2.0, 4.0], [1, 2, 3, 4])
    assert scores["pearson"] == pytest.approx(4.5 / math.sqrt(4.75 * 5))
    assert scores["spearman"] == pytest.approx(0.9486833, rel=1e-6)  # scipy's value
    assert scores["neg_mse"] == pytest.approx(-0.25)


def test_a_regression_head_with_several_outputs_scores_each_and_averages() -> None:
    from mtreg.core.spec import HeadSpec
    from mtreg.heads import get
    from mtreg.training.loop import score

    # Output "a" is predicted perfectly, output "b" exactly backwards.
    predictions = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
    references = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    scores = evaluate(["pearson", "spearman", "neg_mse"], predictions, references)
    assert scores["pearson"] == pytest.approx(0.0) and scores["spearman"] == pytest.approx(0.0)
    assert scores["neg_mse"] == pytest.approx(-(4 + 0 + 4) / 6)
    head = HeadSpec(kind="regression", labels=("a", "b"))
    logits = [torch.tensor(row) for row in predictions]
    assert get(head.kind).decode(head, logits, references) == (predictions, references)
    assert score(head, logits, references, ["pearson"]) == {"pearson": pytest.approx(0.0)}
    one = HeadSpec(kind="regression")
    assert get(one.kind).decode(one, [torch.tensor([0.5])], [[1.0]]) == ([0.5], [1.0])


def test_multilabel_and_tagging() -> None:
    assert evaluate(["micro_f1"], [[1, 0, 1]], [[1, 1, 0]])["micro_f1"] == pytest.approx(0.5)
    predicted = [["B-city", "I-city", "O", "B-day"]]
    gold = [["B-city", "I-city", "O", "B-time"]]
    scores = evaluate(["span_f1", "token_accuracy"], predicted, gold)
    assert scores["span_f1"] == pytest.approx(0.5)  # one of two spans right on each side
    assert scores["token_accuracy"] == pytest.approx(3 / 4)


def test_unknown_metric_and_empty_split() -> None:
    with pytest.raises(MtregError, match="unknown metric 'bleu'"):
        evaluate(["bleu"], [1], [1])
    with pytest.raises(MtregError, match="empty"):
        evaluate(["accuracy"], [], [])
