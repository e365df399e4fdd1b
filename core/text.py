"""The two small text formats read in several places: ``A,B`` lists and JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtreg.errors import MtregError


def split_list(text: str) -> list[str]:
    """Return the comma-separated items of ``text``, stripped, blank ones dropped.

    ``" a, b,,"`` gives ``["a", "b"]``; ``""`` gives ``[]``. Repeated items are kept.
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for each non-blank line of a JSON-lines file.

    A leading UTF-8 byte order mark is dropped. Values may be of any JSON type: callers
    check the shape they need.

    Raises:
        MtregError: a line is not valid JSON; the message names the file and line.
        OSError: the file cannot be read.
    """
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MtregError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
            yield number, value
