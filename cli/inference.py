"""Using bundles: ``predict`` and ``export``. torch is imported only inside the commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mtreg.artifacts.gate_file import BACKENDS, FASTEST
from mtreg.artifacts.home import Home
from mtreg.artifacts.manifest import bundle_directory
from mtreg.cli.context import Context, pass_context
from mtreg.core.text import read_jsonl, split_list, text_problem
from mtreg.errors import MtregError

bundle_option = click.option(
    "--bundle",
    "ref",
    default="serving",
    show_default=True,
    help="Alias, bundle id (prefix), or a bundle directory written as a path (./DIR).",
)
tasks_option = click.option(
    "--tasks", default=None, metavar="A,B", help="Comma-separated tasks (default: all)."
)


def _split(tasks: str | None) -> list[str] | None:
    return split_list(tasks) if tasks else None


def resolve_bundle(ctx: Context, ref: str) -> tuple[Path, str | None]:
    """Return the bundle directory ``ref`` names and the id the registry recorded for it
    (None for a directory written as a path, which needs no database)."""
    directory = bundle_directory(ref)
    if directory is not None:
        return directory, None
    record = ctx.registry.bundle(ref)
    return ctx.registry.bundle_dir(record), record.id


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number"}


def _input(value: Any) -> tuple[Any, str | None]:
    """Return ``(input, None)`` for a JSON value that is an input, else ``(None, problem)``."""
    if isinstance(value, dict) and set(value) <= {"text", "text_pair"} and "text" in value:
        texts = [value["text"], value["text_pair"]] if "text_pair" in value else [value["text"]]
        item = tuple(texts) if len(texts) == 2 else texts[0]
    elif isinstance(value, dict):
        texts, item = list(value.values()), value
    elif isinstance(value, list):
        if len(value) not in (1, 2):
            return None, f"is a list of {len(value)} items: a pair has two texts"
        texts, item = value, tuple(value)
    elif isinstance(value, str):
        texts, item = [value], value
    else:
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        return None, f"is {kind}, not an input: write a text, a [text, pair] list or an object"
    if not texts:
        return None, "is an empty object: give the tasks' input fields"
    problem = next(filter(None, map(text_problem, texts)), None)
    return (item, None) if problem is None else (None, f"has a bad text ({problem})")


def _read_inputs(path: Path, skip_bad: bool, fits: Callable[[Any], str | None]) -> list[Any]:
    """Return the inputs of a JSON-lines file: a string, a ``[text, pair]`` list, or an
    object with ``text`` (and ``text_pair``) or with the tasks' own input field names.
    ``fits`` returns why the tasks cannot read an input (a pair for a one-text task), or None.

    Raises:
        MtregError: a line that is not an input (bad UTF-8 or JSON, ``null``, a number, an
            empty text, ...) or one the tasks cannot read, naming it; with ``skip_bad`` each
            is reported on stderr instead.
    """

    def bad(number: int, problem: str) -> None:
        if not skip_bad:
            raise MtregError(f"{path}:{number} {problem}: fix that line or pass --skip-bad")
        skipped.append(number)
        click.echo(f"skipped {path}:{number}: {problem}", err=True)

    skipped: list[int] = []
    inputs = []
    for number, value in read_jsonl(path, on_error=bad):
        item, problem = _input(value)
        problem = problem or fits(item)
        if problem is None:
            inputs.append(item)
        else:
            bad(number, problem)
    if skipped:
        click.echo(f"skipped {len(skipped)} bad line(s), predicted {len(inputs)}", err=True)
    return inputs


@click.command("predict")
@bundle_option
@tasks_option
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON-lines file of inputs (instead of TEXT).",
)
@click.option(
    "--skip-bad", is_flag=True, help="Skip --input lines that are not inputs (listed on stderr)."
)
@click.option("--logits", is_flag=True, help="Add the raw outputs.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=FASTEST,
    show_default=True,
    help="fastest: per batch size, the fastest backend the bundle's quality gate (`mtreg "
    "bundle gate`) finds eligible for every task (torch without a gate); onnx/auto need an "
    "`export --format onnx` folder.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    metavar="cpu|cuda[:N]",
    help="Run on this device: on a GPU, torch under bf16/fp16 autocast, or the fp32 ONNX "
    "graph on the CUDA execution provider.",
)
@click.argument("text", required=False)
@click.argument("text_pair", required=False)
@pass_context
def predict(
    ctx: Context,
    ref: str,
    tasks: str | None,
    input_file: Path | None,
    skip_bad: bool,
    logits: bool,
    batch_size: int,
    backend: str,
    device: str,
    text: str | None,
    text_pair: str | None,
) -> None:
    """Predict TEXT (and TEXT_PAIR) or every line of --input with a bundle; print JSON lines."""
    if (text is None) == (input_file is None):
        raise click.UsageError("give either TEXT [TEXT_PAIR] or --input FILE.jsonl")
    from mtreg.runtime.bundle import LoadedBundle, input_problem

    path, ident = resolve_bundle(ctx, ref)
    bundle = LoadedBundle(
        path, _split(tasks), backend, ident, Home.resolve(ctx.home), device=device
    )
    if input_file is None:
        inputs: list[Any] = [text if text_pair is None else (text, text_pair)]
    else:
        # Checked line by line here, so that an input no task reads is named by its line.
        inputs = _read_inputs(
            input_file,
            skip_bad,
            lambda item: next(
                filter(None, (input_problem(item, bundle.info[t]) for t in bundle.tasks)), None
            ),
        )
    results = bundle.predict(inputs, batch_size=batch_size, with_logits=logits)
    if bundle.choice is not None:  # once the inputs passed: an error stays one line
        click.echo(bundle.choice.line(), err=True)
    for item, result in zip(inputs, results, strict=True):
        shown = list(item) if isinstance(item, tuple) else item
        click.echo(json.dumps({"input": shown, "predictions": result}, sort_keys=True))


@click.command("export")
@bundle_option
@tasks_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["dir", "onnx", "hf"]),
    default="dir",
    show_default=True,
    help="dir: a smaller bundle folder; onnx: one ONNX graph; hf: one task for transformers.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to create (must not exist).",
)
@click.option("--quantize", type=click.Choice(["int8"]), help="Also write an int8 ONNX graph.")
@click.option(
    "--external-data",
    is_flag=True,
    help="ONNX: keep the weights in model.onnx.data beside the graph (graphs over 2 GB).",
)
@click.option(
    "--push-to-hub",
    "repo",
    metavar="OWNER/NAME",
    help="Then upload OUT (with its model card) to this Hub model repository (private).",
)
@pass_context
def export(
    ctx: Context,
    ref: str,
    tasks: str | None,
    fmt: str,
    out: Path,
    quantize: str | None,
    external_data: bool,
    repo: str | None,
) -> None:
    """Export a bundle (or some of its tasks) to OUT, with a model card (README.md)."""
    from mtreg.artifacts import hub
    from mtreg.runtime import export as exporting

    (source, ident), names = resolve_bundle(ctx, ref), _split(tasks)
    if (quantize or external_data) and fmt != "onnx":
        raise click.UsageError("--quantize and --external-data apply to --format onnx only")
    homes = [Home.resolve(ctx.home)]  # the export functions refuse an out inside it
    if repo is not None:  # refused before anything is written
        hub.check_push(repo)
    if fmt == "dir":
        exporting.export_dir(source, out, names, expected_id=ident, homes=homes)
        click.echo(f"exported {', '.join(names or ['all tasks'])} to {out}")
    elif fmt == "onnx":
        report = exporting.export_onnx(
            source,
            out,
            names,
            quantize,
            expected_id=ident,
            external_data=external_data,
            homes=homes,
        )
        click.echo(
            f"exported {len(report['outputs'])} task(s) as one ONNX graph to {out} "
            f"(max abs diff to torch {report['max_abs_diff']:.2e})"
        )
        if quantize:
            click.echo(
                f"int8: argmax agreement with fp32 {report['int8_argmax_agreement']:.1%}, "
                f"max abs diff {report['int8_max_abs_diff']:.3g}"
            )
    else:
        if not names or len(names) != 1:
            raise click.UsageError("--format hf exports one task: pass --tasks NAME")
        exporting.export_hf(source, out, names[0], expected_id=ident, homes=homes)
        click.echo(f"exported {names[0]} as a transformers folder to {out}")
    if repo is not None:
        click.echo(f"pushed {out} to the Hub: {hub.push_folder(out, repo)}")


COMMANDS = [predict, export]
