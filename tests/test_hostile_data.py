"""Hostile and careless training data, through the real ``mtreg onboard`` and ``mtreg train``
(one process per command, ``harness.CliPool``) on SQLite and PostgreSQL.

Every malformed example, empty split and failing loader ends before anything is tokenised,
cached or trained: exit code 1, one line naming the task, the split and the row, and the
registry and its home byte for byte as they were. A run whose loss or weights stop being
finite stops with an error and leaves no branch file, no registration and no saved run.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import Checkpoints
from harness import CliPool, Databases
from helpers import STAMP, snapshot
from safetensors.torch import load_file, save_file
from toy import FLAGS, open_toy_registry

from mtreg.core.spec import HeadSpec
from mtreg.training.loop import Diverged, Recipe, train_loop

# Every test runs real mtreg commands in processes of the pool.
pytestmark = pytest.mark.slow

# A valid example per head kind; each case's loader replaces one row of one split.
PLUGIN = textwrap.dedent(
    """
    import sys
    import time

    import mtreg
    from mtreg.errors import MtregError

    HEADS = {
        "classification": mtreg.HeadSpec("classification", ("negative", "positive")),
        "multilabel": mtreg.HeadSpec("multilabel", ("a", "b")),
        "regression": mtreg.HeadSpec("regression"),
        "tagging": mtreg.HeadSpec("tagging", ("O", "B-x", "I-x")),
    }


    def valid(kind, split, scale=1.0):
        for i in range({"train": 64, "dev": 16}[split]):
            good = i % 2 == 0
            text = f"the film was {'good' if good else 'bad'}"
            label = {
                "classification": "positive" if good else "negative",
                "multilabel": ["a"] if good else ["a", "b"],
                "regression": (1.0 if good else 0.0) * scale,
                "tagging": ["O", "O", "O", "B-x" if good else "O"],
            }[kind]
            yield {"text": text, "label": label}


    def with_row(kind, bad_split, number, row):
        def load(split):
            for i, example in enumerate(valid(kind, split), 1):
                yield row if (split == bad_split and i == number) else example
        return load


    def fails_at(number, error):
        def load(split):
            for i, example in enumerate(valid("classification", split), 1):
                if i == number:
                    raise error
                yield example
        return load


    def hangs_after(number):
        def load(split):
            for i, example in enumerate(valid("classification", split), 1):
                if i == number:
                    time.sleep(3600)
                yield example
        return load


    def raises_at_once(split):
        raise RuntimeError("the data server\\nis down")


    def returns_none(split):
        return None


    def empty_train(split):
        return [] if split == "train" else valid("classification", split)


    def dev_fails(split):
        if split == "dev":
            sys.exit(0)
        return valid("classification", split)


    class CustomError(Exception):
        pass


    def huge_targets(split):
        return valid("regression", split, scale=1e30)


    def task(name, kind, loader):
        return mtreg.TaskSpec(
            name=name, version="1.0.0", head=HEADS[kind], load_dataset=loader,
            trunk="tiny", max_length=16,
        )


    @mtreg.hookimpl
    def register_tasks(register):
        for name, kind, split, number, row in ROWS:
            register(task(name, kind, with_row(kind, split, number, row)))
        register(task("raises-at-once", "classification", raises_at_once))
        register(task("returns-none", "classification", returns_none))
        register(task("empty-train", "classification", empty_train))
        register(task("dev-exits", "classification", dev_fails))
        register(task("fails-halfway", "classification", fails_at(58, ZeroDivisionError("x/0"))))
        register(task("custom-error", "classification", fails_at(7, CustomError("bad shard"))))
        register(task("keyerror-halfway", "classification", fails_at(3, KeyError("id"))))
        register(task("mtreg-error", "classification", fails_at(5, MtregError("data.tsv:5: bad"))))
        register(task("exit-halfway", "classification", fails_at(9, SystemExit(0))))
        register(task("huge-targets", "regression", huge_targets))
        register(task("hangs-halfway", "classification", hangs_after(5)))
    """
)


@dataclass(frozen=True)
class Row:
    """A case: task ``name`` of head ``kind`` whose ``split`` has ``row`` (Python source) as
    its example number ``number``; the error must say ``message``."""

    name: str
    kind: str
    split: str
    number: int
    row: str
    message: str


ROWS = [
    # texts
    Row("text-none", "classification", "train", 3, "{'text': None, 'label': 'positive'}",
        "field 'text' is None, a NoneType, not a string"),
    Row("text-number", "classification", "train", 1, "{'text': 42, 'label': 'positive'}",
        "field 'text' is 42, a int, not a string"),
    Row("text-list", "tagging", "dev", 2, "{'text': ['the', 'film'], 'label': ['O', 'O']}",
        "a list, not a string"),
    Row("text-surrogate", "classification", "train", 5, "{'text': '\\ud800', 'label': 'positive'}",
        "field 'text' is not valid Unicode"),
    Row("text-missing", "classification", "train", 2, "{'label': 'positive'}",
        "lacks the input field 'text'"),
    Row("not-a-mapping", "classification", "train", 4, "'the film was good'",
        "the example is a str, not a mapping"),
    Row("row-is-none", "classification", "dev", 1, "None", "the example is a NoneType"),
    Row("label-missing", "classification", "train", 6, "{'text': 'the film'}", "has no 'label'"),
    # classification and multilabel labels
    Row("label-int", "classification", "train", 2, "{'text': 'good', 'label': 1}",
        "label 1 is not in the head's labels ['negative', 'positive']"),
    Row("label-list", "classification", "train", 2, "{'text': 'good', 'label': ['positive']}",
        "label ['positive'] is not in the head's labels"),
    Row("label-unknown", "classification", "dev", 16, "{'text': 'good', 'label': 'neutral'}",
        "label 'neutral' is not in the head's labels"),
    Row("label-none", "classification", "train", 9, "{'text': 'good', 'label': None}",
        "label None is not in the head's labels"),
    Row("multilabel-string", "multilabel", "train", 3, "{'text': 'good', 'label': 'a'}",
        "label 'a' is not a list"),
    Row("multilabel-unknown", "multilabel", "train", 3, "{'text': 'good', 'label': ['a', 'z']}",
        "label 'z' is not in the head's labels"),
    Row("multilabel-number", "multilabel", "dev", 3, "{'text': 'good', 'label': [0, 1]}",
        "label 0 is not in the head's labels"),
    # regression targets
    Row("target-nan", "regression", "train", 7, "{'text': 'good', 'label': float('nan')}",
        "label nan is not a finite number"),
    Row("target-inf", "regression", "dev", 2, "{'text': 'good', 'label': float('-inf')}",
        "label -inf is not a finite number"),
    Row("target-beyond-float32", "regression", "train", 2, "{'text': 'good', 'label': 1e39}",
        "label 1e+39 is not a finite number in float32's range"),
    Row("target-nan-in-list", "regression", "train", 2, "{'text': 'good', 'label': [float('nan')]}",
        "label [nan] is not a finite number"),
    Row("target-string", "regression", "train", 4, "{'text': 'good', 'label': '3.5'}",
        "'3.5' is a str, not a number"),
    Row("target-none", "regression", "train", 4, "{'text': 'good', 'label': None}",
        "None is a NoneType, not a number"),
    Row("target-bool", "regression", "train", 4, "{'text': 'good', 'label': True}",
        "True is a bool, not a number"),
    Row("target-two-values", "regression", "train", 4, "{'text': 'good', 'label': [1.0, 2.0]}",
        "has 2 value(s), the head has 1 output(s)"),
    # tags
    Row("tags-too-many", "tagging", "train", 2, "{'text': 'the film', 'label': ['O', 'O', 'O']}",
        "3 tags for a text of 2 words"),
    Row("tags-too-few", "tagging", "train", 2, "{'text': 'the film', 'label': 'O'}",
        "1 tags for a text of 2 words"),
    Row("tags-unknown", "tagging", "dev", 3, "{'text': 'the film', 'label': ['O', 'B-y']}",
        "label 'B-y' is not in the head's labels"),
    Row("tags-none", "tagging", "train", 1, "{'text': 'the film', 'label': None}",
        "label None is not a list of tags"),
    Row("tags-empty-text", "tagging", "train", 8, "{'text': '  ', 'label': []}",
        "the text has no words to tag"),
]  # fmt: skip

# (task, what the one-line error must say) for loaders that fail or give nothing
LOADERS = [
    ("raises-at-once", "task 'raises-at-once', train split: its loader failed: RuntimeError: "
     "the data server is down"),
    ("returns-none", "train split: its loader failed: TypeError: 'NoneType' object is not"),
    ("empty-train", "task 'empty-train': its train split is empty"),
    ("dev-exits", "task 'dev-exits', dev split: its loader failed: SystemExit: 0"),
    ("fails-halfway", "train split: its loader failed at row 58 (after 57 good rows): "
     "ZeroDivisionError: x/0"),
    ("custom-error", "at row 7 (after 6 good rows): CustomError: bad shard"),
    ("keyerror-halfway", "at row 3 (after 2 good rows): KeyError: 'id'"),
    ("mtreg-error", "task 'mtreg-error', train split: data.tsv:5: bad"),
    ("exit-halfway", "at row 9 (after 8 good rows): SystemExit: 0"),
]  # fmt: skip

TRAIN = ["--layers", "2", "--lr", "3e-3", "--epochs", "2", "--batch-size", "16"]


@dataclass
class World:
    """A registry with trunk ``tiny``, the toy plugin and the hostile plugin above."""

    root: Path
    url: str

    @property
    def home(self) -> Path:
        return self.root / "home"

    def env(self) -> dict[str, str]:
        """The environment of an mtreg command on this registry."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("MTREG_")}
        return {
            **base,
            "MTREG_HOME": str(self.home),
            "MTREG_DATABASE_URL": self.url,
            "MTREG_PLUGINS_PATH": str(self.root / "plugins"),
        }

    def snapshot(self, skip_cache: bool = False) -> dict[str, Any]:
        """Every row and every file's hash; ``skip_cache`` leaves out the caches (trunk
        activations and tokenizer files a started training fills, keyed by content)."""
        state = snapshot(self.url, self.home)
        if skip_cache:
            state["files"] = {k: v for k, v in state["files"].items() if not k.startswith("cache")}
        return state


@pytest.fixture(scope="module")
def world(
    databases: Databases, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-data")
    url = databases.new()
    open_toy_registry(checkpoints, root, url).close()
    rows = ",\n".join(f"({r.name!r}, {r.kind!r}, {r.split!r}, {r.number}, {r.row})" for r in ROWS)
    (root / "plugins" / "hostile.py").write_text(f"{PLUGIN}\nROWS = [\n{rows}\n]\n")
    yield World(root, url)


# A timestamped progress line: in a pipe, training logs one per stage and per epoch.
PROGRESS = re.compile(f"{STAMP} ")


def _one_line_error(result: Any) -> str:
    """Return the error that ends ``result``'s stderr: one line, after any progress lines."""
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS.match(line)]
    assert result.code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("case", ROWS, ids=[r.name for r in ROWS])
def test_a_malformed_example_is_named_by_task_split_and_row(
    pool: CliPool, world: World, case: Row
) -> None:
    before = world.snapshot()
    line = _one_line_error(pool.run(world.env(), "onboard", case.name, *FLAGS))
    assert f"task {case.name!r}, {case.split} split, row {case.number}: " in line
    assert case.message in line
    assert world.snapshot() == before


@pytest.mark.parametrize(("task", "message"), LOADERS, ids=[c[0] for c in LOADERS])
@pytest.mark.parametrize("command", ["onboard", "train"])
def test_a_failing_or_empty_loader_is_one_line_before_any_training(
    pool: CliPool, world: World, task: str, message: str, command: str
) -> None:
    before = world.snapshot()
    line = _one_line_error(pool.run(world.env(), command, task, *TRAIN))
    assert message in line
    assert world.snapshot() == before


@pytest.mark.parametrize("command", ["onboard", "train"])
def test_a_loader_that_never_returns_is_stopped_at_its_limit(
    pool: CliPool, world: World, command: str
) -> None:
    before = world.snapshot()
    values = {**world.env(), "MTREG_LOADER_TIMEOUT": "1"}
    line = _one_line_error(pool.run(values, command, "hangs-halfway", *TRAIN))
    assert line == (
        "Error: task 'hangs-halfway', train split: plugin 'hostile''s load_dataset hook gave "
        "no complete split within 1 s (the limit, MTREG_LOADER_TIMEOUT); fix the loader or "
        "raise the limit"
    )
    assert world.snapshot() == before


def _saved_runs(world: World, task: str) -> list[str]:
    folder = world.home / "onboarding" / task
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_a_diverging_run_stops_and_writes_nothing(pool: CliPool, world: World) -> None:
    # Targets of 1e30 are finite, but their squared error is not in float32.
    before = world.snapshot(skip_cache=True)
    for _ in range(2):  # and a second try resumes nothing: it diverges again
        line = _one_line_error(pool.run(world.env(), "onboard", "huge-targets", *FLAGS))
        assert "task 'huge-targets', run teacher-L2-lr0.003: training diverged in epoch 1: " in line
        assert "the training loss became inf at batch 1" in line and "--lr" in line
        assert _saved_runs(world, "huge-targets") == []
        assert not (world.home / "trained" / "huge-targets").exists()
        assert world.snapshot(skip_cache=True) == before


def test_a_learning_rate_that_blows_up_the_weights_is_refused(pool: CliPool, world: World) -> None:
    before = world.snapshot(skip_cache=True)
    out = world.root / "teacher.safetensors"
    argv = ["train", "toy", "--layers", "2", "--lr", "1e30", "--epochs", "2", "--out", str(out)]
    line = _one_line_error(pool.run(world.env(), *argv))
    assert "task 'toy', run teacher-L2-lr1e+30: training diverged in epoch 1" in line
    assert not out.exists() and _saved_runs(world, "toy") == []
    assert world.snapshot(skip_cache=True) == before


def test_a_saved_run_with_nan_weights_is_trained_again_not_resumed(
    pool: CliPool, world: World
) -> None:
    argv = ["train", "toy", *TRAIN, "--json"]
    first = pool.run(world.env(), *argv)
    assert first.code == 0, first.stderr
    (weights,) = (world.home / "onboarding" / "toy").rglob("teacher-*.safetensors")
    state = load_file(weights)
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    save_file(state, weights)
    again = pool.run(world.env(), *argv)
    assert again.code == 0, again.stderr
    (run,) = json.loads(again.stdout)["runs"]
    assert run["resumed"] is False  # a damaged run is not a good one
    assert torch.isfinite(load_file(weights)["head.bias"]).all()


def test_weights_that_turn_nan_under_a_finite_loss_stop_the_run() -> None:
    module = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(module.weight)
    # sqrt(|w|) is 0 at w = 0, but its gradient there is not a number: the step spoils w.
    with pytest.raises(Diverged, match="in epoch 1: weight 'weight' holds NaN or Inf"):
        train_loop(
            module,
            HeadSpec("regression"),
            [1] * 4,  # four training examples of one token
            [[0.0]],
            ["pearson"],
            Recipe(epochs=2, batch_size=4),
            loss_for=lambda _: module.weight.abs().sqrt().sum(),
            predict=lambda: [torch.zeros(1)],
        )
