"""Task metrics, in plain Python (no torch, no scikit-learn), with GLUE's official choices.

Predictions and references come per head kind: class indices (classification), 0/1 lists
(multilabel), floats (regression) or per-word tag strings (tagging).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from mtreg.errors import MtregError

Metric = Callable[[Sequence[Any], Sequence[Any]], float]


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Share of exact matches (a whole label set, or a whole tag sequence, must match)."""
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def binary_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """F1 of class 1 (MRPC and QQP's official metric, with accuracy)."""
    pairs = list(zip(predictions, references, strict=True))
    tp = sum(p == 1 and r == 1 for p, r in pairs)
    fp = sum(p == 1 and r != 1 for p, r in pairs)
    fn = sum(p != 1 and r == 1 for p, r in pairs)
    return _f1(tp, fp, fn)


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes in the references."""
    classes = sorted(set(references))
    scores = []
    for c in classes:
        pairs = list(zip(predictions, references, strict=True))
        tp = sum(p == c and r == c for p, r in pairs)
        fp = sum(p == c and r != c for p, r in pairs)
        fn = sum(p != c and r == c for p, r in pairs)
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores)


def mcc(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation (CoLA's official metric), multi-class form; 0 when undefined."""
    classes = sorted(set(predictions) | set(references))
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references, strict=True))
    predicted = [sum(p == c for p in predictions) for c in classes]
    actual = [sum(r == c for r in references) for c in classes]
    numerator = correct * n - sum(p * a for p, a in zip(predicted, actual, strict=True))
    denominator = math.sqrt(n * n - sum(p * p for p in predicted)) * math.sqrt(
        n * n - sum(a * a for a in actual)
    )
    return numerator / denominator if denominator else 0.0


def micro_f1(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """F1 over every (example, label) decision of a multilabel head."""
    tp = fp = fn = 0
    for p_row, r_row in zip(predictions, references, strict=True):
        for p, r in zip(p_row, r_row, strict=True):
            tp += p == 1 and r == 1
            fp += p == 1 and r == 0
            fn += p == 0 and r == 1
    return _f1(tp, fp, fn)


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation (STS-B, with Spearman); 0 when a side is constant."""
    n = len(references)
    mp, mr = sum(predictions) / n, sum(references) / n
    cov = sum((p - mp) * (r - mr) for p, r in zip(predictions, references, strict=True))
    sp = math.sqrt(sum((p - mp) ** 2 for p in predictions))
    sr = math.sqrt(sum((r - mr) ** 2 for r in references))
    return cov / (sp * sr) if sp and sr else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    # Average ranks for ties, as scipy.stats.spearmanr does.
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation."""
    return pearson(_ranks(predictions), _ranks(references))


def mse(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Mean squared error, negated so that higher is better like every other metric."""
    pairs = zip(predictions, references, strict=True)
    return -sum((p - r) ** 2 for p, r in pairs) / len(references)


def span_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Entity-level F1 over BIO tag sequences (a span counts only if label and both ends
    match), as seqeval computes it for slot filling."""
    from mtreg.model.data import tag_spans

    tp = fp = fn = 0
    for p_tags, r_tags in zip(predictions, references, strict=True):
        words = [""] * len(r_tags)
        p = {(s["label"], s["start"], s["end"]) for s in tag_spans(words, p_tags)}
        r = {(s["label"], s["start"], s["end"]) for s in tag_spans(words, r_tags)}
        tp, fp, fn = tp + len(p & r), fp + len(p - r), fn + len(r - p)
    return _f1(tp, fp, fn)


def token_accuracy(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> float:
    """Share of words tagged correctly."""
    pairs = [
        (p, r)
        for p_row, r_row in zip(predictions, references, strict=True)
        for p, r in zip(p_row, r_row, strict=True)
    ]
    return sum(p == r for p, r in pairs) / max(len(pairs), 1)


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "macro_f1": macro_f1,
    "mcc": mcc,
    "micro_f1": micro_f1,
    "pearson": pearson,
    "spearman": spearman,
    "neg_mse": mse,
    "span_f1": span_f1,
    "token_accuracy": token_accuracy,
}

# What a task gets when its plugin names no metrics: the first one selects checkpoints.
DEFAULT_METRICS = {
    "classification": ("accuracy",),
    "multilabel": ("micro_f1", "accuracy"),
    "regression": ("pearson", "spearman"),
    "tagging": ("span_f1", "token_accuracy"),
}


def check_names(names: Sequence[str]) -> None:
    """Raise MtregError naming the first unknown metric and the known ones."""
    for name in names:
        if name not in METRICS:
            raise MtregError(f"unknown metric {name!r}: use one of {', '.join(METRICS)}")


def evaluate(
    names: Sequence[str], predictions: Sequence[Any], references: Sequence[Any]
) -> dict[str, float]:
    """Return ``{metric: value}`` for each name, in order.

    Raises:
        MtregError: an unknown metric name, or no examples to score.
    """
    check_names(names)
    if not references:
        raise MtregError("no examples to score: the split is empty")
    return {name: float(METRICS[name](predictions, references)) for name in names}
