"""How training reports progress: lines of text, and optionally every batch.

A progress callback is any ``Callable[[str], None]``: it gets one line per event (a stage
message, an epoch's summary). A callback that also has a ``step(Step)`` method
(:class:`StepProgress`) is told about every training batch too, which is what a progress
bar needs; :func:`mtreg.training.loop.train_loop` and the activation cache
(:func:`mtreg.training.job.hidden_states`) look for that method and call it when present
(:func:`batch_reporter`), so a plain function keeps working unchanged. :func:`prefixed`
names a run: its lines and its steps both get the run's name in front.

This module imports neither torch nor click: the CLI imports it at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    """Where a training run is after a batch.

    Attributes:
        run: the run's name, as :func:`prefixed` built it ("" when nobody named it).
        epoch, epochs: the current epoch (1-based) and the run's epoch budget.
        batch, batches: batches done in this epoch (1-based) and batches per epoch.
        loss: the mean training loss over this epoch's batches so far; None for a phase
            that does not train (caching activations), which has one "epoch".
    """

    run: str
    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float | None = None

    @property
    def title(self) -> str:
        """Return the run's name, and the epoch when the step trains."""
        if self.loss is None:
            return self.run
        return _join(self.run, f"epoch {self.epoch}/{self.epochs}").strip()


@runtime_checkable
class StepProgress(Protocol):
    """A progress callback that also follows training batch by batch."""

    def __call__(self, line: str) -> None:
        """Report one line of text."""

    def step(self, step: Step) -> None:
        """Report that a training batch is done."""


def _join(prefix: str, text: str) -> str:
    return f"{prefix} {text}" if text else prefix


@dataclass(frozen=True)
class _Prefixed:
    """Forwards lines and steps to ``progress`` with ``prefix`` in front."""

    progress: Progress
    prefix: str

    def __call__(self, line: str) -> None:
        self.progress(_join(self.prefix, line))

    def step(self, step: Step) -> None:
        # A plain line callback has no use for batches: they stop here.
        if isinstance(self.progress, StepProgress):
            self.progress.step(replace(step, run=_join(self.prefix, step.run)))


def batch_reporter(
    progress: Progress | None, batches: int, *, run: str = "", epoch: int = 1, epochs: int = 1
) -> Callable[[int, float | None], None] | None:
    """Return what tells ``progress`` that batch ``b`` of ``batches`` is done (with the
    mean loss so far, or None outside training), or None when ``progress`` is not a
    :class:`StepProgress`: other listeners hear only of whole epochs and stages."""
    if not isinstance(progress, StepProgress):
        return None
    step = progress.step
    return lambda batch, loss=None: step(Step(run, epoch, epochs, batch, batches, loss))


def prefixed(progress: Progress | None, prefix: str) -> StepProgress | None:
    """Return ``progress`` for the run named ``prefix``: lines become ``f"{prefix} {line}"``
    and steps carry ``prefix`` in their ``run``. Returns None when ``progress`` is None."""
    return None if progress is None else _Prefixed(progress, prefix)
