"""Tagging: one BIO tag per word, predicted at each word's first sub-token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.heads.base import HeadKind, Words, label_lookup, softmax_distillation

IGNORE = -100  # label of sub-tokens and special tokens (skipped by the loss and the metrics)


def _tags(label: str | Sequence[str]) -> list[str]:
    """Return a tagging label as a list of tags (a string holds them space-separated)."""
    return label.split() if isinstance(label, str) else list(label)


class Tagging(HeadKind):
    """Labels are per-word tags (a list, or a string of space-separated tags), encoded per
    token: a word's tag on its first sub-token, :data:`IGNORE` elsewhere. The result is the
    text's spans."""

    name = "tagging"
    default_metrics = ("span_f1", "token_accuracy")
    hf_architecture = "TokenClassification"

    def check_label(self, head: HeadSpec, label: Any, words: int) -> None:
        """Raise MtregError unless ``label`` is the head's tags (a list, or a string of
        space-separated tags), exactly one per word of a text of ``words`` words."""
        if not isinstance(label, str | list | tuple):
            raise MtregError(
                f"label {label!r} is not a list of tags: give one tag per whitespace-separated "
                "word of the text"
            )
        tags = _tags(label)
        if words == 0:
            raise MtregError("the text has no words to tag")
        if len(tags) != words:
            raise MtregError(
                f"{len(tags)} tags for a text of {words} words: give one tag per "
                "whitespace-separated word"
            )
        lookup = label_lookup(head)
        for tag in tags:
            lookup(tag)

    def encode_label(
        self, head: HeadSpec, label: Any, word_ids: Sequence[int | None] | None
    ) -> list[int]:
        """Return one tag index or :data:`IGNORE` per token.

        Raises:
            MtregError: an unknown tag, or fewer tags than the text has words.
        """
        assert word_ids is not None, "a per-token label is encoded along its tokens' words"
        lookup = label_lookup(head)
        tags = _tags(label)
        out, previous = [], None
        for word in word_ids:
            if word is None or word == previous:
                out.append(IGNORE)
            else:
                if word >= len(tags):
                    raise MtregError(f"{len(tags)} tags for a text of more words")
                out.append(lookup(tags[word]))
            previous = word
        return out

    def stack(self, labels: Sequence[Any], width: int) -> torch.Tensor:
        """Return the tag indices as a long tensor [B, width], padded with IGNORE."""
        out = torch.full((len(labels), width), IGNORE, dtype=torch.long)
        for i, tags in enumerate(labels):
            out[i, : len(tags)] = torch.tensor(tags)
        return out

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the cross-entropy over every labelled token of logits [B, T, C]."""
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def distill(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: Any, temperature: float
    ) -> torch.Tensor:
        """Return the softmax distillation loss over the labelled tokens only."""
        keep = labels != IGNORE
        return softmax_distillation(student[keep], teacher[keep], temperature)

    def decode(
        self, head: HeadSpec, logits: Sequence[torch.Tensor], labels: Sequence[Any]
    ) -> tuple[list[Any], list[Any]]:
        """Return predicted and reference tag names per word: the first sub-token of each
        word, where the label is not IGNORE."""
        names = head.labels
        predictions, references = [], []
        for z, tags in zip(logits, labels, strict=True):
            keep = [i for i, t in enumerate(tags) if t != IGNORE]
            predictions.append([names[int(z[i].argmax())] for i in keep])
            references.append([names[tags[i]] for i in keep])
        return predictions, references

    def result(self, head: HeadSpec, logits: torch.Tensor, words: Words | None) -> dict[str, Any]:
        """Return ``{"spans": [...]}`` (see :func:`tag_spans`) from per-token logits [T, C]:
        each word takes the tag predicted at its first sub-token; words cut off by the
        length limit are ``O``."""
        assert words is not None, "a per-token result is read along the input's words"
        text, word_ids = words
        tags = ["O"] * len(text)
        seen = set()
        for position, word in enumerate(word_ids):
            if word is not None and word not in seen:
                seen.add(word)
                tags[word] = head.labels[int(logits[position].argmax())]
        return {"spans": tag_spans(text, tags)}


def tag_spans(words: Sequence[str], tags: Sequence[str]) -> list[dict[str, Any]]:
    """Turn per-word BIO tags into spans ``{"label", "start", "end", "text"}`` (word indices,
    end exclusive). ``I-x`` after a different label starts a new span, as seqeval does."""
    spans: list[dict[str, Any]] = []
    for position, tag in enumerate(tags):
        prefix, _, label = tag.partition("-")
        continues = (
            prefix == "I" and spans and spans[-1]["label"] == label and spans[-1]["end"] == position
        )
        if continues:
            spans[-1]["end"] = position + 1
        elif prefix in ("B", "I") and label:
            spans.append({"label": label, "start": position, "end": position + 1})
    for span in spans:
        span["text"] = " ".join(words[span["start"] : span["end"]])
    return spans
