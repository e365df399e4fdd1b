"""Regression: one score per example, or one per named output."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.heads.base import HeadKind, Words

FLOAT32_MAX = torch.finfo(torch.float32).max


def _values(label: Any) -> Sequence[Any]:
    """Return a regression label as one value per output (a lone number is one output)."""
    return label if isinstance(label, list | tuple) else [label]


class Regression(HeadKind):
    """Labels are a number or a list of numbers (one per output); the result is ``value``
    (one output) or ``values`` by output name."""

    name = "regression"
    default_metrics = ("pearson", "spearman")
    hf_problem_type = "regression"

    def check_label(self, head: HeadSpec, label: Any, words: int) -> None:
        """Raise MtregError unless ``label`` is one finite number per output (a number, or a
        list of them for a head of several outputs); a bool or a numeric string is refused,
        as a sign of a loader that did not parse its data."""
        values = _values(label)
        if len(values) != head.num_outputs:
            raise MtregError(
                f"label {label!r} has {len(values)} value(s), the head has "
                f"{head.num_outputs} output(s)"
            )
        for value in values:
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise MtregError(
                    f"label {label!r}: {value!r} is a {type(value).__name__}, not a number; "
                    "convert it in the plugin's loader"
                )
            # Targets train as float32: a larger double would become Inf there.
            if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise MtregError(
                    f"label {label!r} is not a finite number in float32's range "
                    f"(±{FLOAT32_MAX:.3g})"
                )

    def encode_label(
        self, head: HeadSpec, label: Any, word_ids: Sequence[int | None] | None
    ) -> list[float]:
        """Return the target as a list of floats, one per output."""
        return [float(v) for v in _values(label)]

    def stack(self, labels: Sequence[Any], width: int) -> torch.Tensor:
        """Return the targets as a float tensor [B, outputs]."""
        return torch.tensor(labels, dtype=torch.float32)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the mean squared error of the outputs [B, outputs] against the targets."""
        return F.mse_loss(logits, labels)

    def distill(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: Any, temperature: float
    ) -> torch.Tensor:
        """Return the mean squared error to the teacher's outputs (no temperature: there is
        no distribution to soften)."""
        return F.mse_loss(student, teacher)

    def decode(
        self, head: HeadSpec, logits: Sequence[torch.Tensor], labels: Sequence[Any]
    ) -> tuple[list[Any], list[Any]]:
        """Return predicted and reference floats (one output) or lists of floats
        (several)."""
        if head.num_outputs > 1:
            return [z.tolist() for z in logits], [[float(v) for v in y] for y in labels]
        return [float(z[0]) for z in logits], [float(y[0]) for y in labels]

    def result(self, head: HeadSpec, logits: torch.Tensor, words: Words | None) -> dict[str, Any]:
        """Return ``{"value": float}`` for one output, ``{"values": {name: float}}`` for
        several."""
        values = logits.tolist()
        if len(head.labels) <= 1:
            return {"value": values[0]}
        return {"values": dict(zip(head.labels, values, strict=True))}
