"""Task commands: ``register``, ``list``, ``show``, ``versions``, ``remove``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import echo_fields, echo_json, echo_table, json_option, listing, short

if TYPE_CHECKING:
    from mtreg.registry.outcomes import Changes

dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Say what would happen; write nothing."
)


def echo_changes(changes: Changes, dry_run: bool, as_json: bool) -> None:
    """Print what a write command did (or, with ``dry_run``, would do)."""
    if as_json:
        echo_json({**changes.to_dict(), "dry_run": dry_run})
        return
    prefix = "would be " if dry_run else ""
    for r in changes.tasks:
        was = f" (was {r.previous})" if r.previous and r.previous != r.version else ""
        click.echo(f"{r.task} {r.version}: {prefix}{r.change}{was}")
    for refusal in changes.refused:
        click.echo(f"{refusal.task}: refused: {refusal.reason}")
    for skip in changes.skipped:
        click.echo(f"{skip.task}: skipped: {skip.reason}")
    for bundle in changes.bundles:
        aliases = f" ({', '.join(bundle.aliases)})" if bundle.aliases else ""
        click.echo(f"bundle {short(bundle.id)}{aliases}: {len(bundle.members)} task(s)")


@click.command("register")
@click.argument("tasks", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Register every task the plugins offer.")
@click.option("--promote", is_flag=True, help="Also point the 'serving' alias at the new bundle.")
@dry_run_option
@json_option
@pass_context
def register(
    ctx: Context, tasks: tuple[str, ...], all_: bool, promote: bool, dry_run: bool, as_json: bool
) -> None:
    """Register the plugins' current versions of TASKS (all or nothing), then rebuild."""
    if all_ and tasks:
        raise click.UsageError("name tasks or pass --all, not both")
    changes = ctx.registry.register(tasks, all=all_, dry_run=dry_run, promote=promote)
    echo_changes(changes, dry_run, as_json)


@click.command("sync")
@click.option("--promote", is_flag=True, help="Also point the 'serving' alias at the new bundle.")
@dry_run_option
@json_option
@pass_context
def sync(ctx: Context, promote: bool, dry_run: bool, as_json: bool) -> None:
    """Register every new or upgraded task the plugins offer and rebuild once.

    A refused task is reported and does not stop the others; the exit code is 1 if any
    task was refused.
    """
    changes = ctx.registry.sync(dry_run=dry_run, promote=promote)
    echo_changes(changes, dry_run, as_json)
    if changes.refused:
        click.get_current_context().exit(1)


@click.command("rollback")
@click.argument("name")
@click.option("--to", "version", required=True, help="The registered version to re-activate.")
@dry_run_option
@json_option
@pass_context
def rollback(ctx: Context, name: str, version: str, dry_run: bool, as_json: bool) -> None:
    """Re-activate an earlier registered VERSION of task NAME and rebuild."""
    echo_changes(ctx.registry.rollback(name, version, dry_run=dry_run), dry_run, as_json)


@click.command("list")
@click.option("--all", "all_", is_flag=True, help="Include removed tasks.")
@json_option
@pass_context
def list_(ctx: Context, all_: bool, as_json: bool) -> None:
    """List registered tasks and their active versions."""
    listing(
        as_json,
        ctx.registry.tasks(include_removed=all_),
        ["TASK", "ACTIVE", "LATEST", "TRUNK", "STATUS", "DESCRIPTION"],
        lambda t: [
            t.name,
            t.active_version or "-",
            t.latest_version,
            t.trunk,
            t.status,
            t.description,
        ],
        "no tasks registered: `mtreg plugins` lists what plugins offer, "
        "`mtreg register --all` registers them",
    )


@click.command("show")
@click.argument("name")
@json_option
@pass_context
def show(ctx: Context, name: str, as_json: bool) -> None:
    """Show task NAME and its active version."""
    registry = ctx.registry
    task = registry.task(name)
    versions = registry.versions(name)
    shown = next((v for v in versions if v.version == task.active_version), versions[-1])
    if as_json:
        echo_json({**task.to_dict(), "version": shown.to_dict()})
        return
    metrics = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in sorted(shown.metrics.items())
    )
    echo_fields(
        [
            ("task", task.name),
            ("status", task.status),
            ("description", task.description),
            ("active version", task.active_version or "-"),
            ("latest version", task.latest_version),
            ("trunk", task.trunk),
            (f"version {shown.version}", ""),
            ("  head", f"{shown.head_kind}, {len(shown.labels)} label(s)"),
            *_label_fields(shown.labels),
            ("  inputs", ", ".join(shown.inputs)),
            ("  fork depth", shown.fork_depth),
            ("  branch layers", shown.num_layers),
            ("  max length", shown.max_length),
            ("  metrics", metrics or "-"),
            ("  weights sha256", shown.weights_sha256),
            ("  plugin", f"{shown.plugin} {shown.plugin_version}".strip()),
            ("  registered", shown.created_at),
        ]
    )


def _label_fields(labels: list[str]) -> list[tuple[str, str]]:
    """Return the ``labels`` field rows of ``show``: one label per row (a label may hold a
    comma or a space, so a joined list could not be read back), ``-`` for none."""
    names = labels or ["-"]
    return [("  labels" if i == 0 else "", label) for i, label in enumerate(names)]


@click.command("versions")
@click.argument("name")
@json_option
@pass_context
def versions(ctx: Context, name: str, as_json: bool) -> None:
    """List every registered version of task NAME, oldest first."""
    registry = ctx.registry
    active = registry.task(name).active_version
    records = registry.versions(name)
    if as_json:
        echo_json([{**v.to_dict(), "active": v.version == active} for v in records])
        return
    echo_table(
        [
            [
                "*" if v.version == active else "",
                v.version,
                v.fork_depth,
                v.num_layers,
                short(v.weights_sha256),
                v.created_at,
            ]
            for v in records
        ],
        ["", "VERSION", "DEPTH", "LAYERS", "SHA256", "REGISTERED"],
        f"task {name} has no versions",
    )


@click.command("remove")
@click.argument("name")
@dry_run_option
@json_option
@pass_context
def remove(ctx: Context, name: str, dry_run: bool, as_json: bool) -> None:
    """Deactivate task NAME and rebuild (its history stays; roll back to re-activate)."""
    echo_changes(ctx.registry.remove(name, dry_run=dry_run), dry_run, as_json)


COMMANDS = [register, sync, rollback, list_, show, versions, remove]
