"""Task metrics, computed by scikit-learn, scipy and seqeval (GLUE's official choices).

Predictions and references come as each head kind's ``decode`` (:mod:`mtreg.heads`) gives
them: class indices (classification), 0/1 lists (multilabel), floats or per-example lists of
floats (regression, one per output) or per-word tag strings (tagging). The libraries are
imported inside each metric so that importing this module (to check metric names while
plugins load) stays cheap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from mtreg.errors import MtregError

Metric = Callable[[Sequence[Any], Sequence[Any]], float]


def _hashable(values: Sequence[Any]) -> list[Any]:
    # A whole label set or tag sequence must match to count as correct: compare them as
    # tuples, which scikit-learn treats as opaque labels.
    return [tuple(v) if isinstance(v, list | tuple) else v for v in values]


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Share of exact matches (a whole label set, or a whole tag sequence, must match)."""
    from sklearn.metrics import accuracy_score

    if references and isinstance(references[0], list | tuple):
        pairs = zip(_hashable(predictions), _hashable(references), strict=True)
        return accuracy_score([True] * len(references), [p == r for p, r in pairs])
    return accuracy_score(references, predictions)


def binary_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """F1 of class 1 (MRPC and QQP's official metric, with accuracy); 0 when undefined."""
    from sklearn.metrics import f1_score

    # labels=[1] with micro averaging is the F1 of class 1 even if other classes occur.
    return f1_score(references, predictions, labels=[1], average="micro", zero_division=0)


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes in the references."""
    from sklearn.metrics import f1_score

    labels = sorted(set(references))
    return f1_score(references, predictions, labels=labels, average="macro", zero_division=0)


def mcc(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation (CoLA's official metric), multi-class form; 0 when undefined."""
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(references, predictions)


def micro_f1(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """F1 over every (example, label) decision of a multilabel head."""
    import numpy as np
    from sklearn.metrics import f1_score

    return f1_score(
        np.asarray(references, dtype=int),
        np.asarray(predictions, dtype=int),
        average="micro",
        zero_division=0,
    )


def _correlation(method: str, predictions: Sequence[Any], references: Sequence[Any]) -> float:
    import numpy as np
    from scipy import stats

    p, r = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    if p.ndim == 2:
        # Several outputs: each is its own score, and a head is as good as their mean.
        return sum(_correlation(method, p[:, j], r[:, j]) for j in range(p.shape[1])) / p.shape[1]
    # A constant side has no correlation; scipy warns and returns NaN, mtreg reports 0.
    if len(r) < 2 or np.ptp(p) == 0 or np.ptp(r) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = stats.pearsonr(p, r)[0] if method == "pearson" else stats.spearmanr(p, r)[0]
    return 0.0 if math.isnan(value) else float(value)


def pearson(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Pearson correlation (STS-B, with Spearman); 0 when a side is constant. With several
    outputs per example (lists), the mean of each output's correlation."""
    return _correlation("pearson", predictions, references)


def spearman(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when a side is constant. With
    several outputs per example, the mean over outputs."""
    return _correlation("spearman", predictions, references)


def mse(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Mean squared error (over every output of every example), negated so that higher is
    better like every other metric."""
    from sklearn.metrics import mean_squared_error

    return -mean_squared_error(references, predictions)


def span_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Entity-level F1 over BIO tag sequences (a span counts only if label and both ends
    match), by seqeval's default (conlleval) rules."""
    from seqeval.metrics import f1_score

    return f1_score([list(r) for r in references], [list(p) for p in predictions], zero_division=0)


def token_accuracy(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> float:
    """Share of words tagged correctly."""
    from seqeval.metrics import accuracy_score

    if not any(references):
        return 0.0
    return accuracy_score([list(r) for r in references], [list(p) for p in predictions])


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
    if len(predictions) != len(references):
        raise MtregError(f"{len(predictions)} predictions for {len(references)} references")
    return {name: float(METRICS[name](predictions, references)) for name in names}
