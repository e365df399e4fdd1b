"""Checking a predict request against the served bundle, before it is queued, and routing
each of its rows to a version of each task asked.

Everything a client can get wrong is found here, on the event loop, so that a batch in the
inference thread never fails because of one bad request: unknown tasks, an input a task
cannot read (a pair for a one-text task, a missing field), empty or oversized texts, a pin
to a version the bundle does not serve.

Routing (a task with a release, :mod:`mtreg.artifacts.release`): a pinned version answers;
else a shadow release runs the candidate beside the stable version, which answers; else a
canary sends ``percent`` of the rows to the candidate, by a stable hash of the routing key
(the input's ``key_field``, else the request's ``key``) when there is one, at random when
not. :func:`answers` turns the branches' results back into one answer per task.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from mtreg.artifacts.manifest import TaskEntry
from mtreg.artifacts.release import Release, candidate_key
from mtreg.core.text import text_problem
from mtreg.errors import NotFound
from mtreg.runtime.bundle import LoadedBundle, input_fields
from mtreg.runtime.inference import Input, Row
from mtreg.serving.metrics import ServeMetrics

# What an answer decides, per head kind's result; scores may differ and still agree.
DECISIONS = ("label", "labels", "spans")
# Regression answers agree within this (relative, and absolute near zero).
VALUE_TOLERANCE = 0.05


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
    versions: Mapping[str, str] | None = None,
    key: str | None = None,
) -> list[Row]:
    """Return one Row per input: the item and the branches to run on it (a task's name for
    its stable version, ``candidate_key(task)`` for its candidate; see the module docstring).

    Without ``tasks``, each input gets every task that can read it (one-text tasks for a
    text, pair tasks for a pair, for a mapping every task whose fields it holds).
    ``versions`` pins tasks to a version (task -> version); ``key`` is the routing key of a
    sticky split for inputs without the release's key field.

    Raises:
        BadRequest: an unknown task, an input some asked task cannot read, an input no
            task can read, a bad text, or a pin to a version the bundle does not serve.
    """
    pins = _pins(bundle, versions or {}, tasks)
    return [
        Row(row.item, _route(bundle, row, pins, key), logits)
        for row in _task_rows(bundle, inputs, tasks, max_chars, pins)
    ]


def _pins(
    bundle: LoadedBundle, versions: Mapping[str, str], tasks: Sequence[str] | None
) -> dict[str, str]:
    """Return task -> the branch its pinned version runs on (see ``LoadedBundle.branch``)."""
    pins = {}
    for task, version in versions.items():
        if tasks is not None and task not in tasks:
            raise BadRequest(f"versions pins task {task!r}, which the request does not ask for")
        try:
            pins[task] = bundle.branch(task, version)
        except NotFound as exc:
            raise BadRequest(str(exc)) from None
    return pins


def _route(
    bundle: LoadedBundle, row: Row, pins: Mapping[str, str], key: str | None
) -> tuple[str, ...]:
    branches: list[str] = []
    for task in row.tasks:
        release = bundle.releases.get(task)
        if task in pins or release is None:
            branches.append(pins.get(task, task))
        elif release.mode == "shadow":
            branches += [task, candidate_key(task)]
        else:
            canary = in_canary(release, _routing_key(row.item, release, key))
            branches.append(candidate_key(task) if canary else task)
    return tuple(branches)


def _routing_key(item: Input, release: Release, key: str | None) -> str | None:
    field = release.key_field
    if field is not None and isinstance(item, Mapping) and isinstance(item.get(field), str):
        return item[field]
    return key


def in_canary(release: Release, key: str | None) -> bool:
    """True when a row with routing ``key`` goes to ``release``'s candidate.

    With a key, the choice is a stable hash of the task and the key, so the same key always
    gets the same version (and raising the percent only moves keys to the candidate);
    without one it is drawn at random.
    """
    if release.percent <= 0:
        return False
    if key is None:
        return random.random() * 100 < release.percent
    digest = hashlib.sha256(f"{release.task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < release.percent


def _task_rows(
    bundle: LoadedBundle,
    inputs: Sequence[Any],
    tasks: Sequence[str] | None,
    max_chars: int,
    pins: Mapping[str, str],
) -> list[Row]:
    """Return one Row per input naming the tasks asked of it (checked as ``plan_rows``)."""
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
            chosen = asked
        for name in chosen:
            # A pinned candidate may read other fields than the stable version.
            info = bundle.branches[pins.get(name, name)]
            if input_fields(item, info) is None:
                raise BadRequest(f"inputs[{index}]: task {name!r} reads {_describe(info)}")
        rows.append(Row(item, chosen))
    return rows


def answers(
    bundle: LoadedBundle,
    results: Sequence[dict[str, Any]],
    metrics: ServeMetrics | None = None,
    seconds: float | None = None,
) -> list[dict[str, Any]]:
    """Return one answer per row, ``{task: result}``, from what ``bundle.run(rows)`` returned
    for rows :func:`plan_rows` planned (keyed by branch): a candidate's result answers under
    its task's name; a shadow candidate's is compared with the stable one and dropped. A task
    with a release names the ``version`` that answered.

    With ``metrics``, each shadow row's agreement is counted and, with ``seconds`` (the
    request's time from queueing to answer, which waited for it), each shadow version's
    latency observed once per request, beside what the answering versions record.
    """
    out, shadows = [], set()
    for result in results:
        answer = {}
        for branch, value in result.items():
            entry = bundle.branches[branch]
            task = entry.name
            if branch != task and task in result:
                shadows.add((task, entry.version))
                if metrics is not None:
                    agree = "true" if agrees(result[task], value) else "false"
                    metrics.shadow_rows.labels(task=task, version=entry.version, agree=agree).inc()
                continue
            answer[task] = {**value, "version": entry.version} if task in bundle.releases else value
        out.append(dict(sorted(answer.items())))
    if metrics is not None and seconds is not None:
        for task, version in sorted(shadows):
            metrics.task_seconds.labels(task=task, version=version).observe(seconds)
    return out


def agrees(stable: Mapping[str, Any], candidate: Mapping[str, Any]) -> bool:
    """True when two results of one task decide the same: the same label, labels or spans,
    or values within VALUE_TOLERANCE (regression)."""
    if "value" in stable:
        return math.isclose(
            stable["value"], candidate["value"], rel_tol=VALUE_TOLERANCE, abs_tol=VALUE_TOLERANCE
        )
    return all(stable.get(name) == candidate.get(name) for name in DECISIONS)
