"""Single-label classification: one class per example, softmax over the labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mtreg.core.spec import HeadSpec
from mtreg.heads.base import HeadKind, Words, label_lookup, softmax_distillation


class Classification(HeadKind):
    """Labels are class names, encoded as indices; the result is the best label and its
    probability."""

    name = "classification"
    default_metrics = ("accuracy",)
    hf_problem_type = "single_label_classification"

    def check_label(self, head: HeadSpec, label: Any, words: int) -> None:
        """Raise MtregError unless ``label`` is one of the head's class names (a string)."""
        label_lookup(head)(label)

    def encode_label(
        self, head: HeadSpec, label: Any, word_ids: Sequence[int | None] | None
    ) -> int:
        """Return the index of class ``label``. Raises MtregError for an unknown class."""
        return label_lookup(head)(label)

    def stack(self, labels: Sequence[Any], width: int) -> torch.Tensor:
        """Return the class indices as a long tensor [B]."""
        return torch.tensor(labels, dtype=torch.long)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the cross-entropy of logits [B, C] against class indices [B]."""
        return F.cross_entropy(logits, labels)

    def distill(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: Any, temperature: float
    ) -> torch.Tensor:
        """Return T² · CE(softmax(teacher/T), softmax(student/T))."""
        return softmax_distillation(student, teacher, temperature)

    def decode(
        self, head: HeadSpec, logits: Sequence[torch.Tensor], labels: Sequence[Any]
    ) -> tuple[list[Any], list[Any]]:
        """Return predicted and reference class indices."""
        return [int(z.argmax()) for z in logits], [int(y) for y in labels]

    def result(self, head: HeadSpec, logits: torch.Tensor, words: Words | None) -> dict[str, Any]:
        """Return ``{"label", "score"}``: the most probable class and its probability."""
        probs = logits.softmax(-1)
        best = int(probs.argmax())
        return {"label": head.labels[best], "score": float(probs[best])}
