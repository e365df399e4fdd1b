"""Checking a predict request against the served bundle, before it is queued.

Everything a client can get wrong is found here, on the event loop, so that a batch in the
inference thread never fails because of one bad request: unknown tasks, an input a task
cannot read (a pair for a one-text task, a missing field), empty or oversized texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtreg.artifacts.manifest import TaskEntry
from mtreg.core.text import text_problem
from mtreg.runtime.bundle import LoadedBundle, input_fields
from mtreg.runtime.inference import Input, Row


class BadRequest(Exception):
    """A request the bundle cannot answer; ``str(error)`` says why (HTTP 422)."""


def _describe(info: TaskEntry) -> str:
    return "one text" if len(info.inputs) == 1 else f"a pair of texts ({', '.join(info.inputs)})"


def _texts(item: Input) -> list[str]:
    if isinstance(item, str):
        return [item]
    if isinstance(item, Mapping):
        return list(item.values())
    return list(item)


def check_text(text: Any, where: str, max_chars: int) -> None:
    """Raise BadRequest unless ``text`` is a text :func:`mtreg.core.text.text_problem`
    accepts, of at most ``max_chars`` characters."""
    problem = text_problem(text)
    if problem is not None:
        raise BadRequest(f"{where}: {problem}")
    if len(text) > max_chars:
        raise BadRequest(f"{where}: text of {len(text)} characters, the limit is {max_chars}")


def plan_rows(
    bundle: LoadedBundle,
    inputs: Sequence[Any],
    tasks: Sequence[str] | None,
    max_chars: int,
    logits: bool = False,
) -> list[Row]:
    """Return one Row per input: the item and the tasks to run on it.

    Without ``tasks``, each input gets every task that can read it (one-text tasks for a
    text, pair tasks for a pair, for a mapping every task whose fields it holds).

    Raises:
        BadRequest: an unknown task, an input some asked task cannot read, an input no
            task can read, or a bad text.
    """
    if tasks is not None:
        unknown = [t for t in dict.fromkeys(tasks) if t not in bundle.info]
        if unknown:
            raise BadRequest(
                f"unknown task {unknown[0]!r}: this bundle serves {', '.join(bundle.tasks)}"
            )
        asked = tuple(sorted(set(tasks)))
    rows = []
    for index, raw in enumerate(inputs):
        item: Input = tuple(raw) if isinstance(raw, list) else raw
        for position, text in enumerate(_texts(item)):
            check_text(text, f"inputs[{index}][{position}]", max_chars)
        if tasks is None:
            chosen = tuple(t for t in bundle.tasks if input_fields(item, bundle.info[t]))
            if not chosen:
                raise BadRequest(f"inputs[{index}]: no task of this bundle reads this input")
        else:
            for name in asked:
                if input_fields(item, bundle.info[name]) is None:
                    info = bundle.info[name]
                    raise BadRequest(f"inputs[{index}]: task {name!r} reads {_describe(info)}")
            chosen = asked
        rows.append(Row(item, chosen, logits))
    return rows
