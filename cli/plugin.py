"""``mtreg plugins``: what loaded, from where, and what failed."""

from __future__ import annotations

import logging

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import echo_json, echo_table, json_option
from mtreg.core.text import printable


@click.command("plugins")
@json_option
@pass_context
def plugins(ctx: Context, as_json: bool) -> None:
    """List task plugins (installed and from plugin paths), their tasks and errors."""
    # The table prints every discovery warning itself, and the probe also logs its own (for
    # the commands that print none): shown once, here.
    probe_log = logging.getLogger("mtreg.plugins.probe")
    probe_log.disabled = not as_json
    try:
        discovery = ctx.registry.discover()
    finally:
        probe_log.disabled = False
    if as_json:
        echo_json(discovery.to_dict())
        return
    echo_table(
        [
            [
                p.name,
                p.version or "",
                ", ".join(p.tasks) or "-",
                f"ERROR {p.error}" if p.error else "ok",
                p.where,
            ]
            for p in discovery.plugins
        ],
        ["PLUGIN", "VERSION", "TASKS", "STATUS", "WHERE"],
        "no plugins found: install one, or pass --plugins-dir / set MTREG_PLUGINS_PATH",
    )
    for message in (*discovery.conflicts, *discovery.warnings):
        click.echo(f"warning: {printable(message)}", err=True)


COMMANDS = [plugins]
