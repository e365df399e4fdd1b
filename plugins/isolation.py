"""Plugin code at arm's length: a time limit, its output captured, every exception caught.

A plugin runs in the mtreg process (the tasks it registers hold callables such as
``load_dataset``, which no other process could hand back), so each piece of plugin code (its
import, its hook) runs through :func:`guarded`:

- in a daemon thread that mtreg waits on for at most ``$MTREG_PLUGIN_TIMEOUT`` seconds; one
  that overruns is reported as hung, asked to stop (an exception raised in its thread, which
  ends a busy loop but not a blocking system call) and abandoned;
- with stdout and stderr, Python's streams and the file descriptors beneath them, sent to a
  pipe whose first bytes are kept for the report, so nothing the plugin prints (an ANSI
  escape that clears the screen included) lands in mtreg's output or its ``--json``;
- catching every exception, ``SystemExit`` and ``KeyboardInterrupt`` included, as a one-line
  reason, so a plugin can neither end the command nor change its exit code.

What in-process isolation cannot stop: ``os._exit``, a crash in native code, a hang holding
the interpreter lock, or a thread the plugin itself starts. The loader therefore tries every
plugin in a subprocess first (:mod:`mtreg.plugins.probe`) and imports only those that came
through. :func:`within` is the time limit alone, for plugin code whose output and exceptions
are the caller's to handle (a task's ``load_dataset``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mtreg.core.env import PLUGIN_TIMEOUT_ENV
from mtreg.core.text import printable

T = TypeVar("T")

KEEP_BYTES = 4096  # of a plugin's output, kept for the report; the rest is only counted
REASON_CHARS = 300  # a plugin's error message is cut to this, to stay one readable line


@dataclass
class Guarded(Generic[T]):
    """How a guarded call ended: its value, or the one-line reason it failed, and its output.

    Attributes:
        value: what the call returned (None when it failed).
        error: None, or why it failed: the exception, or that it overran the time limit.
        output: the start of what it wrote to stdout and stderr (decoded, not sanitised).
        written: how many bytes it wrote in all.
    """

    value: T | None = None
    error: str | None = None
    output: str = ""
    written: int = 0


class _Abandoned(BaseException):
    """Raised in the thread of a call that overran its time limit, to end it."""


class Overran(Exception):
    """A call given to :func:`within` was still running when its time limit ran out."""


def within(function: Callable[[], T], limit: float) -> T:
    """Run ``function()`` in a daemon thread and wait for it at most ``limit`` seconds.

    Returns:
        What ``function`` returned.

    Raises:
        Overran: it was still running after ``limit`` seconds; its thread is asked to stop
            (an exception raised in it at its next Python instruction) and abandoned.
        BaseException: whatever ``function`` raised, re-raised here.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = function()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, name="mtreg-plugin", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        _stop(worker)
        raise Overran(f"still running after {limit:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def guarded(function: Callable[[], T], doing: str, limit: float) -> Guarded[T]:
    """Run ``function()`` as plugin code: in a thread, for at most ``limit`` seconds, with
    its output captured. ``doing`` names what it does in messages ("importing it").

    Returns:
        The :class:`Guarded` outcome. Never raises for anything ``function`` does; a real
        Ctrl-C in the waiting thread still propagates.
    """

    def attempt() -> Guarded[T]:
        try:
            return Guarded(value=function())
        except BaseException as exc:
            # Exits and interrupts too: they belong to the plugin, not to the command. The
            # reason is read here, under the time limit: ``str(exc)`` is plugin code too.
            try:
                return Guarded(error=_reason(exc, doing))
            except BaseException:
                return Guarded(error=f"{type(exc).__name__} (raised while {doing})")

    with _captured() as sink:
        try:
            outcome = within(attempt, limit)
        except Overran:
            outcome = Guarded(
                error=f"hung: {doing} took longer than {limit:g} s (the limit, "
                f"{PLUGIN_TIMEOUT_ENV}); fix the plugin or raise the limit"
            )
    outcome.output, outcome.written = sink.text(), sink.size
    return outcome


def _reason(exc: BaseException, doing: str) -> str:
    """Return the one-line reason for ``exc``, which plugin code raised while ``doing``."""
    if isinstance(exc, SystemExit):
        code = printable(repr(exc.code), 40)
        return (
            f"SystemExit: it called sys.exit({code}) while {doing}; "
            "a plugin must raise an exception instead of exiting"
        )
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:
        # A message that cannot be read is left out; the type still names the failure.
        text = ""
    reason = f"{name}: {text}" if text.strip() else name
    if not isinstance(exc, Exception):
        reason += f" (raised while {doing})"
    return printable(reason, REASON_CHARS)


def _stop(worker: threading.Thread) -> None:
    """Raise :class:`_Abandoned` in ``worker`` at its next Python instruction."""
    if worker.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(worker.ident), ctypes.py_object(_Abandoned)
        )


class _Sink:
    """Reads a pipe to its end in a thread, keeping the first bytes and counting the rest."""

    def __init__(self, fd: int) -> None:
        self._fd, self._kept, self.size = fd, bytearray(), 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, name="mtreg-plugin-output", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(self._fd, 65536):
                with self._lock:
                    self._kept += chunk[: max(KEEP_BYTES - len(self._kept), 0)]
                    self.size += len(chunk)
        os.close(self._fd)

    def finish(self) -> None:
        """Wait briefly for the end of the pipe (a process the plugin started may hold it)."""
        self._reader.join(1.0)

    def text(self) -> str:
        """Return the bytes kept, decoded."""
        with self._lock:
            return self._kept.decode("utf-8", errors="replace")


@contextlib.contextmanager
def _captured() -> Iterator[_Sink]:
    """Send stdout and stderr, the streams and the descriptors 1 and 2, to a :class:`_Sink`."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        _flush(stream)
    read_end, write_end = os.pipe()
    sink = _Sink(read_end)
    saved = {fd: _dup(fd) for fd in (1, 2)}
    streams = sys.stdout, sys.stderr
    pipe = open(write_end, "w", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
    try:
        for fd in saved:
            os.dup2(write_end, fd)
        sys.stdout = sys.stderr = pipe
        yield sink
    finally:
        # What the plugin left in the real streams' buffers is its output too.
        for stream in (pipe, sys.__stdout__, sys.__stderr__):
            _flush(stream)
        sys.stdout, sys.stderr = streams
        for fd, copy in saved.items():
            if copy is None:
                os.close(fd)
            else:
                os.dup2(copy, fd)
                os.close(copy)
        with contextlib.suppress(OSError):
            pipe.close()
        sink.finish()


def _dup(fd: int) -> int | None:
    """Return a copy of descriptor ``fd``, or None when it is closed."""
    try:
        return os.dup(fd)
    except OSError:
        return None


def _flush(stream: object) -> None:
    with contextlib.suppress(Exception):
        stream.flush()  # type: ignore[attr-defined]
