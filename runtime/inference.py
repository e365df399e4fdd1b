"""The one forward pass of a loaded bundle: rows that may each ask for different tasks.

Tasks that read their input the same way (one text or a pair, tagged words or not, same
max length) form a group: one tokenisation and one trunk pass over every row that needs
any of its tasks, up to the deepest fork among them; each branch runs only on the rows
that asked for it (the torch backend; ONNX runs its graph's outputs on every row).
:meth:`mtreg.runtime.bundle.LoadedBundle.run` turns these logits into answers, and
``predict``, ``logits``, ``mtreg predict`` and the server all go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mtreg.artifacts.manifest import TaskEntry
from mtreg.errors import MtregError

# One input: a text, a (text, pair) sequence, or a mapping of the tasks' field names to texts.
Input = str | Sequence[str] | Mapping[str, str]
GroupKey = tuple[tuple[str, ...], bool, int]

MAX_BATCH_SIZE = 4096
# A word-piece token never covers more than the 100 characters of a word the tokenizer
# still splits (longer ones become one [UNK]) and its spaces, so a text cut at this many
# characters per token of max_length tokenises the same: a 10 MB line costs what 16 kB do.
CHARS_PER_TOKEN = 128


def cut_text(text: str, max_length: int) -> str:
    """Return ``text`` cut to what ``max_length`` tokens can cover (see CHARS_PER_TOKEN)."""
    return text[: max_length * CHARS_PER_TOKEN]


def check_batch_size(size: object) -> int:
    """Return ``size`` if it is a batch size in 1..MAX_BATCH_SIZE.

    Raises:
        MtregError: anything else (a bool, a float, zero, a negative or huge number).
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
        raise MtregError(f"batch size must be an integer in 1..{MAX_BATCH_SIZE}, got {size!r}")
    return size


@dataclass(frozen=True)
class Row:
    """One input and the tasks asked of it (``logits``: add the raw outputs): task names for
    their stable versions, or a release's candidate by its branch name (``LoadedBundle.branch``)."""

    item: Input
    tasks: tuple[str, ...]
    logits: bool = False


class Runnable(Protocol):
    """What a forward pass needs of a loaded bundle (:class:`LoadedBundle` is one):
    ``branches`` maps each name a :class:`Row` may ask for to its entry."""

    branches: Mapping[str, TaskEntry]
    model: Callable[..., dict[str, torch.Tensor]]

    def encode(self, inputs: Sequence[Input], info: TaskEntry) -> dict[str, Any]:
        """Return the tokenised ``inputs`` for a task (see :meth:`LoadedBundle.encode`)."""
        ...


@dataclass(frozen=True)
class Group:
    """One group's forward pass.

    Attributes:
        tasks: the group's tasks, sorted. members: the indices of the rows that asked for
            any of them, in order. encoded: what ``encode`` returned for those rows.
        logits: task -> logits with one row per member (members that did not ask hold
            zeros or, with ONNX, values nobody asked for).
    """

    tasks: list[str]
    members: list[int]
    encoded: dict[str, Any]
    logits: dict[str, torch.Tensor]


def group_tasks(info: Mapping[str, TaskEntry], names: Iterable[str]) -> dict[GroupKey, list[str]]:
    """Return the tasks ``names`` grouped by how they read their input, groups in order of
    their first task, each group sorted."""
    groups: dict[GroupKey, list[str]] = {}
    for name in sorted(set(names)):
        task = info[name]
        key = (task.inputs, task.head.per_token, task.max_length)
        groups.setdefault(key, []).append(name)
    return groups


def forward_groups(
    bundle: Runnable, rows: Sequence[Row], timings: MutableMapping[str, float] | None = None
) -> Iterator[Group]:
    """Yield the forward pass of each group of the tasks ``rows`` ask for; with ``timings``,
    store each branch's compute time in seconds under its name (torch backend only: an ONNX
    graph runs its branches as one call, so they cannot be timed apart).

    Raises:
        MtregError: an input a task it asks cannot read (from ``encode``).
    """
    names = {name for row in rows for name in row.tasks}
    for tasks in group_tasks(bundle.branches, names).values():
        members = [i for i, row in enumerate(rows) if any(t in row.tasks for t in tasks)]
        encoded = bundle.encode([rows[i].item for i in members], bundle.branches[tasks[0]])
        wanted = {
            name: [at for at, i in enumerate(members) if name in rows[i].tasks] for name in tasks
        }
        batch = encoded["batch"]
        logits = bundle.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            tasks=tasks,
            rows=wanted,
            timings=timings,
        )
        yield Group(tasks, members, encoded, logits)
