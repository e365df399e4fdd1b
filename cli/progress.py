"""Training progress on a terminal: the log of what happened, line by line, under a bar
for the batch the current run is at.

:class:`Renderer` is a :class:`~mtreg.training.progress.StepProgress`: pass it as
``progress=`` to the training functions. On a terminal the bar is redrawn in place with a
carriage return and wiped before each line, so only the lines stay on screen. On anything
else (a pipe, a log file) there is never a bar nor a carriage return: just the lines.
"""

from __future__ import annotations

import os
import time
from typing import TextIO

from mtreg.training.progress import Step

BAR_WIDTH = 10
INTERVAL = 0.1  # seconds between redraws: a fast run must not spend its time drawing
INDENT = "  "


def bar_text(step: Step) -> str:
    """Return the bar of ``step``, e.g. ``teacher-L3-lr0.0002  epoch 2/3 [####----] 45/94
    loss 0.4100`` (without the indent)."""
    filled = BAR_WIDTH * step.batch // step.batches
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return (
        f"{step.run}  epoch {step.epoch}/{step.epochs} [{bar}] {step.batch}/{step.batches}  "
        f"loss {step.loss:.4f}"
    )


def _columns(stream: TextIO) -> int:
    """Return the terminal's width, 80 when the stream cannot tell (a pseudo-terminal
    nobody sized says 0)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


class Renderer:
    """Progress lines on ``stream``, and a bar redrawn in place when it is a terminal.

    Use it as a context manager, or call :meth:`close`, so that a bar still showing when
    training stops (an error, Ctrl-C) is wiped before anything else is printed.
    """

    def __init__(self, stream: TextIO, *, interval: float = INTERVAL) -> None:
        self.stream = stream
        self.interval = interval
        self.bars = stream.isatty()
        self._shown = 0  # characters of the bar on screen; 0 when none is
        self._drawn = -float("inf")  # when the bar was last drawn (time.monotonic)

    def __call__(self, line: str) -> None:
        """Write ``line`` on a line of its own (wiping the bar, which the next step redraws)."""
        self._wipe()
        self.stream.write(f"{INDENT}{line}\n")
        self.stream.flush()

    def step(self, step: Step) -> None:
        """Redraw the bar for ``step``: at most every ``interval`` seconds, but always at
        an epoch's first and last batch. Nothing when the stream is not a terminal."""
        if not self.bars:
            return
        now = time.monotonic()
        if 1 < step.batch < step.batches and now - self._drawn < self.interval:
            return
        self._drawn = now
        # A bar longer than the terminal would wrap, and \r only returns to the last row.
        text = (INDENT + bar_text(step))[: _columns(self.stream) - 1]
        self.stream.write("\r" + text.ljust(self._shown))
        self._shown = len(text)
        self.stream.flush()

    def close(self) -> None:
        """Wipe the bar if one is showing."""
        self._wipe()
        self.stream.flush()

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wipe(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0
