"""How commands print: JSON for machines (``--json``), aligned tables for people."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from mtreg.core.text import printable

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON with sorted keys."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def echo_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], empty: str) -> None:
    """Print rows as a left-aligned table, or ``empty`` when there are none.

    Cells are made :func:`~mtreg.core.text.printable`: a name, description or error that
    came from a plugin can neither break the table nor send escapes to the terminal.
    """
    if not rows:
        click.echo(empty)
        return
    body = [["" if v is None else printable(str(v)) for v in r] for r in rows]
    cells = [[str(h) for h in headers], *body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            click.echo("  ".join("-" * w for w in widths))


def echo_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """Print ``name: value`` lines with the names aligned (values made printable)."""
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        click.echo(f"{name.ljust(width)}  {printable(str(value))}")


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
