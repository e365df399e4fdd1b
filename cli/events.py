"""``mtreg events``: the registry's audit log, newest first.

Every change (a task registered, upgraded, rolled back or removed, a trunk added, a bundle
built, an alias moved, a garbage collection) is logged in the transaction that makes it
(``Registry.events``); this command shows the log as a table or as JSON.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import aware, echo_json, echo_table, json_option

if TYPE_CHECKING:
    from mtreg.registry.records import EventRecord

DEFAULT_LIMIT = 50
EMPTY = "no events yet: nothing has changed since `mtreg init`"


def detail_text(detail: dict[str, Any]) -> str:
    """Return an event's detail as ``key=value`` pairs, values as compact JSON (a string
    unquoted), e.g. ``version=1.1.0 previous=1.0.0``."""
    return " ".join(
        f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
        for key, value in sorted(detail.items())
    )


def event_dict(event: EventRecord) -> dict[str, Any]:
    """Return ``event`` as JSON-ready data, its time in ISO 8601 with its time zone."""
    return {**event.to_dict(), "at": aware(event.at).isoformat()}


@click.command("events")
@click.option("--task", "task", metavar="TASK", help="Only the events about task TASK.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="Show at most this many events (the newest).",
)
@json_option
@pass_context
def events(ctx: Context, task: str | None, limit: int, as_json: bool) -> None:
    """Show the audit log: what changed in the registry, when and by whom, newest first."""
    registry = ctx.registry
    if task is not None:
        registry.task(task)  # an unknown name is an error, not an empty log
    records = registry.events(limit=limit, subject=task)
    if as_json:
        echo_json([event_dict(e) for e in records])
        return
    echo_table(
        [[e.id, e.at, e.kind, e.subject, e.actor, detail_text(e.detail)] for e in records],
        ["ID", "AT", "KIND", "SUBJECT", "BY", "DETAIL"],
        f"no events about task {task}" if task else EMPTY,
    )


COMMANDS = [events]
