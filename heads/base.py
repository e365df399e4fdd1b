"""The interface every head kind implements: :class:`HeadKind`.

A head kind knows how a task's labels become tensors, which loss trains its branch, how its
logits become predictions (for the metrics) and results (for users), its default metrics and
its Hugging Face export. The structural facts a spec is validated against (the fewest
labels, one output row per token or not) are in :data:`mtreg.core.spec.KIND_RULES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError

Words = tuple[Sequence[str], Sequence[int | None]]
"""One input's words and, per token, the index of the word it belongs to (None for special
tokens): what a per-token head needs to give each word one prediction."""


class HeadKind(ABC):
    """One head kind. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the kind's name in :data:`mtreg.core.spec.HEAD_KINDS`.
        default_metrics: what a task gets when its plugin names no metrics; the first one
            selects checkpoints.
        hf_architecture: the transformers model class, less the model type prefix
            (``SequenceClassification`` makes ``BertForSequenceClassification``).
        hf_problem_type: the transformers config's ``problem_type`` (None: not set).
    """

    name: ClassVar[str]
    default_metrics: ClassVar[tuple[str, ...]]
    hf_architecture: ClassVar[str] = "SequenceClassification"
    hf_problem_type: ClassVar[str | None] = None

    @abstractmethod
    def check_label(self, head: HeadSpec, label: Any, words: int) -> None:
        """Check one training example's ``label`` before anything is tokenised or trained:
        its type, its names against ``head.labels``, its values (finite numbers), and for
        a per-token head one tag per word of a text of ``words`` words.

        Raises:
            MtregError: what is wrong with the label, in words a plugin author can act on.
        """

    @abstractmethod
    def encode_label(
        self, head: HeadSpec, label: Any, word_ids: Sequence[int | None] | None
    ) -> Any:
        """Return one example's ``label`` encoded for training: plain Python values that
        :meth:`stack` turns into a batch. ``word_ids`` maps each token to its word
        (per-token heads only; None otherwise). The label should have passed
        :meth:`check_label`.

        Raises:
            MtregError: a label the head does not know, or that does not fit the text.
        """

    @abstractmethod
    def stack(self, labels: Sequence[Any], width: int) -> torch.Tensor:
        """Return a batch of encoded labels as one tensor; ``width`` is the batch's token
        count (per-token labels are padded to it)."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the supervised loss of a batch's logits against its stacked labels."""

    @abstractmethod
    def distill(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: Any, temperature: float
    ) -> torch.Tensor:
        """Return the distillation loss of a student's logits against its teacher's, at
        ``temperature``; ``labels`` are the stacked labels (a per-token head skips the
        positions they mark as padding)."""

    @abstractmethod
    def decode(
        self, head: HeadSpec, logits: Sequence[torch.Tensor], labels: Sequence[Any]
    ) -> tuple[list[Any], list[Any]]:
        """Return (predictions, references) in the form :mod:`mtreg.training.metrics`
        takes for this kind, from per-example logits and encoded labels."""

    @abstractmethod
    def result(self, head: HeadSpec, logits: torch.Tensor, words: Words | None) -> dict[str, Any]:
        """Return one input's public result from its logits; ``words`` is given for a
        per-token head only."""


def label_lookup(head: HeadSpec) -> Callable[[Any], int]:
    """Return a function giving a label name's index in ``head.labels``.

    The function raises MtregError for a name the head does not declare.
    """
    index = {name: i for i, name in enumerate(head.labels)}

    def lookup(name: Any) -> int:
        # A label of another type (a number, a list) is refused here rather than hashed.
        if not isinstance(name, str) or name not in index:
            raise MtregError(f"label {name!r} is not in the head's labels {list(head.labels)}")
        return index[name]

    return lookup


def softmax_distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return T² · CE(softmax(z_t/T), softmax(z_s/T)), averaged over rows."""
    t = temperature
    target = F.softmax(teacher / t, dim=-1)
    return t * t * -(target * F.log_softmax(student / t, dim=-1)).sum(-1).mean()
