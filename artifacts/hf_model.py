"""A task as a standard transformers classifier folder (``*ForSequenceClassification`` or
``*ForTokenClassification``): read as a teacher, written by ``mtreg export --format hf``.

Both directions rename between transformers' names and mtreg's through the family's table
(``artifacts/families.py``): a branch forking at depth k is the classifier's layers k..N-1,
its classifier tensors (pooler and head, ModernBERT's final norm) and, for DeBERTa, a copy
of the relative embeddings every layer reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtreg.artifacts.checkpoint import Checkpoint, Tensors, read_model
from mtreg.artifacts.config import TrunkConfig
from mtreg.core.spec import HeadSpec
from mtreg.errors import InvalidCheckpoint

_KINDS = {  # HF problem_type -> mtreg head kind, for sequence classifiers
    "single_label_classification": "classification",
    "multi_label_classification": "multilabel",
    "regression": "regression",
}


@dataclass(frozen=True)
class Classifier:
    """A fine-tuned transformers classifier folder.

    Attributes:
        checkpoint: its encoder as trunk components (and their fingerprint).
        head: the head it was trained for: kind (classification, multilabel, regression,
            tagging) and labels (``id2label`` in order; none for a one-output regression).
        tensors: every tensor, by its transformers name.
    """

    checkpoint: Checkpoint
    head: HeadSpec
    tensors: Tensors

    def branch_tensors(self, fork_depth: int) -> Tensors:
        """Return this classifier as branch tensors forking at ``fork_depth``: its layers
        from there up, renamed ``layers.{j}.*``, and its classifier as mtreg names it."""
        checkpoint, family = self.checkpoint, self.checkpoint.config.family
        out: Tensors = {}
        for j, layer in enumerate(checkpoint.layers[fork_depth:]):
            out |= {f"layers.{j}.{k}": v for k, v in layer.items()}
        out |= {k: v for k, v in checkpoint.embeddings.items() if k.startswith("context.")}
        mapping = family.token_classifier if self.head.per_token else family.classifier
        for name, tensor in self.tensors.items():
            for theirs, ours in mapping.items():
                if name.startswith(theirs):
                    out[ours + name.removeprefix(theirs)] = tensor
        return out


def read_classifier(folder: Path) -> Classifier:
    """Read a transformers classifier folder (config, safetensors, tokenizer; never a pickle).

    Raises:
        InvalidCheckpoint: not a checkpoint of a served family (see
            :func:`~mtreg.artifacts.checkpoint.read_checkpoint`), or not a sequence or token
            classifier; the message names what was found.
    """
    checkpoint, raw, tensors = read_model(Path(folder))
    archs = raw.get("architectures") or []
    arch = next(
        (a for a in archs if a.endswith(("ForSequenceClassification", "ForTokenClassification"))),
        None,
    )
    if arch is None:
        raise InvalidCheckpoint(
            f"{folder} is a {', '.join(archs) or 'bare encoder'}, not a fine-tuned "
            "*ForSequenceClassification or *ForTokenClassification model"
        )
    id2label = raw.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    if arch.endswith("ForTokenClassification"):
        head = HeadSpec("tagging", labels)
    else:
        kind = _KINDS.get(raw.get("problem_type") or "", "classification")
        kind = "regression" if len(labels) == 1 and kind == "classification" else kind
        head = HeadSpec(kind, () if kind == "regression" and len(labels) == 1 else labels)
    return Classifier(checkpoint, head, tensors)


def classifier_state_dict(
    config: TrunkConfig,
    embeddings: Mapping[str, torch.Tensor],
    trunk_layers: list[Mapping[str, torch.Tensor]],
    branch: Mapping[str, torch.Tensor],
    per_token: bool,
) -> Tensors:
    """Return a task's standalone network as a transformers classifier state dict: the
    trunk's embeddings and its ``len(trunk_layers)`` layers below the fork, then the branch's
    layers, then its classifier tensors, each under transformers' name."""
    family = config.family
    base = family.base
    tensors: Tensors = {}
    for name, tensor in embeddings.items():
        group = max(
            (g for g in family.embedding_groups.items() if name.startswith(g[1])),
            key=lambda g: len(g[1]),
        )
        tensors[base + group[0] + name.removeprefix(group[1])] = tensor
    layers = [*trunk_layers, *_branch_layers(branch)]
    for i, layer in enumerate(layers):
        tensors |= {f"{base}{family.layer_prefix}{i}.{k}": v for k, v in layer.items()}
    mapping = family.token_classifier if per_token else family.classifier
    for name, tensor in branch.items():
        for theirs, ours in mapping.items():
            if name.startswith(ours):
                tensors[theirs + name.removeprefix(ours)] = tensor
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _branch_layers(branch: Mapping[str, torch.Tensor]) -> list[Tensors]:
    layers: dict[int, Tensors] = {}
    for name, tensor in branch.items():
        if name.startswith("layers."):
            j, _, rest = name.removeprefix("layers.").partition(".")
            layers.setdefault(int(j), {})[rest] = tensor
    return [layers[j] for j in sorted(layers)]


def classifier_config(
    config: TrunkConfig, num_layers: int, head: HeadSpec, architecture: str, problem: str | None
) -> dict[str, Any]:
    """Return the ``config.json`` of a transformers classifier of ``num_layers`` layers on
    ``config``'s architecture; ``architecture`` is the class name's suffix
    (``ForSequenceClassification``), ``problem`` the config's ``problem_type``."""
    family = config.family
    labels = list(head.labels) or ["value"]
    hf = config.to_hf() | {
        "model_type": config.model_type,
        "architectures": [f"{family.hf_class[config.model_type]}{architecture}"],
        family.aliases.get("num_hidden_layers", "num_hidden_layers"): num_layers,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    return hf | ({"problem_type": problem} if problem else {})


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write a transformers ``config.json``."""
    Path(path).write_text(json.dumps(config, indent=1) + "\n")
