"""``mtreg verify [--remote] [--repair] [--json]``: check every object, bundle and cached
ONNX export against its hashes (the library side is :mod:`mtreg.registry.integrity`)."""

from __future__ import annotations

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import echo_json, echo_table, json_option, short
from mtreg.errors import MtregError


@click.command("verify")
@click.option(
    "--repair",
    is_flag=True,
    help="Restore damaged objects from a good source, rebuild damaged bundle directories "
    "and drop damaged ONNX exports (serving makes them again).",
)
@click.option(
    "--remote",
    is_flag=True,
    help="Also hash the remote store's copy of every object and bundle manifest the "
    "registry uses (a download of them all); with --repair, replace a missing or damaged "
    "one by a good local copy.",
)
@json_option
@pass_context
def verify(ctx: Context, repair: bool, remote: bool, as_json: bool) -> None:
    """Check that every object, bundle and ONNX export is intact; exit 1 if not."""
    report = ctx.registry.verify(repair=repair, remote=remote)
    checked = report.checked
    if as_json:
        echo_json(report.to_dict())
    else:
        echo_table(
            [
                [
                    f.kind,
                    short(f.name) if f.kind != "onnx" else f.name,
                    "repaired" if f.repaired else "DAMAGED",
                    f.problem,
                    f.todo,
                ]
                for f in report.findings
            ],
            ["KIND", "NAME", "STATE", "PROBLEM", "TO DO"],
            "",
        )
        in_store = f"{checked.remote} item(s) in the store, " if remote else ""
        click.echo(
            f"checked {in_store}{checked.objects} object(s), {checked.bundles} bundle(s), "
            f"{checked.onnx} ONNX export(s): "
            + ("intact" if report.ok else f"{len(report.damaged)} damaged")
        )
    if not report.ok:
        again = "mtreg verify --remote --repair" if remote else "mtreg verify --repair"
        hint = "see TO DO above" if repair else f"run `{again}`"
        raise MtregError(f"{len(report.damaged)} damaged item(s) in the registry: {hint}")


COMMANDS = [verify]
