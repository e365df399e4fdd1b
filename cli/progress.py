"""Training progress on stderr: rich's bars on a terminal, timestamped lines elsewhere.

:class:`Renderer` is a :class:`~mtreg.training.progress.StepProgress`: pass it as
``progress=`` to the training functions.

- On a terminal, the lines (stage messages, each epoch's summary) stay on screen above one
  bar for the run in progress (a training run, or caching activations): its name and
  epoch, the batches done, the rate, the elapsed time, the time left and the loss. The
  bar goes when the renderer closes, so an error message starts on a clean row.
- Anywhere else (a pipe, a log under ``nohup``) there is no bar and no escape code: each
  line starts with an ISO 8601 timestamp and its time zone, one per stage and per epoch,
  so a long onboarding in a log is never silent.

rich costs about 50 ms to import: the commands import this module when they train, never
at start-up (``mtreg list`` must not pay for it).
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Column
from rich.text import Text

from mtreg.cli.output import stamp
from mtreg.training.progress import Step

INDENT = "  "


class _Pace(ProgressColumn):
    """Elapsed time, time left and rate, as tqdm shows them: ``[0:00:12<0:00:34, 7.9/s]``
    (batches per second, as rich estimates them over the last few updates)."""

    def render(self, task: Task) -> Text:
        """Return the pace of ``task`` (``?`` for what rich cannot estimate yet)."""
        speed = task.finished_speed or task.speed
        left = task.time_remaining
        return Text(
            f"[{_clock(task.finished_time if task.finished else task.elapsed)}<"
            f"{'?' if left is None else _clock(left)}, "
            f"{'?' if speed is None else f'{speed:.1f}'}/s]"
        )


def _clock(seconds: float | None) -> str:
    """Return ``seconds`` as H:MM:SS (``0:00:00`` before the clock starts)."""
    whole = int(seconds or 0)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class _Loss(ProgressColumn):
    """The mean training loss of the epoch so far (nothing while caching)."""

    def render(self, task: Task) -> Text:
        """Return ``loss 0.4100``, or nothing for a phase that does not train."""
        loss = task.fields.get("loss")
        return Text("" if loss is None else f"loss {loss:.4f}")


def _bars(console: Console) -> Progress:
    """Return the (not yet started) rich progress display drawn on ``console``: on a narrow
    terminal the run's name is cut, never wrapped (a wrapped bar would scroll)."""
    return Progress(
        TextColumn(
            INDENT + "{task.description}",
            table_column=Column(no_wrap=True, overflow="ellipsis", min_width=12),
        ),
        BarColumn(bar_width=12),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        _Pace(table_column=Column(no_wrap=True)),
        _Loss(table_column=Column(no_wrap=True)),
        console=console,
        transient=True,
    )


class Renderer:
    """Progress lines on ``stream``, and a bar per run when it is a terminal.

    Use it as a context manager, or call :meth:`close`, so that a bar still showing when
    training stops (an error, Ctrl-C) is removed before anything else is printed.
    ``bars`` overrides what ``stream.isatty()`` says.
    """

    def __init__(self, stream: TextIO, *, bars: bool | None = None) -> None:
        self.stream = stream
        self.bars = stream.isatty() if bars is None else bars
        self._console = Console(file=stream, force_terminal=True) if self.bars else None
        self._progress: Progress | None = None
        self._run: tuple[str, TaskID] | None = None  # the run the bar shows, and its task

    def __call__(self, line: str) -> None:
        """Write ``line`` on a line of its own: above the bar on a terminal, else with a
        timestamp in front."""
        if self._console is None:
            self.stream.write(f"{stamp()} {line}\n")
            self.stream.flush()
        else:
            self._console.print(INDENT + line, markup=False, highlight=False, soft_wrap=True)

    def step(self, step: Step) -> None:
        """Move the bar of ``step``'s run (starting one for a new run); nothing when the
        stream is not a terminal. The bar spans every epoch of the run, so its time left
        is the run's (it ends sooner when early stopping cuts the run short)."""
        if self._console is None:
            return
        if self._progress is None:
            self._progress = _bars(self._console)
            self._progress.start()
        if self._run is None or self._run[0] != step.run:
            if self._run is not None:
                self._progress.remove_task(self._run[1])
            task = self._progress.add_task(step.title, total=step.batches * step.epochs)
            self._run = (step.run, task)
        self._progress.update(
            self._run[1],
            description=step.title,
            completed=(step.epoch - 1) * step.batches + step.batch,
            loss=step.loss,
        )

    def close(self) -> None:
        """Remove the bar if one is showing."""
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._run = None, None
        self.stream.flush()

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
