"""Training commands: ``train`` (teacher search), ``distill`` (students) and ``onboard``
(both, then choose, write and register). Thin layers over :mod:`mtreg.training.onboard`.

torch is imported inside the command bodies only, so that ``mtreg list`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.defaults import default_option, given
from mtreg.cli.output import echo_json, echo_table, json_option
from mtreg.core.env import DATA_DIR_ENV
from mtreg.errors import MtregError
from mtreg.training.settings import MAX_EPOCHS, PRECISIONS, Settings, parse_range

if TYPE_CHECKING:
    from mtreg.cli.progress import Renderer
    from mtreg.training.onboard import OnboardReport
    from mtreg.training.stages import Run


def _progress() -> Renderer:
    """Return the ``progress=`` to train with, a context: a :class:`Renderer` on stderr
    (on a terminal, lines above a bar that goes on the way out; in pipes and logs,
    timestamped lines)."""
    # rich is imported here, not at start-up: `mtreg list` must not pay for it.
    from mtreg.cli.progress import Renderer

    return Renderer(sys.stderr)


def _layers(layers: int | None, search: str | None, what: str) -> tuple[int, ...] | None:
    """Return the layer candidates from ``--layers N`` or ``--search LO..HI`` (or None)."""
    if layers is not None and search is not None:
        raise click.UsageError(f"give --layers or --search for the {what}, not both")
    if layers is not None:
        if layers < 1:
            raise MtregError("--layers must be at least 1")
        return (layers,)
    return parse_range(search) if search is not None else None


def _setting(*decls: str, **attrs: Any) -> Callable[[Any], Any]:
    """An option for a :class:`Settings` field: the dataclass holds its default."""
    return default_option(Settings, *decls, **attrs)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every training command shares."""
    options = [
        click.option(
            "--epochs",
            type=int,
            help=f"Most epochs per run [default: {MAX_EPOCHS}, stopped early on dev].",
        ),
        _setting("--batch-size", type=int),
        click.option("--max-length", type=int, help="Token limit [default: the task's]."),
        _setting("--seed", type=int),
        _setting(
            "--patience",
            type=int,
            help="Stop a run after this many epochs without a better dev score (0: never).",
        ),
        _setting(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            help="auto picks CUDA where present.",
        ),
        _setting(
            "--precision",
            type=click.Choice(PRECISIONS),
            help="bf16: mixed precision, about 2x faster on CPUs with AMX and recent GPUs.",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help=f"Data folder for the built-in plugins [env {DATA_DIR_ENV}].",
        ),
        json_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _settings(**values: Any) -> Settings:
    """Build Settings from CLI values: the ones given replace the dataclass defaults;
    ``--patience 0`` means never stop early."""
    fields = given(**values)
    if fields.get("patience") == 0:
        fields["patience"] = None
    return Settings(**fields)


def _run_rows(runs: Sequence[Run], metrics: Sequence[str], chosen: Run | None) -> list[list]:
    rows = []
    for run in runs:
        mark = "*" if chosen is not None and run.name == chosen.name else ""
        scores = [f"{run.dev_metrics.get(m, float('nan')):.4f}" for m in metrics]
        epochs = f"{run.best_epoch}/{run.epochs_run or run.epochs}"
        seconds = "resumed" if run.resumed else f"{run.seconds:.1f}"
        rows.append(
            [mark, run.stage, run.layers, run.fork_depth, f"{run.lr:g}", epochs, *scores, seconds]
        )
    return rows


def _echo_runs(runs: Sequence[Run], chosen: Run | None) -> None:
    metrics = list(runs[0].dev_metrics) if runs else []
    headers = ["", "stage", "layers", "depth", "lr", "best/epochs", *metrics, "seconds"]
    echo_table(_run_rows(runs, metrics, chosen), headers, "no runs")


@click.command("train")
@click.argument("task")
@click.option("--layers", type=int, help="Train a teacher of exactly L layers.")
@click.option("--search", metavar="LO..HI", help="Teacher layers to try [default: ~N/3..N/2].")
@_setting(
    "--lr",
    "lrs",
    field="teacher_lrs",
    type=float,
    multiple=True,
    help="Learning rate (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the best teacher here.",
)
@_common
@pass_context
def train(
    ctx: Context, task: str, layers: int | None, search: str | None, lrs, out, **opts
) -> None:
    """Partially fine-tune teachers for TASK: the trunk's top L layers, pooler and head."""
    from mtreg.training.onboard import train_teacher

    as_json, data_dir = opts.pop("as_json"), opts.pop("data_dir")
    settings = _settings(teacher_layers=_layers(layers, search, "teacher"), teacher_lrs=lrs, **opts)
    with _progress() as progress:
        result = train_teacher(
            ctx.registry, task, settings, data_dir=data_dir, out=out, progress=progress
        )
    if as_json:
        echo_json(
            {
                "runs": [r.to_dict() for r in result.runs],
                "best": result.best.to_dict(),
                "settings": result.settings,
                "out": str(out) if out else None,
            }
        )
        return
    _echo_runs(result.runs, result.best)
    click.echo(f"best teacher: {result.best.name} (next: `mtreg distill {task}`)")
    if out:
        click.echo(f"wrote {out}")


@click.command("distill")
@click.argument("task")
@click.option("--layers", type=int, help="Distil into a student of exactly l layers.")
@click.option("--search", metavar="LO..HI", help="Student layers to try [default: 1..min(3, L-1)].")
@_setting(
    "--lr",
    "lrs",
    field="student_lrs",
    type=float,
    multiple=True,
    help="Learning rate (repeatable).",
)
@_setting(
    "--tolerance",
    type=float,
    help="Keep the smallest student scoring at least this share of the teacher.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Branch file [default: the plugin's weights path, else MTREG_HOME/trained/].",
)
@_common
@pass_context
def distill(
    ctx: Context,
    task: str,
    layers: int | None,
    search: str | None,
    lrs,
    tolerance: float | None,
    out,
    **opts,
) -> None:
    """Distil TASK's trained teacher into a smaller student and write the branch file.

    Students are tried from the smallest up; the first one within the tolerance of the
    teacher ends the search.
    """
    from mtreg.training.onboard import distill_task

    as_json, data_dir = opts.pop("as_json"), opts.pop("data_dir")
    epochs = opts.pop("epochs")
    settings = _settings(
        student_layers=_layers(layers, search, "student"),
        student_lrs=lrs,
        student_epochs=epochs,
        tolerance=tolerance,
        **opts,
    )
    with _progress() as progress:
        result, picked, path = distill_task(
            ctx.registry, task, settings, data_dir=data_dir, out=out, progress=progress
        )
    if as_json:
        echo_json(
            {
                "runs": [r.to_dict() for r in result.runs],
                "chosen": picked.to_dict(),
                "settings": result.settings,
                "weights": str(path),
            }
        )
        return
    _echo_runs(result.runs, picked)
    click.echo(f"wrote {picked.name} to {path} (next: `mtreg register {task}`)")


@click.command("onboard")
@click.argument("tasks", nargs=-1, metavar="TASK...")
@_setting(
    "--tolerance",
    type=float,
    help="Keep the smallest branch scoring at least this share of the best teacher.",
)
@click.option("--layers", type=int, help="Teacher of exactly L layers (no L search).")
@click.option("--search", metavar="LO..HI", help="Teacher layers to try [default: ~N/3..N/2].")
@click.option(
    "--student-search", metavar="LO..HI", help="Student layers [default: 1..min(3, L-1)]."
)
@_setting(
    "--lr",
    "lrs",
    field="teacher_lrs",
    type=float,
    multiple=True,
    help="Teacher learning rate (repeatable to search).",
)
@_setting(
    "--student-lr",
    "student_lrs",
    type=float,
    multiple=True,
    help="Student learning rate (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Branch file [default: the plugin's weights path, else MTREG_HOME/trained/].",
)
@click.option("--promote", is_flag=True, help="Also point the 'serving' alias at the new bundle.")
@click.option(
    "--teacher",
    metavar="PATH_OR_HUB_ID",
    help="Distil this fine-tuned classifier (a transformers folder or Hub id, on the same "
    "trunk) instead of training teachers; students are searched at each depth N - L of "
    "--search.",
)
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Onboard every task a plugin offers with data whose version is not registered yet.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: one task after another here; ray: one Ray task per task, side by side.",
)
@click.option(
    "--address",
    metavar="HOST:PORT",
    help="With --engine ray: the cluster [default: $RAY_ADDRESS, else a Ray started here].",
)
@click.option(
    "--cpus-per-task",
    type=float,
    default=1,
    show_default=True,
    help="With --engine ray: CPUs (and torch threads) each task's worker gets.",
)
@_common
@pass_context
def onboard(
    ctx: Context,
    tasks: tuple[str, ...],
    tolerance: float | None,
    layers,
    search,
    student_search,
    lrs,
    student_lrs,
    out,
    promote: bool,
    teacher: str | None,
    every: bool,
    engine: str,
    address: str | None,
    cpus_per_task: float,
    **opts,
) -> None:
    """Train, distil, keep the smallest good branch, register TASK and rebuild the bundle.

    Students are tried from the smallest up; the first one within the tolerance of the
    teacher ends the search. With --teacher, the team's own fine-tuned model is the
    teacher (no teacher training). A killed onboarding, run again, resumes after its last
    finished training run. Several tasks (or --all): a line each; --engine ray: side by side.
    """
    from mtreg.training.onboard import onboard as run_onboard

    as_json, data_dir = opts.pop("as_json"), opts.pop("data_dir")
    settings = _settings(
        teacher_layers=_layers(layers, search, "teacher"),
        student_layers=_layers(None, student_search, "student"),
        teacher_lrs=lrs,
        student_lrs=student_lrs,
        tolerance=tolerance,
        **opts,
    )
    if every or len(tasks) != 1 or engine != "local":
        from mtreg.cli.fleet import onboard_fleet

        fleet = {"engine": engine, "address": address, "cpus": cpus_per_task, "out": out}
        fleet |= {"teacher": teacher, "data_dir": data_dir, "promote": promote, "as_json": as_json}
        onboard_fleet(ctx, tasks, every, settings, **fleet)
        return
    (task,) = tasks
    with _progress() as progress:
        report = run_onboard(
            ctx.registry,
            task,
            settings,
            data_dir=data_dir,
            out=out,
            promote=promote,
            progress=progress,
            teacher=teacher,
        )
    if as_json:
        echo_json(report.to_dict())
    else:
        echo_report(report)


def echo_report(report: OnboardReport) -> None:
    """Print what an onboarding tried (a table), what it chose, its cost and registration."""
    _echo_runs(report.runs, report.chosen)
    metric = report.metric
    chosen, teacher = report.chosen, report.teacher
    click.echo(
        f"chosen: {chosen.name} at depth {chosen.fork_depth}, {metric} "
        f"{chosen.dev_metrics[metric]:.4f} (teacher {teacher.dev_metrics[metric]:.4f}, "
        f"floor {report.threshold:.4f} = tolerance {report.tolerance:g})"
    )
    budget = report.budget
    click.echo(
        f"budget: {budget['runs']} runs, {budget['layer_epochs']} layer-epochs = "
        f"{budget['ratio_vs_full']:g}x one full fine-tuning; {report.seconds:.1f}s in all"
    )
    click.echo(f"weights: {report.weights}")
    if report.changes is not None:
        from mtreg.cli.task import echo_changes

        echo_changes(report.changes, dry_run=False, as_json=False)


COMMANDS = [train, distill, onboard]
