"""Interleaved repeats for benchmarks on a noisy machine.

Single sequential runs of the same path differ by 15-20% here, so a benchmark runs every
setting once per repeat, in an order rotated per repeat (``a b c``, ``b c a``, ``c a b``):
drift and a neighbour's load hit all settings alike, and a setting is never always first.
A ratio between two settings is taken per repeat (the two ran minutes apart at most) and
then summarised as its median and range, rather than as a ratio of two medians.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


def count(text: str) -> int:
    """Return ``--repeats`` as an int; raise argparse's error for one below 1 (no round
    would run, and the report would have nothing to compare)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def rotations(names: Sequence[str], repeats: int) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(repeat, order)`` for each of ``repeats`` repeats: ``names`` rotated left by
    the repeat's index."""
    names = list(names)
    for repeat in range(repeats):
        shift = repeat % len(names) if names else 0
        yield repeat, names[shift:] + names[:shift]


@dataclass(frozen=True)
class Spread:
    """The ``median``, ``low`` and ``high`` of a measurement over repeats."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        """Return the spread of ``values``, or None when there are none."""
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values))

    def text(self) -> str:
        """Return it as ``12.3 (11.0-13.1)`` (the range only over several values)."""
        if self.low == self.high:
            return f"{self.median:.1f}"
        return f"{self.median:.1f} ({self.low:.1f}-{self.high:.1f})"

    def ratio_text(self) -> str:
        """Return it as ``1.23x (1.10-1.31)`` (the range only over several values)."""
        if self.low == self.high:
            return f"{self.median:.2f}x"
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


def ratios(values: Sequence[float | None], bases: Sequence[float | None]) -> Spread | None:
    """Return the spread over repeats of ``values[i] / bases[i]`` (repeat by repeat),
    leaving out repeats where either is missing or the base is zero; None when none is
    left."""
    return Spread.of([v / b for v, b in zip(values, bases, strict=True) if v is not None and b])
