"""Training progress: per-batch steps from the training loop, run names through onboarding
and full fine-tuning, the terminal renderer (rich's bar under the lines, gone when it
closes) and, in pipes, timestamped lines instead of a bar."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import finetune as ft
import pytest
from click.testing import CliRunner
from helpers import STAMP, screen
from toy import FAST, FLAGS, OpenRegistry

from mtreg.cli.main import cli
from mtreg.cli.progress import Renderer
from mtreg.registry.api import Registry
from mtreg.training.job import CACHE_BATCH, prepare
from mtreg.training.onboard import onboard
from mtreg.training.progress import Step, StepProgress, prefixed
from mtreg.training.stages import train_teachers

TRAIN_EXAMPLES = 192  # the toy task's train split (tests/toy.py)


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Recorder:
    """A StepProgress that keeps everything it is told."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.steps: list[Step] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def step(self, step: Step) -> None:
        self.steps.append(step)


@pytest.fixture
def registry(toy_registry: OpenRegistry, tmp_path: Path):
    with toy_registry(tmp_path) as reg:
        yield reg


def test_a_recorder_is_a_step_progress_and_a_plain_function_is_not() -> None:
    assert isinstance(Recorder(), StepProgress)
    assert not isinstance(print, StepProgress)


def test_prefixed_names_lines_and_steps_and_drops_steps_for_plain_callbacks() -> None:
    recorder = Recorder()
    # The callback nearest the sink names the widest scope: it comes first.
    named = prefixed(prefixed(recorder, "outer"), "inner")
    assert named is not None
    named("epoch 1/2: loss 0.5")
    named.step(Step("", 1, 2, 3, 4, 0.5))
    assert recorder.lines == ["outer inner epoch 1/2: loss 0.5"]
    assert [s.run for s in recorder.steps] == ["outer inner"]
    lines: list[str] = []
    plain = prefixed(lines.append, "run")
    assert plain is not None
    plain.step(Step("", 1, 2, 3, 4, 0.5))  # nowhere to go: dropped
    plain("done")
    assert lines == ["run done"]
    assert prefixed(None, "run") is None


def test_on_a_terminal_the_bar_shows_pace_and_loss_and_only_lines_stay() -> None:
    stream = FakeTTY()
    with Renderer(stream) as progress:
        progress("cached train activations at depth(s) [1] in 0.1s")
        for epoch in (1, 2):
            for batch in range(1, 5):
                progress.step(Step("teacher-L2-lr0.003", epoch, 2, batch, 4, 1 / batch))
            progress(f"teacher-L2-lr0.003 epoch {epoch}/2: loss 0.2500, accuracy 1.0000")
    raw = stream.getvalue()
    # The bar spans the run's epochs: batches done of all, [elapsed<left, rate], loss.
    bar = re.search(r"teacher-L2-lr0\.003 epoch 2/2 .*?(\d+)/8.*?\[(\S+)<(\S+), (\S+)/s\]", raw)
    assert bar is not None and int(bar[1]) > 4
    assert re.fullmatch(r"\d:\d\d:\d\d", bar[2]) and re.search("loss 0.2500", raw)
    assert screen(raw) == [
        "  cached train activations at depth(s) [1] in 0.1s",
        "  teacher-L2-lr0.003 epoch 1/2: loss 0.2500, accuracy 1.0000",
        "  teacher-L2-lr0.003 epoch 2/2: loss 0.2500, accuracy 1.0000",
        "",
    ]


def test_caching_shows_a_bar_without_epoch_or_loss() -> None:
    stream = FakeTTY()
    with Renderer(stream) as progress:
        for batch in (1, 2, 3):
            progress.step(Step("caching train activations", 1, 1, batch, 3))
    raw = stream.getvalue()
    assert re.search(r"caching train activations .*3/3", raw)
    assert "epoch" not in raw and "loss" not in raw


def test_closing_wipes_a_bar_left_by_an_interrupted_run() -> None:
    stream = FakeTTY()
    with pytest.raises(KeyboardInterrupt), Renderer(stream) as progress:
        progress.step(Step("student-l1-lr0.003", 1, 4, 1, 12, 0.7))
        raise KeyboardInterrupt
    assert "student-l1" in stream.getvalue()
    assert screen(stream.getvalue()) == [""]  # the error message starts on a clean row


def test_elsewhere_there_are_timestamped_lines_only() -> None:
    stream = io.StringIO()
    with Renderer(stream) as progress:
        progress.step(Step("teacher-L2-lr0.003", 1, 2, 1, 4, 0.5))
        progress("teacher-L2-lr0.003 epoch 1/2: loss 0.5000")
    assert re.fullmatch(f"{STAMP} teacher-L2-lr0.003 epoch 1/2: loss 0.5000\n", stream.getvalue())


@pytest.mark.slow
def test_onboarding_steps_every_batch_of_every_epoch_run(registry: Registry) -> None:
    recorder = Recorder()
    settings = replace(FAST, epochs=1, student_epochs=2, patience=1)
    report = onboard(registry, "toy", settings, register=False, progress=recorder)
    batches = math.ceil(TRAIN_EXAMPLES / settings.batch_size)
    assert [r.name for r in report.runs] == ["teacher-L2-lr0.003", "student-k1-l1-lr0.003"]
    for run in report.runs:
        steps = [s for s in recorder.steps if s.run == run.name]
        assert len(steps) == batches * run.epochs_run
        assert [(s.epoch, s.batch) for s in steps] == [
            (e, b) for e in range(1, run.epochs_run + 1) for b in range(1, batches + 1)
        ]
        assert all(s.epochs == run.epochs and s.batches == batches for s in steps)
        assert f"{run.name} epoch 1/{run.epochs}: loss" in "\n".join(recorder.lines)
    # Training steps carry a loss; the other steps are the activation-caching phase's.
    training = [s for s in recorder.steps if s.loss is not None]
    assert len(training) == sum(batches * r.epochs_run for r in report.runs)
    caching = [(s.run, s.batch) for s in recorder.steps if s.loss is None]
    cached = math.ceil(TRAIN_EXAMPLES / CACHE_BATCH)
    assert caching[:cached] == [("caching train activations", b) for b in range(1, cached + 1)]
    assert any(line.startswith("cached train activations") for line in recorder.lines)


def test_onboarding_on_a_terminal_draws_bars_and_keeps_the_log(registry: Registry) -> None:
    stream = FakeTTY()
    with Renderer(stream) as progress:
        job = prepare(registry, "toy", replace(FAST, epochs=2), progress=progress)
        train_teachers(job)
    raw = stream.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", raw)  # without colours
    assert re.search(r"teacher-L2-lr0\.003 epoch 2/2 .*/\d+ \[", plain)
    assert re.search(r"caching train activations .*\[", plain)
    rows = screen(raw)
    assert rows[-1] == "" and not any(re.search(r"\[\S+<\S+, ", row) for row in rows)
    assert [row.split(":")[0] for row in rows if "epoch" in row] == [
        "  teacher-L2-lr0.003 epoch 1/2",
        "  teacher-L2-lr0.003 epoch 2/2",
    ]


def test_full_finetuning_steps_carry_the_learning_rate(registry: Registry) -> None:
    recorder = Recorder()
    job = prepare(registry, "toy", FAST)
    ft.search(job, (1e-3,), epochs=1, progress=recorder)
    batches = math.ceil(TRAIN_EXAMPLES / FAST.batch_size)
    assert {s.run for s in recorder.steps} == {"full-lr0.001"}
    assert len(recorder.steps) == batches
    assert recorder.lines[-1].startswith("full-lr0.001 epoch 1/1: loss")


@pytest.mark.slow
def test_cli_onboard_into_a_pipe_writes_timestamped_lines_to_stderr(
    toy_registry: OpenRegistry, tmp_path: Path
) -> None:
    toy_registry(tmp_path).close()
    base = ["--db", f"sqlite:///{tmp_path / 'registry.db'}", "--home", str(tmp_path / "home")]
    base += ["--plugins-dir", str(tmp_path / "plugins")]
    result = CliRunner().invoke(cli, [*base, "onboard", "toy", *FLAGS, "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "\x1b" not in result.output
    assert json.loads(result.stdout)["chosen"]["stage"] in ("teacher", "student")
    lines = result.stderr.splitlines()
    assert lines and all(re.match(f"{STAMP} ", line) for line in lines)
