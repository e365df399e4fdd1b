"""Head kinds: the registry covers every kind a plugin may declare, and each kind's label
encoding, loss, decoding and result agree with one another (encode → loss → decode)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from mtreg import heads
from mtreg.cli.scaffold import plan_plugin, render
from mtreg.core.spec import HEAD_KINDS, HeadSpec
from mtreg.errors import MtregError
from mtreg.heads.tagging import IGNORE
from mtreg.training.loop import TEMPERATURE
from mtreg.training.metrics import check_names


@dataclass(frozen=True)
class Case:
    """Two examples of one head: their raw labels, what they encode to, logits that predict
    them, and the results those logits give."""

    head: HeadSpec
    raw: list[Any]
    encoded: list[Any]
    logits: list[list[Any]]
    references: list[Any]
    results: list[dict[str, Any]]
    words: list[tuple[list[str], list[int | None]]] | None = None


HIGH, LOW = pytest.approx(1 / (1 + math.exp(-4))), pytest.approx(1 / (1 + math.exp(4)))

CASES = [
    Case(
        HeadSpec("classification", ("neg", "pos")),
        raw=["pos", "neg"],
        encoded=[1, 0],
        logits=[[-2.0, 2.0], [3.0, -3.0]],
        references=[1, 0],
        results=[
            {"label": "pos", "score": pytest.approx(1 / (1 + math.exp(-4)))},
            {"label": "neg", "score": pytest.approx(1 / (1 + math.exp(-6)))},
        ],
    ),
    Case(
        HeadSpec("multilabel", ("a", "b", "c")),
        raw=[["a", "c"], []],
        encoded=[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
        logits=[[4.0, -4.0, 4.0], [-4.0, -4.0, -4.0]],
        references=[[1, 0, 1], [0, 0, 0]],
        results=[
            {"labels": ["a", "c"], "scores": {"a": HIGH, "b": LOW, "c": HIGH}},
            {"labels": [], "scores": {"a": LOW, "b": LOW, "c": LOW}},
        ],
    ),
    Case(
        HeadSpec("regression"),
        raw=[0.5, 2],
        encoded=[[0.5], [2.0]],
        logits=[[0.5], [2.0]],
        references=[0.5, 2.0],
        results=[{"value": 0.5}, {"value": 2.0}],
    ),
    Case(
        HeadSpec("regression", ("x", "y")),
        raw=[[1.0, 2.0], (3, 4)],
        encoded=[[1.0, 2.0], [3.0, 4.0]],
        logits=[[1.0, 2.0], [3.0, 4.0]],
        references=[[1.0, 2.0], [3.0, 4.0]],
        results=[{"values": {"x": 1.0, "y": 2.0}}, {"values": {"x": 3.0, "y": 4.0}}],
    ),
    Case(
        HeadSpec("tagging", ("O", "B-loc", "I-loc")),
        raw=["O O B-loc I-loc", ["B-loc", "O"]],
        # "new" is two sub-tokens; special tokens and the second sub-token are IGNORE.
        encoded=[[IGNORE, 0, 0, 1, IGNORE, 2, IGNORE], [IGNORE, 1, 0, IGNORE]],
        logits=[
            [[0, 0, 0], [5, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5], [5, 0, 0]],
            [[0, 0, 5], [0, 5, 0], [5, 0, 0], [0, 5, 0]],
        ],
        references=[["O", "O", "B-loc", "I-loc"], ["B-loc", "O"]],
        results=[
            {"spans": [{"label": "loc", "start": 2, "end": 4, "text": "new york"}]},
            {"spans": [{"label": "loc", "start": 0, "end": 1, "text": "paris"}]},
        ],
        words=[
            (["fly", "to", "new", "york"], [None, 0, 1, 2, 2, 3, None]),
            (["paris", "please"], [None, 0, 1, None]),
        ],
    ),
]


def test_the_registry_holds_exactly_the_kinds_plugins_may_declare() -> None:
    assert sorted(heads.KINDS) == sorted(HEAD_KINDS)
    for name in HEAD_KINDS:
        kind = heads.get(name)
        assert kind.name == name
        check_names(kind.default_metrics)  # raises for a metric mtreg does not know
    with pytest.raises(MtregError, match="unknown head kind 'ranking'"):
        heads.get("ranking")


def test_the_cases_cover_every_kind() -> None:
    assert {case.head.kind for case in CASES} == set(HEAD_KINDS)


def _stacked(case: Case, rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-example logits into a batch, padding per-token rows with zeros."""
    if not case.head.per_token:
        return torch.stack(rows)
    width = max(row.shape[0] for row in rows)
    out = torch.zeros(len(rows), width, rows[0].shape[-1])
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.head.kind}-{len(c.head.labels)}")
def test_encode_loss_decode_round_trip(case: Case) -> None:
    kind = heads.get(case.head.kind)
    words = case.words or [None] * len(case.raw)
    word_ids = [w[1] if w else None for w in words]
    encoded = [
        kind.encode_label(case.head, raw, ids) for raw, ids in zip(case.raw, word_ids, strict=True)
    ]
    assert encoded == case.encoded

    rows = [torch.tensor(z, dtype=torch.float32) for z in case.logits]
    logits = _stacked(case, rows)
    labels = kind.stack(encoded, logits.shape[1])
    right, wrong = kind.loss(logits, labels), kind.loss(-logits, labels)
    assert right.ndim == 0 and torch.isfinite(right) and float(right) < float(wrong)
    close = kind.distill(logits, logits, labels, TEMPERATURE)
    far = kind.distill(-logits, logits, labels, TEMPERATURE)
    assert torch.isfinite(close) and float(close) < float(far)

    predictions, references = kind.decode(case.head, rows, encoded)
    assert predictions == references == case.references

    results = [kind.result(case.head, row, w) for row, w in zip(rows, words, strict=True)]
    assert results == case.results


@pytest.mark.parametrize(
    ("kind", "label", "word_ids", "message"),
    [
        ("classification", "maybe", None, r"label 'maybe' is not in the head's labels"),
        ("multilabel", ["a", "z"], None, r"label 'z' is not in the head's labels"),
        ("tagging", "a z", [None, 0, 1, None], r"label 'z' is not in the head's labels"),
        ("tagging", "a", [None, 0, 1, None], "1 tags for a text of more words"),
    ],
)
def test_unknown_labels_are_refused(
    kind: str, label: Any, word_ids: list[int | None] | None, message: str
) -> None:
    head = HeadSpec(kind, ("a", "b"))
    with pytest.raises(MtregError, match=message):
        heads.get(kind).encode_label(head, label, word_ids)


@pytest.mark.parametrize("name", HEAD_KINDS)
def test_a_new_plugin_gets_its_kinds_default_metrics(name: str) -> None:
    files = render(plan_plugin("probe", ["O", "B-x"], kind=name))
    plugin = files["src/mtreg_probe/__init__.py"]
    metrics = heads.get(name).default_metrics
    literal = "(" + ", ".join(f'"{m}"' for m in metrics) + ("," if len(metrics) == 1 else "") + ")"
    assert f"METRICS: tuple[str, ...] = {literal}" in plugin
