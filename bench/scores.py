"""Scores of predictions, and the noise of a comparison between two sets of them: the
metrics of one split (:func:`scored`), bootstrap standard errors of a difference over the
split's examples (:func:`paired_bootstrap_se`, :func:`mean_difference_se`), and the best
constant predictor, the floor a model must clear (:func:`majority`); and a loaded bundle's
scores on a split (:func:`score_bundle`). Shared by bench/quality.py, bench/protocol.py and
bench/teacher.py."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

BOOTSTRAP = 200


def scored(head: Any, metrics: Sequence[str], logits: Sequence[Any], labels: Sequence[Any]) -> dict:
    """Return ``{"metrics", "predictions", "references"}`` for one split."""
    from mtreg import heads
    from mtreg.training.metrics import evaluate

    predictions, references = heads.get(head.kind).decode(head, logits, labels)
    return {
        "metrics": evaluate(metrics, predictions, references),
        "predictions": predictions,
        "references": references,
    }


_BOOTSTRAPS: dict[str, float] = {}  # by content: the report is rebuilt after every unit


def paired_bootstrap_se(
    metric: str, a: Sequence[Any], b: Sequence[Any], references: Sequence[Any], n: int = BOOTSTRAP
) -> float:
    """Return the bootstrap standard error of ``metric(a) - metric(b)`` over examples resampled
    together (fixed seed), the noise scale of a one-seed comparison on this split."""
    return mean_difference_se(metric, [(a, b)], references, n)


def mean_difference_se(
    metric: str,
    pairs: Sequence[tuple[Sequence[Any] | None, Sequence[Any]]],
    references: Sequence[Any],
    n: int = BOOTSTRAP,
) -> float:
    """Return the bootstrap standard error of the mean over ``pairs`` (one per seed) of
    ``metric(a) - metric(b)``, every pair scored on the same resample of the examples (fixed
    seed). Seeds share one split, so their errors are correlated: resampling them together
    keeps that, where pooling per-seed errors as if independent would narrow the interval.
    An ``a`` of None scores 0 (a collapsed model that predicted nothing)."""
    key = hashlib.sha256(json.dumps([metric, pairs, references, n]).encode()).hexdigest()
    if key not in _BOOTSTRAPS:
        _BOOTSTRAPS[key] = _bootstrap_se(metric, pairs, references, n)
    return _BOOTSTRAPS[key]


def _bootstrap_se(
    metric: str,
    pairs: Sequence[tuple[Sequence[Any] | None, Sequence[Any]]],
    references: Sequence[Any],
    n: int,
) -> float:
    from mtreg.training.metrics import evaluate

    def scored(predictions: Sequence[Any] | None, idx: list[int], refs: list[Any]) -> float:
        if predictions is None:
            return 0.0
        return evaluate([metric], [predictions[i] for i in idx], refs)[metric]

    rng = random.Random(0)
    size = len(references)
    means = []
    for _ in range(n):
        idx = [rng.randrange(size) for _ in range(size)]
        refs = [references[i] for i in idx]
        diffs = [scored(a, idx, refs) - scored(b, idx, refs) for a, b in pairs]
        means.append(statistics.fmean(diffs))
    return statistics.stdev(means)


def majority(references: Sequence[Any]) -> list[Any]:
    """Return the predictions of the best constant predictor: the split's most frequent label
    (per word for tagging; the mean for regression, whose correlation is then 0). The floor
    a model must clear before its ratio to another model means much."""
    first = references[0]
    if isinstance(first, float):
        return [statistics.fmean(references)] * len(references)
    if isinstance(first, list) and first and isinstance(first[0], str):
        tag = Counter(t for tags in references for t in tags).most_common(1)[0][0]
        return [[tag] * len(tags) for tags in references]
    label = Counter(_key(r) for r in references).most_common(1)[0][0]
    return [list(label) if isinstance(label, tuple) else label for _ in references]


def _key(value: Any) -> Any:
    # Multilabel sets are lists: count them as tuples.
    return tuple(value) if isinstance(value, list) else value


def score_bundle(
    bundle: Any, task: str, examples: list[dict[str, Any]], metrics: Sequence[str]
) -> dict:
    """Return the served scores of ``task`` on ``examples``: tokenised and run by the loaded
    bundle (:meth:`LoadedBundle.logits`), labels encoded the same way."""
    from mtreg.training.data import encode

    info = bundle.info[task]
    encoded = encode(bundle.tokenizer, examples, info.inputs, info.head, info.max_length)
    inputs = [[str(ex[f]) for f in info.inputs] for ex in examples]
    inputs = [row[0] if len(row) == 1 else row for row in inputs]
    logits = []
    for start in range(0, len(inputs), 64):
        out, _ = bundle.logits(inputs[start : start + 64], [task])[task]
        for row in range(out.shape[0]):
            n = len(encoded.input_ids[start + row])
            logits.append(out[row, :n] if info.head.per_token else out[row])
    return scored(info.head, metrics, logits, encoded.labels)
