"""From examples to tensors: tokenisation, label encoding and dynamically padded batches."""

from __future__ import annotations

import hashlib
import json
import reprlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtreg import heads
from mtreg.core.spec import HeadSpec
from mtreg.core.text import is_unicode
from mtreg.errors import MtregError


@dataclass
class Encoded:
    """A tokenised data set: unpadded token ids per example, and labels when known."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[Any] | None

    def __len__(self) -> int:
        return len(self.input_ids)


def check_example(example: Any, inputs: Sequence[str], head: HeadSpec) -> dict[str, Any]:
    """Return a training ``example`` as a dict, once its text fields and its label are
    what tokenising and training need (an empty text is allowed: real data sets hold a few).

    Raises:
        MtregError: the example is not a mapping, lacks a field or its label, has a text
            that is not a string (None, a number) or not valid Unicode, or a label its
            head refuses (:meth:`mtreg.heads.base.HeadKind.check_label`).
    """
    if not isinstance(example, Mapping):
        raise MtregError(
            f"the example is a {type(example).__name__}, not a mapping of fields "
            f"(such as {{{inputs[0]!r}: ..., 'label': ...}})"
        )
    for name in inputs:
        if name not in example:
            raise MtregError(f"the example lacks the input field {name!r}")
        text = example[name]
        if not isinstance(text, str):
            raise MtregError(
                f"field {name!r} is {reprlib.repr(text)}, a {type(text).__name__}, not a string"
            )
        if not is_unicode(text):
            raise MtregError(f"field {name!r} is not valid Unicode (a lone surrogate)")
    if "label" not in example:
        raise MtregError("the example has no 'label'")
    words = len(example[inputs[0]].split()) if head.per_token else 0
    heads.get(head.kind).check_label(head, example["label"], words)
    return dict(example)


def encode(
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    inputs: Sequence[str],
    head: HeadSpec,
    max_length: int,
    with_labels: bool = True,
) -> Encoded:
    """Tokenise ``examples`` (their ``inputs`` fields) and encode their labels for ``head``.

    The examples of a per-token head are split on whitespace into words; the head's kind
    encodes the labels (:meth:`mtreg.heads.base.HeadKind.encode_label`).

    Raises:
        MtregError: an example lacks a field, or has a label the head does not know.
    """
    try:
        columns = [[str(ex[field]) for ex in examples] for field in inputs]
    except KeyError as exc:
        raise MtregError(f"an example lacks the input field {exc.args[0]!r}") from None
    if head.per_token:
        words = [text.split() for text in columns[0]]
        batch = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    else:
        batch = tokenizer(*columns, truncation=True, max_length=max_length)
    ids = batch["input_ids"]
    types = batch.get("token_type_ids") or [[0] * len(x) for x in ids]
    labels = None
    if with_labels:
        kind = heads.get(head.kind)
        labels = [
            kind.encode_label(head, ex.get("label"), batch.word_ids(i) if head.per_token else None)
            for i, ex in enumerate(examples)
        ]
    return Encoded(ids, types, labels)


def collate(encoded: Encoded, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the examples at ``indices`` to their longest and stack them into tensors."""
    rows = [encoded.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        ids[row, :n] = torch.tensor(encoded.input_ids[i])
        types[row, :n] = torch.tensor(encoded.token_type_ids[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def batch_indices(
    n: int, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[list[int]]:
    """Yield index lists of ``batch_size`` over ``n`` examples, shuffled if asked."""
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def data_hash(examples: Iterable[Mapping[str, Any]]) -> str:
    """Return a sha256 over the examples' canonical JSON, to key caches and record data."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
