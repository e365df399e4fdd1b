"""Running one micro-batch of rows that ask for different tasks.

Rows are grouped as :meth:`LoadedBundle.logits` groups tasks: tasks that read their input
the same way (one text or a pair, tagged words or not, same max length) share one
tokenisation and one trunk pass. Within a group the trunk runs once over every row that
needs any of its tasks, up to the deepest fork among the tasks asked, and each branch runs
only on the rows that asked for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mtreg.nn.network import MultiTaskModel

# Reusing task_result keeps `mtreg serve` and `mtreg predict` answers identical.
from mtreg.runtime.bundle import LoadedBundle, task_result
from mtreg.serving.plan import Row

GroupKey = tuple[tuple[str, ...], bool, int]


def group_tasks(bundle: LoadedBundle, names: Sequence[str]) -> dict[GroupKey, list[str]]:
    """Return the tasks ``names`` grouped by how they read their input, each group sorted."""
    groups: dict[GroupKey, list[str]] = {}
    for name in sorted(set(names)):
        info = bundle.info[name]
        key = (info.inputs, info.head.kind == "tagging", info.max_length)
        groups.setdefault(key, []).append(name)
    return groups


def _torch_logits(
    model: MultiTaskModel, batch: Any, names: list[str], wanted: list[tuple[str, ...]]
) -> dict[str, torch.Tensor]:
    """Trunk once for the whole group, then each branch on the rows that asked for it.

    Returns ``{task: logits}`` with one row per group row (rows that did not ask hold 0).
    """
    mask = batch["attention_mask"]
    depths = {model.fork_depths[name] for name in names}
    hidden = model.trunk(batch["input_ids"], mask, batch.get("token_type_ids"), depths=depths)
    out = {}
    for name in names:
        state = hidden[model.fork_depths[name]]
        rows = [i for i, tasks in enumerate(wanted) if name in tasks]
        if len(rows) == len(wanted):
            out[name] = model.branches[name](state, mask)
            continue
        index = torch.tensor(rows)
        some = model.branches[name](state.index_select(0, index), mask.index_select(0, index))
        full = some.new_zeros((len(wanted), *some.shape[1:]))
        full[index] = some
        out[name] = full
    return out


@torch.inference_mode()
def run_rows(bundle: LoadedBundle, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Return, per row, ``{task: result}`` for the tasks that row asked for.

    Raises:
        Whatever the tokeniser or model raises; rows are checked by ``plan_rows`` first,
        so this is a bug, not a bad request.
    """
    results: list[dict[str, Any]] = [{} for _ in rows]
    names = {name for row in rows for name in row.tasks}
    for group in group_tasks(bundle, names).values():
        members = [i for i, row in enumerate(rows) if any(t in row.tasks for t in group)]
        encoded = bundle.encode([rows[i].item for i in members], bundle.info[group[0]])
        batch = encoded["batch"]
        wanted = [rows[i].tasks for i in members]
        if isinstance(bundle.model, MultiTaskModel):
            logits = _torch_logits(bundle.model, batch, group, wanted)
        else:  # ONNX: one graph, every output of the group on every row of the group
            logits = bundle.model(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), group
            )
        for position, i in enumerate(members):
            for name in group:
                if name in rows[i].tasks:
                    info = bundle.info[name]
                    value = logits[name][position]
                    results[i][name] = task_result(info, value, encoded, position, rows[i].logits)
    # Tasks in sorted order in every answer, whatever order the groups ran in.
    return [dict(sorted(r.items())) for r in results]
