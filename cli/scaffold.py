"""``mtreg new-plugin NAME``: write an installable task-plugin package for a task author.

The package (``NAME/``) holds a ``pyproject.toml`` with the ``mtreg`` entry point, the plugin
module ``src/mtreg_<name>/__init__.py`` (``register_tasks`` and a loader for CSV/TSV/JSONL
files under ``$MTREG_DATA_DIR/NAME/``), a README and a pytest test. The files come from the
templates in ``plugin_template/`` plus a few kind-specific snippets below; the result is
ruff-clean as generated. :func:`scaffold_plugin` does the work and is usable from Python.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import click

from mtreg.cli.defaults import default_option, field_default
from mtreg.core.spec import HEAD_KINDS, KIND_RULES, HeadSpec, TaskSpec, validate_name
from mtreg.core.text import split_list
from mtreg.errors import MtregError

DEFAULT_TRUNK = "minilm"
LINE_LENGTH = 100
SEPARATOR = "|"

_PARSE_LABEL = {
    "classification": '''
def parse_label(raw: Any, example: dict[str, Any], where: str) -> str:
    """Return the class name ``raw``. Raises MtregError for a label not in LABELS."""
    return readers.check_label(str(raw).strip(), LABELS, where)
''',
    "multilabel": '''
def parse_label(raw: Any, example: dict[str, Any], where: str) -> list[str]:
    """Return the label names in ``raw``: a JSON list, or names joined by SEPARATOR.

    Raises:
        MtregError: a name not in LABELS.
    """
    names = raw if isinstance(raw, list) else str(raw).split(SEPARATOR)
    return [readers.check_label(str(name).strip(), LABELS, where) for name in names if name]
''',
    "regression": '''
def parse_label(raw: Any, example: dict[str, Any], where: str) -> float | list[float]:
    """Return the target: one float, or one per label (a JSON list, or joined by SEPARATOR).

    Raises:
        MtregError: a value that is not a number, or the wrong number of values.
    """
    values = raw if isinstance(raw, list) else str(raw).split(SEPARATOR)
    try:
        numbers = [float(value) for value in values]
    except (TypeError, ValueError):
        raise MtregError(f"{where}: label {raw!r} is not a number") from None
    width = max(len(LABELS), 1)
    if len(numbers) != width:
        raise MtregError(f"{where}: expected {width} value(s) in the label, found {len(numbers)}")
    return numbers[0] if width == 1 else numbers
''',
    "tagging": '''
def parse_label(raw: Any, example: dict[str, Any], where: str) -> list[str]:
    """Return the tags in ``raw`` (a JSON list, or tags separated by spaces), one per word.

    Raises:
        MtregError: a tag not in LABELS, or not one tag per whitespace-separated word.
    """
    tags = [str(tag) for tag in raw] if isinstance(raw, list) else str(raw).split()
    words = example[INPUTS[0]].split()
    if len(tags) != len(words):
        raise MtregError(f"{where}: {len(tags)} tags for {len(words)} words; give one per word")
    return [readers.check_label(tag, LABELS, where) for tag in tags]
''',
}

# Each returns (record as it is written to a file, the label the loader must return).
_SAMPLE_ROWS = {
    "classification": '''
def sample_rows() -> list[tuple[dict[str, str], Any]]:
    """Return (record, expected label) pairs, one per label."""
    return [(text_fields(i) | {"label": label}, label) for i, label in enumerate(plugin.LABELS)]
''',
    "multilabel": '''
def sample_rows() -> list[tuple[dict[str, str], Any]]:
    """Return (record, expected label) pairs: each label alone, then all of them together."""
    first = [(text_fields(i) | {"label": label}, [label]) for i, label in enumerate(plugin.LABELS)]
    joined = plugin.SEPARATOR.join(plugin.LABELS)
    return [*first, (text_fields(len(first)) | {"label": joined}, list(plugin.LABELS))]
''',
    "regression": '''
def sample_rows() -> list[tuple[dict[str, str], Any]]:
    """Return (record, expected label) pairs with one value per output."""
    width = max(len(plugin.LABELS), 1)
    pairs = []
    for i in range(3):
        values = [i + 0.5 * k for k in range(width)]
        label = plugin.SEPARATOR.join(str(v) for v in values)
        pairs.append((text_fields(i) | {"label": label}, values[0] if width == 1 else values))
    return pairs
''',
    "tagging": '''
def sample_rows() -> list[tuple[dict[str, str], Any]]:
    """Return (record, expected tags) pairs: one word per tag, every tag used."""
    tags = list(plugin.LABELS)
    words = " ".join(f"word{k}" for k in range(len(tags)))
    first = ({"text": words, "label": " ".join(tags)}, tags)
    return [first, ({"text": "one", "label": tags[0]}, tags[:1])]
''',
}

# The README paragraph on the ``label`` column, given the number of labels.
_LABEL_HELP: dict[str, Callable[[int], str]] = {
    "classification": lambda count: "one class name per example.",
    "multilabel": lambda count: (
        f"class names joined by `{SEPARATOR}` (CSV/TSV) or a JSON list (JSONL)."
    ),
    "regression": lambda count: (
        "a number."
        if count <= 1
        else f"one number per output ({count}), joined by `{SEPARATOR}` or a list."
    ),
    "tagging": lambda count: (
        "BIO tags separated by spaces (or a JSON list), one per whitespace-separated word."
    ),
}

_TEXT_FIELDS = '''
def text_fields(i: int) -> dict[str, str]:
    """Return the input fields of the ``i``-th sample record."""
    return {name: f"sample {name} number {i}" for name in plugin.INPUTS}
'''


@dataclass(frozen=True)
class PluginPlan:
    """What :func:`scaffold_plugin` writes: the validated task settings."""

    name: str
    labels: tuple[str, ...]
    kind: str
    pair: bool
    trunk: str
    max_length: int

    @property
    def module(self) -> str:
        """The plugin's import name: ``mtreg_`` + the task name with ``-`` as ``_``."""
        return "mtreg_" + self.name.replace("-", "_")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The example's text fields: ``text``, plus ``text_pair`` for a pair task."""
        return ("text", "text_pair") if self.pair else ("text",)


def plan_plugin(
    name: str,
    labels: Sequence[str],
    *,
    kind: str = "classification",
    pair: bool = False,
    trunk: str = DEFAULT_TRUNK,
    max_length: int | None = None,
) -> PluginPlan:
    """Validate the settings of a new plugin and return them (``max_length`` None: the
    :class:`TaskSpec` default).

    Raises:
        MtregError: a bad task or trunk name, an unknown kind, a bad label list for the kind
            (too few, repeated, with quotes, backslashes, ``|`` or spaces where they would
            break the data format), a tagging task with a pair, or a bad ``max_length``.
    """
    validate_name(name)
    labels = tuple(label.strip() for label in labels if label.strip())
    if kind not in HEAD_KINDS:
        raise MtregError(f"unknown head kind {kind!r}: use one of {', '.join(HEAD_KINDS)}")
    # A per-token task's labels are written as space-separated tags, one per word.
    per_token = KIND_RULES[kind].per_token
    for label in labels:
        bad = set(label) & {'"', "\\", SEPARATOR}
        if bad or not label.isprintable() or (per_token and " " in label):
            raise MtregError(
                f"label {label!r}: labels cannot contain quotes, backslashes or {SEPARATOR!r}"
                + (", nor spaces in a tagging task" if per_token else "")
            )
    if not labels and KIND_RULES[kind].min_labels:
        raise MtregError(f"a {kind} task needs --labels: give them comma-separated, e.g. a,b")
    head = HeadSpec(kind, labels)
    if max_length is None:
        max_length = field_default(TaskSpec, "max_length")
    plan = PluginPlan(name, labels, kind, pair, trunk, max_length)
    TaskSpec(name, "1.0.0", head, inputs=plan.inputs, trunk=trunk, max_length=max_length)
    return plan


def scaffold_plugin(plan: PluginPlan, directory: str | Path = ".") -> Path:
    """Write the plugin package ``directory/<name>/`` and return its path.

    The files are written to a temporary folder beside the target and renamed into place,
    so a failure leaves nothing half-written.

    Raises:
        MtregError: the target exists, or ``directory`` is not a directory.
    """
    parent = Path(directory).expanduser()
    target = parent / plan.name
    if target.exists() or target.is_symlink():
        raise MtregError(f"{target} already exists: remove it or choose another --dir")
    if not parent.is_dir():
        raise MtregError(f"{parent} is not a directory: create it or choose another --dir")
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.name}-", dir=parent))
    try:
        for relative, text in render(plan).items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def render(plan: PluginPlan) -> dict[str, str]:
    """Return the package's files: relative path -> text."""
    values = _template_values(plan)
    return {
        "pyproject.toml": _template("pyproject.toml.tmpl", values),
        "README.md": _template("README.md.tmpl", values),
        f"src/{plan.module}/__init__.py": _template("plugin.py.tmpl", values),
        f"tests/test_{plan.module}.py": _template("test_plugin.py.tmpl", values),
    }


def _template(file_name: str, values: dict[str, str]) -> str:
    """Return template ``file_name`` from ``plugin_template/`` filled with ``values``."""
    text = resources.files("mtreg.cli").joinpath("plugin_template", file_name).read_text()
    return Template(text).substitute(values)


def _template_values(plan: PluginPlan) -> dict[str, str]:
    # Imported here: the heads pull in torch, which the other commands must not pay for.
    from mtreg import heads

    metrics = heads.get(plan.kind).default_metrics
    description = 'f"{KIND} task {TASK}' + (' on text pairs"' if plan.pair else '"')
    sample = _SAMPLE_ROWS[plan.kind]
    if not KIND_RULES[plan.kind].per_token:  # a per-token sample writes its own words
        sample = _TEXT_FIELDS + "\n" + sample
    return {
        "name": plan.name,
        "module": plan.module,
        "kind": plan.kind,
        "trunk": plan.trunk,
        "max_length": str(plan.max_length),
        "description": description,
        "summary": f"a {plan.kind} task" + (" on text pairs" if plan.pair else ""),
        "labels": _tuple_literal(plan.labels, len("LABELS: tuple[str, ...] = ")),
        "inputs": _tuple_literal(plan.inputs, len("INPUTS: tuple[str, ...] = ")),
        "metrics": _tuple_literal(metrics, len("METRICS: tuple[str, ...] = ")),
        "parse_label": _PARSE_LABEL[plan.kind].lstrip("\n"),
        "sample_rows": sample.lstrip("\n"),
        "label_list": ", ".join(f"`{label}`" for label in plan.labels) or "(one score)",
        "input_list": ", ".join(f"`{name}`" for name in plan.inputs),
        "metric_list": ", ".join(f"`{name}`" for name in metrics),
        "column_list": ", ".join(f"`{name}`" for name in plan.inputs),
        "label_help": _LABEL_HELP[plan.kind](len(plan.labels)),
    }


def _tuple_literal(items: Sequence[str], indent: int) -> str:
    """Return ``items`` as a Python tuple literal laid out the way ``ruff format`` does."""
    quoted = [json.dumps(item, ensure_ascii=False) for item in items]
    if not quoted:
        return "()"
    one_line = "(" + ", ".join(quoted) + ("," if len(quoted) == 1 else "") + ")"
    if indent + len(one_line) <= LINE_LENGTH:
        return one_line
    return "(\n" + "".join(f"    {q},\n" for q in quoted) + ")"


@click.command("new-plugin")
@click.argument("name")
@click.option(
    "--labels",
    default="",
    metavar="A,B,...",
    help="The head's labels, comma-separated (a regression task may give none: one score).",
)
@click.option("--pair", is_flag=True, help="Examples are text pairs (text, text_pair).")
@click.option(
    "--kind",
    type=click.Choice(HEAD_KINDS),
    default="classification",
    show_default=True,
    help="Head kind.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Folder to write NAME/ into [default: the current folder].",
)
@click.option("--trunk", default=DEFAULT_TRUNK, show_default=True, help="Trunk name.")
@default_option(TaskSpec, "--max-length", type=click.IntRange(2, 8192), help="Tokens.")
def new_plugin(
    name: str,
    labels: str,
    pair: bool,
    kind: str,
    directory: Path,
    trunk: str,
    max_length: int | None,
) -> None:
    """Write an installable task-plugin package NAME/ (pyproject, plugin, loader, README, test).

    The plugin reads MTREG_DATA_DIR/NAME/{train,dev,test}.{csv,tsv,jsonl}.
    """
    plan = plan_plugin(
        name, split_list(labels), kind=kind, pair=pair, trunk=trunk, max_length=max_length
    )
    target = scaffold_plugin(plan, directory)
    click.echo(f"wrote plugin package {target} (module {plan.module}, task {plan.name})")
    click.echo(f"next: pip install -e {target}; put data in DIR/{plan.name}/train.csv, dev.csv;")
    click.echo(f"      mtreg onboard {plan.name} --data-dir DIR")


COMMANDS = [new_plugin]
