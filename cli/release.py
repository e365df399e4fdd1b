"""Release commands: ``release`` (canary, shadow, promote, roll back) and ``releases``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import echo_json, echo_table, json_option, short
from mtreg.cli.task import dry_run_option
from mtreg.errors import MtregError

if TYPE_CHECKING:
    from mtreg.registry.releases import ReleaseOutcome


def _percent(text: str | None) -> float | None:
    # Parsed here rather than by click, so that a bad value is a one-line error (exit 1).
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise MtregError(f"canary percent must be a number in 0..100, got {text!r}") from None


def _describe(outcome: ReleaseOutcome) -> str:
    """One line saying what a release command did (or would do)."""
    task, done = outcome.task, "would " if outcome.dry_run else ""
    if outcome.action == "promote":
        return f"{task}: {done}promote {outcome.stable} to stable (was {outcome.previous})"
    if outcome.action == "rollback" and outcome.ended:
        return f"{task}: {done}end the release of {outcome.ended}: {outcome.stable} answers"
    if outcome.action == "rollback":
        return f"{task}: {done}roll back: {outcome.stable} answers (was {outcome.previous})"
    if outcome.mode == "shadow":
        split = "shadow every request"
    else:
        sticky = f", sticky by {outcome.key_field}" if outcome.key_field else ""
        split = f"answer {outcome.percent:g}% of requests{sticky}"
    return f"{task}: {done}release {outcome.candidate} to {split}; {outcome.stable} is stable"


@click.command("release")
@click.argument("task")
@click.argument("version", required=False)
@click.option(
    "--canary",
    metavar="PERCENT",
    help="VERSION answers PERCENT (0..100) of the task's requests (0: only requests pinning it).",
)
@click.option(
    "--shadow", is_flag=True, help="VERSION runs beside the stable one on every request; "
    "the stable answers and their agreement is counted in /metrics.",
)  # fmt: skip
@click.option(
    "--key-field",
    metavar="FIELD",
    help="Make the canary split sticky by this input field (else by the request's key).",
)
@click.option("--promote", is_flag=True, help="Make the candidate the stable version.")
@click.option(
    "--rollback",
    is_flag=True,
    help="End the release (or undo the promotion just made): the stable version answers.",
)
@dry_run_option
@json_option
@pass_context
def release(
    ctx: Context,
    task: str,
    version: str | None,
    canary: str | None,
    shadow: bool,
    key_field: str | None,
    promote: bool,
    rollback: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Release VERSION of TASK beside its stable version, promote it, or roll it back.

    Only TASK's answers change; the bundle is rebuilt and the server reloads it.
    """
    outcome = ctx.registry.release(
        task,
        version,
        canary=_percent(canary),
        shadow=shadow,
        key_field=key_field,
        promote=promote,
        rollback=rollback,
        dry_run=dry_run,
    )
    if as_json:
        echo_json(outcome.to_dict())
        return
    click.echo(_describe(outcome))
    if outcome.bundle is not None:
        aliases = f" ({', '.join(outcome.bundle.aliases)})" if outcome.bundle.aliases else ""
        click.echo(f"bundle {short(outcome.bundle.id)}{aliases}")


@click.command("releases")
@click.argument("task", required=False)
@click.option("--limit", default=20, show_default=True, help="History events to show.")
@json_option
@pass_context
def releases(ctx: Context, task: str | None, limit: int, as_json: bool) -> None:
    """List the releases under way (of TASK, or all) and their history, newest first."""
    registry = ctx.registry
    current = registry.releases(task)
    history = registry.release_history(task, limit)
    if as_json:
        echo_json(
            {"releases": [r.to_dict() for r in current], "history": [e.to_dict() for e in history]}
        )
        return
    echo_table(
        [
            [
                r.task,
                r.candidate.version,
                r.mode,
                f"{r.percent:g}%" if r.mode == "canary" else "-",
                r.key_field or "-",
                f"inert: {r.inert}" if r.inert else "live",
            ]
            for r in current
        ],
        ["TASK", "CANDIDATE", "MODE", "SHARE", "KEY FIELD", "STATUS"],
        "no releases under way: `mtreg release TASK VERSION --canary 5` starts one",
    )
    click.echo()
    echo_table(
        [[e.at, e.kind.removeprefix("release."), e.subject, _event_versions(e.detail), e.actor]
         for e in history],
        ["AT", "ACTION", "TASK", "VERSIONS", "BY"],
        "no release history",
    )  # fmt: skip


def _event_versions(detail: dict) -> str:
    candidate = f", candidate {detail['candidate']}" if detail.get("candidate") else ""
    ended = f", ended {detail['ended']}" if detail.get("ended") else ""
    stable, previous = detail.get("stable"), detail.get("previous")
    was = f" (was {previous})" if previous != stable else ""
    return f"stable {stable}{was}{candidate}{ended}"


COMMANDS = [release, releases]
