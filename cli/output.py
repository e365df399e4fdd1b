"""How commands print: JSON for machines (``--json``), aligned tables for people, and
timestamps with their time zone.

Tables fit the terminal: on one, the widest columns are cut (with an ellipsis) until a row
fits its width; into a pipe or a file every character is kept. This is mtreg's own small
renderer rather than rich's tables because ``mtreg list`` prints one and must start fast.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from mtreg.core.text import printable

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
ELLIPSIS = "…"
MIN_WIDTH = 8  # a cut column keeps at least this many characters (or its header's)
GAP = "  "  # between table columns


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON with sorted keys."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def aware(moment: datetime) -> datetime:
    """Return ``moment`` with a time zone: a naive one is UTC (the registry stores UTC, and
    SQLite gives it back without a zone)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def stamp(moment: datetime | None = None) -> str:
    """Return ``moment`` (default: now, in the local time zone) in ISO 8601 to the second
    with its UTC offset, e.g. ``2026-12-02T08:30:01+00:00`` (naive: see :func:`aware`)."""
    moment = datetime.now().astimezone() if moment is None else aware(moment)
    return moment.isoformat(timespec="seconds")


def cell(value: Any) -> str:
    """Return ``value`` as table or field text, made :func:`~mtreg.core.text.printable`:
    None is empty and a datetime is :func:`stamp`'s, with its time zone."""
    if value is None:
        return ""
    return printable(stamp(value) if isinstance(value, datetime) else str(value))


def terminal_width() -> int | None:
    """Return the width of the terminal stdout writes to, or None when it is not one."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def fit_widths(widths: Sequence[int], floors: Sequence[int], limit: int) -> list[int]:
    """Return column ``widths`` narrowed so that a row (columns joined by two spaces) fits
    in ``limit`` characters: the widest column (above its floor) loses a character at a
    time, and no column goes below its floor, so a row may still exceed a tiny ``limit``."""
    fitted = list(widths)
    excess = sum(fitted) + len(GAP) * (len(fitted) - 1) - limit
    while excess > 0:
        room = [w - min(f, w) for w, f in zip(fitted, floors, strict=True)]
        widest = max(range(len(fitted)), key=lambda i: (room[i], fitted[i]))
        if room[widest] == 0:
            break
        fitted[widest] -= 1
        excess -= 1
    return fitted


def cut(text: str, width: int) -> str:
    """Return ``text``, or its first ``width - 1`` characters and an ellipsis when longer."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def table_lines(
    rows: Sequence[Sequence[Any]], headers: Sequence[str], width: int | None = None
) -> list[str]:
    """Return the lines of a left-aligned table (headers, a rule, the rows) whose rows fit
    in ``width`` characters (None: no limit), long cells cut by :func:`cut`.

    Cells go through :func:`cell`: a name, description or error that came from a plugin
    can neither break the table nor send escapes to the terminal.
    """
    cells = [[str(h) for h in headers], *([cell(v) for v in r] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if width is not None:
        floors = [max(len(h), MIN_WIDTH) for h in cells[0]]
        widths = fit_widths(widths, floors, width)
    lines = []
    for row in cells:
        line = GAP.join(cut(c, w).ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append(line.rstrip())
    lines.insert(1, GAP.join("-" * w for w in widths))
    return lines


def echo_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], empty: str) -> None:
    """Print rows as a table (:func:`table_lines`) fitted to the terminal's width, or
    ``empty`` when there are none."""
    if not rows:
        click.echo(empty)
        return
    for line in table_lines(rows, headers, terminal_width()):
        click.echo(line)


def echo_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """Print ``name  value`` lines with the names aligned (values through :func:`cell`)."""
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        click.echo(f"{name.ljust(width)}  {cell(value)}".rstrip())


def listing(
    as_json: bool,
    records: Sequence[Any],
    headers: Sequence[str],
    row: Callable[[Any], Sequence[Any]],
    empty: str,
) -> None:
    """Print records as JSON (their ``to_dict()``) or as a table of ``row(record)``."""
    if as_json:
        echo_json([r.to_dict() for r in records])
    else:
        echo_table([row(r) for r in records], headers, empty)


def short(sha: str | None, n: int = 12) -> str:
    """Abbreviate a hash for tables."""
    return (sha or "")[:n]
