"""From examples to tensors: tokenisation, label encoding and dynamically padded batches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError

IGNORE = -100  # label of sub-tokens and special tokens in tagging (skipped by the loss)


def load_tokenizer(path: Path):
    """Return the fast tokenizer stored in folder ``path`` (never remote code, never a hub).

    Raises:
        MtregError: the folder holds no tokenizer transformers can read offline.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise MtregError(f"cannot load the tokenizer in {path}: {exc}") from None


@dataclass
class Encoded:
    """A tokenised data set: unpadded token ids per example, and labels when known."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[Any] | None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    inputs: Sequence[str],
    head: HeadSpec,
    max_length: int,
    with_labels: bool = True,
) -> Encoded:
    """Tokenise ``examples`` (their ``inputs`` fields) and encode their labels for ``head``.

    Tagging examples are split on whitespace and each word's tag goes to its first
    sub-token; the other positions get :data:`IGNORE`.

    Raises:
        MtregError: an example lacks a field, or has a label the head does not know.
    """
    try:
        columns = [[str(ex[field]) for ex in examples] for field in inputs]
    except KeyError as exc:
        raise MtregError(f"an example lacks the input field {exc.args[0]!r}") from None
    if head.kind == "tagging":
        words = [text.split() for text in columns[0]]
        batch = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    else:
        batch = tokenizer(*columns, truncation=True, max_length=max_length)
    ids = batch["input_ids"]
    types = batch.get("token_type_ids") or [[0] * len(x) for x in ids]
    labels = None
    if with_labels:
        labels = [
            _encode_label(
                head, ex.get("label"), batch.word_ids(i) if head.kind == "tagging" else None
            )
            for i, ex in enumerate(examples)
        ]
    return Encoded(ids, types, labels)


def _encode_label(head: HeadSpec, label: Any, word_ids: list[int | None] | None) -> Any:
    index = {name: i for i, name in enumerate(head.labels)}

    def lookup(name: Any) -> int:
        if name not in index:
            raise MtregError(f"label {name!r} is not in the head's labels {list(head.labels)}")
        return index[name]

    if head.kind == "classification":
        return lookup(label)
    if head.kind == "multilabel":
        hot = [0.0] * len(head.labels)
        for name in label:
            hot[lookup(name)] = 1.0
        return hot
    if head.kind == "regression":
        values = label if isinstance(label, list | tuple) else [label]
        return [float(v) for v in values]
    tags = label.split() if isinstance(label, str) else list(label)
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


def collate(
    encoded: Encoded, indices: Sequence[int], pad_id: int, head: HeadSpec | None = None
) -> dict[str, torch.Tensor]:
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
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if encoded.labels is not None and head is not None:
        labels = [encoded.labels[i] for i in indices]
        if head.kind == "classification":
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        elif head.kind == "tagging":
            padded = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for row, tags in enumerate(labels):
                padded[row, : len(tags)] = torch.tensor(tags)
            batch["labels"] = padded
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)
    return batch


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
