"""The branch weight file: one task's layers, pooler and head, as safetensors.

Tensors are named ``layers.{j}.<layer tensor>``, ``pooler.dense.{weight,bias}`` (absent for
tagging heads) and ``head.{weight,bias}``. The file's string metadata (``mtreg.*`` keys)
records what the branch is: task, version, fork depth, head, max length, the trunk
fingerprint prefix it was trained on and a training summary. The reader is strict: every
way a file can be wrong ends in an :class:`InvalidWeights` naming the problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mtreg.artifacts.checkpoint import check_shapes, layer_shapes, pooler_shapes
from mtreg.artifacts.config import TrunkConfig
from mtreg.artifacts.integrity import REPAIR_HINT
from mtreg.artifacts.manifest import TaskEntry
from mtreg.core.disk import write_atomically
from mtreg.core.spec import HeadSpec, parse_version, validate_name
from mtreg.errors import Damaged, InvalidWeights, MtregError

FORMAT = "mtreg-branch/1"


@dataclass(frozen=True)
class BranchMeta:
    """What a branch file says about itself."""

    task: str
    task_version: str
    fork_depth: int
    num_layers: int
    head: HeadSpec
    max_length: int
    trunk_prefix: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        """Return the safetensors string metadata for this branch."""
        return {
            "mtreg.format": FORMAT,
            "mtreg.task": self.task,
            "mtreg.task_version": self.task_version,
            "mtreg.fork_depth": str(self.fork_depth),
            "mtreg.num_layers": str(self.num_layers),
            "mtreg.head_kind": self.head.kind,
            "mtreg.labels": json.dumps(list(self.head.labels)),
            "mtreg.max_length": str(self.max_length),
            "mtreg.trunk_prefix": json.dumps(self.trunk_prefix, sort_keys=True),
            "mtreg.training": json.dumps(self.training, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> BranchMeta:
        """Parse safetensors metadata written by :meth:`to_metadata`.

        Raises:
            InvalidWeights: no mtreg metadata, another format, or a malformed value.
        """
        if metadata.get("mtreg.format") != FORMAT:
            found = metadata.get("mtreg.format", "none")
            raise InvalidWeights(
                f"it has no {FORMAT} metadata (found {found!r}): write branch files with "
                "`mtreg train`/`mtreg distill` or mtreg.artifacts.branch_file.write_branch"
            )
        try:
            meta = cls(
                task=validate_name(metadata["mtreg.task"]),
                task_version=metadata["mtreg.task_version"],
                fork_depth=int(metadata["mtreg.fork_depth"]),
                num_layers=int(metadata["mtreg.num_layers"]),
                head=HeadSpec(metadata["mtreg.head_kind"], json.loads(metadata["mtreg.labels"])),
                max_length=int(metadata["mtreg.max_length"]),
                trunk_prefix=json.loads(metadata["mtreg.trunk_prefix"]),
                training=json.loads(metadata.get("mtreg.training", "{}")),
            )
            parse_version(meta.task_version)
        except (KeyError, ValueError, TypeError, RecursionError, MtregError) as exc:
            raise InvalidWeights(f"its mtreg metadata is malformed ({exc})") from None
        if not isinstance(meta.trunk_prefix, dict) or not isinstance(meta.training, dict):
            raise InvalidWeights("its mtreg metadata is malformed (trunk_prefix, training)")
        if meta.fork_depth < 0 or meta.num_layers < 0 or meta.max_length < 2:
            raise InvalidWeights("its mtreg metadata is malformed (negative depth or size)")
        return meta


def branch_shapes(
    config: TrunkConfig, num_layers: int, head: HeadSpec, fork_depth: int = 0
) -> dict[str, tuple[int, ...]]:
    """Return every tensor a branch forking at ``fork_depth`` must hold: name -> shape
    (its layers, the family's extras: DeBERTa's relative-position ``context.*`` copy,
    ModernBERT's ``final_norm.*``; its pooler unless the head is per token; its head)."""
    family = config.family
    shapes = {
        f"layers.{j}.{name}": shape
        for j in range(num_layers)
        for name, shape in layer_shapes(config, fork_depth + j).items()
    }
    shapes |= {k: v for k, v in family.embeddings(config).items() if k.startswith("context.")}
    shapes |= {f"final_norm.{k}": v for k, v in family.final_norm_shapes(config).items()}
    if not head.per_token or family.token_pooler:
        shapes |= {f"pooler.{name}": shape for name, shape in pooler_shapes(config).items()}
    return shapes | {
        "head.weight": (head.num_outputs, config.hidden_size),
        "head.bias": (head.num_outputs,),
    }


def write_branch(path: Path, tensors: Mapping[str, torch.Tensor], meta: BranchMeta) -> Path:
    """Write a branch file (tensors in fp32, with ``meta``) atomically; return ``path``.

    The same tensors and metadata always give the same bytes, so registering a retrained
    but identical branch is a no-op rather than a "different weights" refusal.
    """
    path = Path(path)
    ordered = {name: tensors[name].detach().float().contiguous() for name in sorted(tensors)}
    # Not write_safetensors: the header is reordered before the bytes are written.
    write_atomically(path, _sorted_header(save(ordered, metadata=meta.to_metadata())))
    return path


def _sorted_header(data: bytes) -> bytes:
    # safetensors writes the metadata map in hash order, which changes from run to run.
    # Sorting only reorders the JSON header: same length, same data offsets.
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= size, "a reordered header cannot grow"
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size :]


def read_branch(
    path: Path, config: TrunkConfig, head: HeadSpec | None = None
) -> tuple[BranchMeta, dict[str, torch.Tensor]]:
    """Read and check a branch file against a trunk config and (optionally) a head spec.

    Returns:
        The metadata and the tensors.

    Raises:
        InvalidWeights: a missing or unreadable file, bad metadata, a fork deeper than the
            trunk, a head that differs from ``head``, a missing, unexpected or misshapen
            tensor, or NaN/Inf values. The message names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidWeights(f"weights file {path} not found: train the task or fix its path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidWeights(
            f"{path} is not a readable safetensors file ({reason}): write it again"
        ) from None
    try:
        meta = BranchMeta.from_metadata(metadata)
    except InvalidWeights as exc:
        raise InvalidWeights(f"{path}: {exc}") from None
    if meta.fork_depth > config.num_hidden_layers:
        raise InvalidWeights(
            f"{path} forks at depth {meta.fork_depth} but the trunk has "
            f"{config.num_hidden_layers} layers"
        )
    if head is not None and head != meta.head:
        raise InvalidWeights(
            f"{path} has a {meta.head.kind} head with labels {list(meta.head.labels)}, the "
            f"plugin declares {head.kind} with label list {list(head.labels)}: make them agree"
        )
    expected = branch_shapes(config, meta.num_layers, meta.head, meta.fork_depth)
    problem = check_shapes(tensors, expected, "branch")
    if problem:
        raise InvalidWeights(f"{path}: {problem}")
    return meta, tensors


def check_against_entry(
    path: Path, meta: BranchMeta, entry: TaskEntry, config: TrunkConfig
) -> None:
    """Check that branch file ``path`` (metadata ``meta``) is what manifest ``entry`` says
    it is, on the trunk of ``config``: the manifest is what loading builds the network
    from, so an edited label list or fork depth must not pass for the branch's own.

    Raises:
        Damaged: the first field where they disagree (task, version, fork depth, branch
            layers, head kind, labels, max length, trunk architecture), naming the file.
    """
    fields = (
        ("task", meta.task, entry.name),
        ("version", meta.task_version, entry.version),
        ("fork depth", meta.fork_depth, entry.fork_depth),
        ("branch layers", meta.num_layers, entry.num_layers),
        ("head kind", meta.head.kind, entry.head.kind),
        ("labels", list(meta.head.labels), list(entry.head.labels)),
        ("max length", meta.max_length, entry.max_length),
        ("trunk config hash", meta.trunk_prefix.get("config"), config.architecture_hash()),
    )
    for name, own, listed in fields:
        if own != listed:
            raise Damaged(
                f"{path} says {name} {own!r} but the manifest says {listed!r}: the manifest "
                f"or the file was edited; {REPAIR_HINT}"
            )
