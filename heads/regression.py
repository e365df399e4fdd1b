"""Regression: one score per example, or one per named output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mtreg.core.spec import HeadSpec
from mtreg.heads.base import HeadKind, Words


class Regression(HeadKind):
    """Labels are a number or a list of numbers (one per output); the result is ``value``
    (one output) or ``values`` by output name."""

    name = "regression"
    default_metrics = ("pearson", "spearman")
    hf_problem_type = "regression"

    def encode_label(
        self, head: HeadSpec, label: Any, word_ids: Sequence[int | None] | None
    ) -> list[float]:
        """Return the target as a list of floats, one per output."""
        values = label if isinstance(label, list | tuple) else [label]
        return [float(v) for v in values]

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
