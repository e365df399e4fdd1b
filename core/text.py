"""The small text formats read in several places (``A,B`` lists, JSON lines) and the rule
for a text that can be predicted."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mtreg.errors import MtregError


def split_list(text: str) -> list[str]:
    """Return the comma-separated items of ``text``, stripped, blank ones dropped.

    ``" a, b,,"`` gives ``["a", "b"]``; ``""`` gives ``[]``. Repeated items are kept.
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def printable(text: str, limit: int | None = None) -> str:
    """Return ``text`` safe to print as one line on a terminal.

    Line breaks become spaces and every other non-printable character (an ANSI escape that
    would clear the screen, a NUL, a bell) its Python escape, so text that came from a plugin
    or a file can neither break a one-line message nor drive the terminal. With ``limit``,
    whitespace runs are collapsed and the result is cut to at most ``limit`` characters.
    """
    if limit is not None:
        text = " ".join(text.split())
    safe = "".join(c if c.isprintable() else " " if c in "\r\n" else ascii(c)[1:-1] for c in text)
    if limit is None or len(safe) <= limit:
        return safe
    return safe[: max(limit - 3, 0)] + "..."


def read_jsonl(
    path: Path, on_error: Callable[[int, str], None] | None = None
) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for each non-blank line of a JSON-lines file.

    A leading UTF-8 byte order mark is dropped. Values may be of any JSON type: callers
    check the shape they need. With ``on_error``, a line that is not valid UTF-8 or not
    valid JSON is passed to ``on_error(line number, problem)`` and skipped.

    Raises:
        MtregError: (without ``on_error``) a line is not valid UTF-8 or JSON; the message
            names the file and line.
        OSError: the file cannot be read.
    """
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problem = f"is not valid UTF-8 (byte {exc.start + 1})"
            except json.JSONDecodeError as exc:
                problem = f"is not valid JSON ({exc.msg})"
            else:
                yield number, value
                continue
            if on_error is None:
                raise MtregError(f"{path}:{number} {problem}: fix or remove that line")
            on_error(number, problem)


def text_problem(text: object) -> str | None:
    """Return why ``text`` cannot be predicted, or None when it can.

    The policy, the same for ``mtreg predict``, ``LoadedBundle.predict`` and the server: a
    text is a string holding something other than whitespace (an empty text has nothing to
    classify, so it is refused rather than given an arbitrary answer) that encodes to UTF-8
    (a lone surrogate would fail inside the tokenizer).
    """
    if not isinstance(text, str):
        return f"expected a string, got {'null' if text is None else type(text).__name__}"
    if not text.strip():
        return "empty text: give some text to predict"
    if not is_unicode(text):
        return "text is not valid Unicode (lone surrogate)"
    return None


def is_unicode(text: str) -> bool:
    """Return whether ``text`` encodes to UTF-8: False for a lone surrogate, which would
    fail inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
