"""``mtreg report``: quality against serving cost for registered tasks, from the registry.

Reads each task's active version (the dev metrics, teacher size and geometry its branch file
recorded) and, where known, a full fine-tuning reference: ``--baseline FILE.json``, else the
repository's bench/results/quality.json when it exists. On a terminal the report is a table
fitted to its width; into a pipe or a file it is markdown (``--out`` writes report.md too).
Thin layer over :mod:`mtreg.cli.reporting`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import echo_json, echo_table, json_option, terminal_width
from mtreg.core.extras import require
from mtreg.core.text import split_list

# Written by bench/quality.py; present in a source checkout (and an editable install).
BENCH_BASELINE = Path(__file__).resolve().parents[1] / "bench" / "results" / "quality.json"


def _task_names(values: tuple[str, ...]) -> list[str] | None:
    names = [name for value in values for name in split_list(value)]
    return names or None


@click.command("report")
@click.option(
    "--tasks",
    "tasks",
    multiple=True,
    metavar="A,B,...",
    help="Tasks to report (comma-separated or repeated) [default: every active task].",
)
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Full fine-tuning references (JSON) [default: bench/results/quality.json if present].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write report.md, report.json and report.png (the figure) here.",
)
@json_option
@pass_context
def report(
    ctx: Context, tasks: tuple[str, ...], baseline: Path | None, out: Path | None, as_json: bool
) -> None:
    """Quality of registered tasks against full fine-tuning, and their serving cost."""
    from mtreg.cli import reporting as rp

    source = baseline or (BENCH_BASELINE if BENCH_BASELINE.is_file() else None)
    references = rp.load_baseline(source) if source is not None else {}
    rows, layers = rp.rows_from_registry(ctx.registry, _task_names(tasks), references)
    overall = rp.summary(rows, layers)
    data = {
        "rows": [r.to_dict() for r in rows],
        "overall": overall,
        "baseline": str(source) if source else None,
    }
    text = rp.markdown(rows, overall)
    if out is not None:
        require("matplotlib")  # the figure's: checked before any file of OUT is written
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        (out / "report.md").write_text(text)
        rp.figure(rows, overall, out / "report.png", "mtreg report: quality vs serving cost")
    if as_json:
        echo_json(data)
        return
    if terminal_width() is None:
        click.echo(text.rstrip())
    else:
        # On a terminal a table reads better than markdown's pipes; a file keeps markdown.
        echo_table([rp.cells(r) for r in rows], [h.upper() for h in rp.HEADERS], "no tasks")
        click.echo("\n" + rp.overall_text(overall, strong=""))
    click.echo(f"\nreferences: {source or 'none (pass --baseline FILE.json)'}")
    if out is not None:
        click.echo(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")


COMMANDS = [report]
