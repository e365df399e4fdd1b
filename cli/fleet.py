"""``mtreg onboard A B C`` and ``mtreg onboard --all``, one after another or on Ray
(``--engine ray``): a line per task as it finishes, and a non-zero exit if any failed.
Thin over :mod:`mtreg.training.fleet`, which is imported inside (it loads torch)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mtreg.cli.output import echo_json
from mtreg.errors import MtregError

if TYPE_CHECKING:
    from mtreg.cli.context import Context
    from mtreg.training.fleet import Outcome
    from mtreg.training.settings import Settings


def onboard_fleet(
    ctx: Context,
    tasks: Sequence[str],
    every: bool,
    settings: Settings,
    *,
    engine: str,
    address: str | None,
    cpus: float,
    data_dir: Path | None,
    promote: bool,
    as_json: bool,
    out: Path | None = None,
    teacher: str | None = None,
) -> None:
    """Onboard ``tasks`` (or, with ``every``, the tasks
    :func:`~mtreg.training.fleet.pending_tasks` names) and print each outcome as it
    comes, then a summary (or one JSON object with ``as_json``).

    Raises:
        click.UsageError: task names and ``every`` together; ``out`` or ``teacher``, which
            belong to a single task's onboarding.
        MtregError: see :func:`~mtreg.training.fleet.onboard_many`; and, after every task
            has ended, one line naming the tasks that failed.
    """
    from mtreg.cli.progress import Renderer
    from mtreg.training.fleet import onboard_many

    if out is not None or teacher is not None:
        raise click.UsageError("--out and --teacher take a single task, without --engine")
    names = _selected(ctx, tasks, every)
    if not names:
        return
    stdout = sys.stdout  # the engine may send its own lines to stderr meanwhile

    def hear(outcome: Outcome) -> None:
        if not as_json:
            click.echo(outcome.line(), file=stdout)

    with Renderer(sys.stderr) as progress:
        outcomes = onboard_many(
            ctx.registry,
            names,
            settings,
            engine=engine,
            address=address,
            cpus_per_task=cpus,
            data_dir=data_dir,
            promote=promote,
            progress=progress,
            on_outcome=hear,
        )
    if as_json:
        echo_json({"engine": engine, "tasks": [o.to_dict() for o in outcomes]})
    failed = [o.task for o in outcomes if not o.ok]
    if failed:
        raise MtregError(f"{len(failed)} of {len(outcomes)} tasks failed: {', '.join(failed)}")
    if not as_json:
        click.echo(f"{len(outcomes)} tasks onboarded ({engine})")


def _selected(ctx: Context, tasks: Sequence[str], every: bool) -> list[str]:
    """Return the tasks named, or with ``every`` those --all takes (saying on stderr which
    it leaves out for want of their trunk, and on stdout when there is nothing to do)."""
    from mtreg.training.fleet import pending_tasks

    if every and tasks:
        raise click.UsageError("give task names or --all, not both")
    if not every:
        return list(tasks)
    pending = pending_tasks(ctx.registry)
    if pending.no_trunk:
        left_out = ", ".join(pending.no_trunk)
        click.echo(f"skipped (their trunk is not registered): {left_out}", err=True)
    if not pending.tasks:
        click.echo("nothing to onboard: every task with data is registered at its version")
    return pending.tasks
