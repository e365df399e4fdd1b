"""Bundle commands: ``bundle list | show | diff | gate``, ``alias set | list``, ``gc``."""

from __future__ import annotations

import click

from mtreg.artifacts.manifest import MANIFEST
from mtreg.cli.context import Context, pass_context
from mtreg.cli.gate import gate
from mtreg.cli.output import echo_fields, echo_json, echo_table, json_option, listing, short
from mtreg.cli.task import dry_run_option


@click.group()
def bundle() -> None:
    """Inspect merged bundles, and gate their reduced-precision backends."""


bundle.add_command(gate)


@bundle.command("list")
@json_option
@pass_context
def list_(ctx: Context, as_json: bool) -> None:
    """List bundles, newest first, with their aliases."""
    listing(
        as_json,
        ctx.registry.bundles(),
        ["BUNDLE", "ALIASES", "TRUNK", "TASKS", "LAYERS", "CREATED"],
        lambda b: [
            short(b.id),
            ", ".join(b.aliases),
            b.trunk,
            len(b.members),
            b.manifest.cost.bundle_layers,
            b.created_at,
        ],
        "no bundles yet: registering a task builds one",
    )


@bundle.command("show")
@click.argument("ref", default="latest")
@json_option
@pass_context
def show(ctx: Context, ref: str, as_json: bool) -> None:
    """Show bundle REF (an alias, an id or an id prefix; default: latest)."""
    registry = ctx.registry
    record = registry.bundle(ref)
    path = registry.home.bundle(record.id)
    # Only what is on this machine is looked at: showing a bundle never reads the store.
    fetched = (path / MANIFEST).is_file()
    store = registry.objects.location
    if as_json:
        echo_json({**record.to_dict(), "path": str(path), "fetched": fetched, "store": store})
        return
    if fetched:
        where = str(path)
    elif registry.objects.remote is not None:
        where = f"not fetched on this machine (loading it, e.g. `mtreg predict`, writes {path})"
    else:
        where = f"missing from this machine ({path}): `mtreg verify --repair` rebuilds it"
    cost = record.manifest.cost
    echo_fields(
        [
            ("bundle", record.id),
            ("aliases", ", ".join(record.aliases) or "-"),
            ("trunk", f"{record.trunk} (cut at depth {record.manifest.trunk.depth})"),
            ("store", store),
            ("path", where),
            (
                "layer cost",
                f"{cost.bundle_layers} layers for all tasks, "
                f"{cost.one_model_per_task_layers} as one model per task",
            ),
            ("created", record.created_at),
        ]
    )
    echo_table(
        [
            [name, t.version, t.head.kind, t.fork_depth, t.num_layers]
            for name, t in record.manifest.tasks.items()
        ],
        ["TASK", "VERSION", "HEAD", "DEPTH", "LAYERS"],
        "(no tasks)",
    )


@bundle.command("diff")
@click.argument("a")
@click.argument("b")
@json_option
@pass_context
def diff(ctx: Context, a: str, b: str, as_json: bool) -> None:
    """Show which tasks and versions differ between bundles A and B."""
    changes = ctx.registry.diff(a, b)
    if as_json:
        echo_json(changes)
        return
    echo_table(
        [[task, v["a"] or "-", v["b"] or "-"] for task, v in changes.items()],
        ["TASK", a, b],
        "no differences",
    )


@click.group()
def alias() -> None:
    """Movable names for bundles ('latest' follows every rebuild)."""


@alias.command("set")
@click.argument("name")
@click.argument("ref")
@pass_context
def alias_set(ctx: Context, name: str, ref: str) -> None:
    """Point alias NAME at bundle REF (an alias, id or id prefix)."""
    record = ctx.registry.set_alias(name, ref)
    click.echo(f"{name} -> {record.id}")


@alias.command("list")
@json_option
@pass_context
def alias_list(ctx: Context, as_json: bool) -> None:
    """List aliases and the bundles they name."""
    pairs = sorted((a, b.id) for b in ctx.registry.bundles() for a in b.aliases)
    if as_json:
        echo_json(dict(pairs))
        return
    echo_table([list(p) for p in pairs], ["ALIAS", "BUNDLE"], "no aliases yet")


@click.command("gc")
@dry_run_option
@json_option
@pass_context
def gc(ctx: Context, dry_run: bool, as_json: bool) -> None:
    """Delete bundles no alias names and objects nothing refers to."""
    removed = ctx.registry.gc(dry_run=dry_run)
    if as_json:
        echo_json({**removed, "dry_run": dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(removed['bundles'])} bundle(s), {len(removed['objects'])} object(s)")


COMMANDS = [bundle, alias, gc]
