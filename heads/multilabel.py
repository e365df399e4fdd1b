"""Multilabel classification: any subset of the labels per example, a sigmoid per label."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.heads.base import HeadKind, Words, label_lookup


class Multilabel(HeadKind):
    """Labels are lists of names, encoded as 0/1 rows; the result is every label whose
    probability is above 0.5, and every label's probability."""

    name = "multilabel"
    default_metrics = ("micro_f1", "accuracy")
    hf_problem_type = "multi_label_classification"

    def check_label(self, head: HeadSpec, label: Any, words: int) -> None:
        """Raise MtregError unless ``label`` is a list of the head's label names (a string
        alone would be read letter by letter)."""
        if not isinstance(label, list | tuple):
            raise MtregError(
                f"label {label!r} is not a list: a multilabel example's label is a list of "
                f"names from {list(head.labels)} (empty for none)"
            )
        lookup = label_lookup(head)
        for name in label:
            lookup(name)

    def encode_label(
        self, head: HeadSpec, label: Any, word_ids: Sequence[int | None] | None
    ) -> list[float]:
        """Return a 0/1 row over the head's labels. Raises MtregError for an unknown name."""
        lookup = label_lookup(head)
        hot = [0.0] * len(head.labels)
        for name in label:
            hot[lookup(name)] = 1.0
        return hot

    def stack(self, labels: Sequence[Any], width: int) -> torch.Tensor:
        """Return the 0/1 rows as a float tensor [B, C]."""
        return torch.tensor(labels, dtype=torch.float32)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the binary cross-entropy of logits [B, C] against 0/1 rows [B, C]."""
        return F.binary_cross_entropy_with_logits(logits, labels)

    def distill(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: Any, temperature: float
    ) -> torch.Tensor:
        """Return T² · BCE(sigmoid(student/T), sigmoid(teacher/T)): each label on its own."""
        t = temperature
        return t * t * F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t))

    def decode(
        self, head: HeadSpec, logits: Sequence[torch.Tensor], labels: Sequence[Any]
    ) -> tuple[list[Any], list[Any]]:
        """Return predicted and reference 0/1 lists (a label is predicted at logit > 0)."""
        return [(z > 0).int().tolist() for z in logits], [[int(v) for v in y] for y in labels]

    def result(self, head: HeadSpec, logits: torch.Tensor, words: Words | None) -> dict[str, Any]:
        """Return ``{"labels", "scores"}``: the labels above 0.5 and each label's
        probability."""
        probs = logits.sigmoid()
        scores = {label: float(p) for label, p in zip(head.labels, probs, strict=True)}
        return {"labels": [label for label, p in scores.items() if p > 0.5], "scores": scores}
