"""The access log: one JSON line per request, written by a thread of its own.

The request path only fills a :class:`RequestNote` and hands a dict to a bounded queue;
turning it into JSON and writing it happen in the writer thread, so a slow disk never
slows an answer. When the writer falls behind, lines are dropped (and counted in
``mtreg_serve_access_log_dropped_total``) rather than making requests wait.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from mtreg.errors import MtregError
from mtreg.serving.metrics import ServeMetrics

STDERR = "-"
QUEUE_LINES = 10_000


def _append(target: str) -> TextIO:
    try:
        return open(target, "a", encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MtregError(
            f"cannot open access log {target} ({reason}): give a writable file, "
            "or - for standard error"
        ) from None


def check_target(target: str) -> None:
    """Check that an access log can be appended to ``target`` (creating the file), before
    a server spends time loading a bundle.

    Raises:
        MtregError: the file cannot be opened for appending (no such folder, no
            permission, a directory in the way).
    """
    if target != STDERR:
        _append(target).close()


@dataclass
class RequestNote:
    """What the handling of one request learnt that only the handler knows: the bundle
    that answered, the task versions asked, the request's inputs and the size of the
    micro-batch(es) they ran in."""

    bundle: str | None = None
    tasks: dict[str, str] = field(default_factory=dict)
    inputs: int = 0
    batch: int = 0

    def entry(self, scope: dict, status: int, seconds: float, arrived: float) -> dict[str, Any]:
        """Return the access log entry of the request of ASGI ``scope``, answered with
        ``status`` after ``seconds``, which arrived at POSIX time ``arrived``."""
        client = scope.get("client")
        return {
            "time": arrived,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(seconds * 1000, 3),
            "tasks": self.tasks,
            "inputs": self.inputs,
            "batch": self.batch,
            "bundle": self.bundle,
            "client": f"{client[0]}:{client[1]}" if client else None,
        }


# Set by the HTTP middleware for each request; the handler it runs (in the same task)
# fills it in. Outside a request it is None.
NOTE: ContextVar[RequestNote | None] = ContextVar("mtreg_request_note", default=None)


def current_note() -> RequestNote:
    """Return the note of the request being handled (a throwaway one outside a request)."""
    note = NOTE.get()
    return note if note is not None else RequestNote()


class AccessLog:
    """Writes access log entries as JSON lines to ``stream`` from a daemon thread.

    Args:
        stream: where lines go. owned: close ``stream`` at :meth:`close` (a file this
            opened, not stderr). metrics: counts the lines dropped.
    """

    def __init__(self, stream: TextIO, owned: bool, metrics: ServeMetrics) -> None:
        self.stream = stream
        self.owned = owned
        self.metrics = metrics
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_LINES)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mtreg-access-log", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, target: str, metrics: ServeMetrics) -> AccessLog:
        """Return an access log appending to file ``target`` (``-``: standard error).

        Raises:
            MtregError: as :func:`check_target`.
        """
        if target == STDERR:
            return cls(sys.stderr, False, metrics)
        return cls(_append(target), True, metrics)

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one request's entry; ``entry["time"]`` is a POSIX timestamp, written as
        ISO 8601 with the local zone. Never blocks: drops the entry if the queue is full."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.metrics.access_dropped.inc()

    def close(self) -> None:
        """Write what is queued, stop the thread, close the file (if this opened it)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)
        if self.owned:
            self.stream.close()

    def _loop(self) -> None:
        while (entry := self._queue.get()) is not None:
            stamp = datetime.fromtimestamp(entry["time"]).astimezone()
            entry["time"] = stamp.isoformat(timespec="milliseconds")
            try:
                self.stream.write(json.dumps(entry, separators=(",", ":")) + "\n")
                if self._queue.empty():
                    self.stream.flush()
            except OSError:  # the disk filled or the file went away: keep serving
                self.metrics.access_dropped.inc()
