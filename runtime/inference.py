"""The one forward pass of a loaded bundle: rows that may each ask for different tasks.

Tasks that read their input the same way (one text or a pair, tagged words or not, same
max length) form a group: one tokenisation of every row that needs any of its tasks,
padded to the longest of them, then the group's rows run in sub-batches of similar token
length (each cut to its own longest row), the trunk once per sub-batch up to the deepest
fork among its tasks; each branch runs only on the rows that asked for it (the torch
backend; ONNX runs its graph's outputs on every row).
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
# What a forward pass costs besides its tokens, in tokens (Python and kernel launches per
# layer, small matrix products running below peak): the price of one more sub-batch when
# rows are split by length. A round guess: bench/serving.py times 0, 16, 64 and 256 side by
# side (bench/results/serving-limit.md).
BUCKET_OVERHEAD = 64
# The tokenised tensors a model takes, in the order it takes them.
TENSORS = ("input_ids", "attention_mask", "token_type_ids")


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
class Encoded:
    """One group's tokenised input, ready for its forward pass (:func:`encode_rows` makes
    it; the server does so on its tokeniser thread while the previous batch runs).

    Attributes:
        tasks: the group's tasks, sorted. members: the indices of the rows that asked for
            any of them, in order. encoded: what ``encode`` returned for those rows.
        wanted: task -> the positions among ``members`` of the rows that asked for it.
        buckets: positions among ``members``, split into the sub-batches that run
            together (:func:`length_buckets`).
    """

    tasks: list[str]
    members: list[int]
    encoded: dict[str, Any]
    wanted: dict[str, list[int]]
    buckets: list[list[int]]


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


def group_key(task: TaskEntry) -> GroupKey:
    """Return how ``task`` reads its input (fields, per token, max length): tasks with the
    same key share one tokenisation of a row."""
    return (task.inputs, task.head.per_token, task.max_length)


def group_tasks(info: Mapping[str, TaskEntry], names: Iterable[str]) -> dict[GroupKey, list[str]]:
    """Return the tasks ``names`` grouped by how they read their input, groups in order of
    their first task, each group sorted."""
    groups: dict[GroupKey, list[str]] = {}
    for name in sorted(set(names)):
        groups.setdefault(group_key(info[name]), []).append(name)
    return groups


def encode_rows(bundle: Runnable, rows: Sequence[Row], buckets: bool = True) -> list[Encoded]:
    """Return the tokenised input of each group of the tasks ``rows`` ask for, padded to
    the longest input of the group (never to ``max_length``), its rows split into
    sub-batches of similar token length (with ``buckets``; else one sub-batch).

    Raises:
        MtregError: an input a task it asks cannot read (from ``encode``).
    """
    names = {name for row in rows for name in row.tasks}
    out = []
    for tasks in group_tasks(bundle.branches, names).values():
        members = [i for i, row in enumerate(rows) if any(t in row.tasks for t in tasks)]
        encoded = bundle.encode([rows[i].item for i in members], bundle.branches[tasks[0]])
        wanted = {
            name: [at for at, i in enumerate(members) if name in rows[i].tasks] for name in tasks
        }
        lengths = encoded["batch"]["attention_mask"].sum(1).tolist()
        split = length_buckets(lengths) if buckets else [list(range(len(lengths)))]
        out.append(Encoded(tasks, members, encoded, wanted, split))
    return out


def forward_groups(
    bundle: Runnable,
    rows: Sequence[Row],
    timings: MutableMapping[str, float] | None = None,
    encoded: Sequence[Encoded] | None = None,
) -> Iterator[Group]:
    """Yield the forward pass of each group of the tasks ``rows`` ask for, its rows run in
    sub-batches of similar length (:func:`length_buckets`); with ``timings``, store each
    branch's compute time in seconds under its name (torch backend only: an ONNX graph
    runs its branches as one call, so they cannot be timed apart). ``encoded``: what
    :func:`encode_rows` returned for ``rows``, when they were tokenised already.

    Raises:
        MtregError: an input a task it asks cannot read (from ``encode``).
    """
    for prepared in encode_rows(bundle, rows) if encoded is None else encoded:
        logits = _bucketed(bundle.model, prepared, timings)
        yield Group(prepared.tasks, prepared.members, prepared.encoded, logits)


def length_buckets(lengths: Sequence[int], overhead: int = BUCKET_OVERHEAD) -> list[list[int]]:
    """Split rows of token ``lengths`` into sub-batches of similar length.

    Each sub-batch is padded to its longest row, and a forward pass costs about
    ``overhead`` tokens besides its padded tokens, so the split minimises the sum over
    sub-batches of ``overhead + rows * longest`` (dynamic programming over the rows sorted
    by length, cut only where the length changes).

    Returns:
        The sub-batches (row indices, each sorted by length), shortest first.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    count = len(order)
    ends = [e for e in range(1, count) if lengths[order[e]] != lengths[order[e - 1]]]
    ends += [count] if count else []
    best = {0: (0, 0)}  # rows taken -> (least cost, where its last sub-batch starts)
    for end in ends:
        longest = lengths[order[end - 1]]
        best[end] = min(
            (cost + overhead + (end - start) * longest, start) for start, (cost, _) in best.items()
        )
    buckets: list[list[int]] = []
    end = count
    while end:
        start = best[end][1]
        buckets.append(order[start:end])
        end = start
    return buckets[::-1]


def _bucketed(
    model: Callable[..., dict[str, torch.Tensor]],
    prepared: Encoded,
    timings: MutableMapping[str, float] | None,
) -> dict[str, torch.Tensor]:
    """Run one group's rows through ``model`` in length buckets; return task -> logits
    with one row per member, in the members' order, as one call on the whole batch would."""
    batch = prepared.encoded["batch"]
    mask = batch["attention_mask"]
    per_token = "words" in prepared.encoded  # encode adds the words for per-token heads
    out: dict[str, torch.Tensor] = {}
    for bucket in prepared.buckets:
        rows = torch.tensor(bucket, dtype=torch.long)
        # The columns some row of the bucket uses (its padding to the group's longest is cut).
        columns = mask.index_select(0, rows).any(0).nonzero().squeeze(1)
        where = {row: at for at, row in enumerate(bucket)}
        wanted = {t: [where[r] for r in rs if r in where] for t, rs in prepared.wanted.items()}
        tasks = [task for task in prepared.tasks if wanted[task]]
        spent: dict[str, float] = {}
        logits = model(
            *(_cut(batch.get(key), rows, columns) for key in TENSORS),
            tasks=tasks,
            rows=wanted,
            timings=spent if timings is not None else None,
        )
        for task in tasks:
            if timings is not None and task in spent:
                timings[task] = timings.get(task, 0.0) + spent[task]
            part = logits[task]
            if task not in out:
                lead = tuple(mask.shape) if per_token else (mask.shape[0],)
                out[task] = part.new_zeros((*lead, *part.shape[len(lead) :]))
            if per_token:
                out[task][rows.unsqueeze(1), columns.unsqueeze(0)] = part
            else:
                out[task][rows] = part
    return out


def _cut(
    tensor: torch.Tensor | None, rows: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor | None:
    """Return ``tensor``'s ``rows``, keeping only ``columns`` (None stays None)."""
    if tensor is None:
        return None
    return tensor.index_select(0, rows).index_select(1, columns)
