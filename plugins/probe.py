"""Plugins tried in a short-lived subprocess before mtreg imports them.

In-process isolation (:mod:`mtreg.plugins.isolation`) catches every exception and captures
output, but a plugin that calls ``os._exit``, crashes in native code (a segfault) or hangs
holding the interpreter lock would still take the command down. So the loader first imports
each plugin and runs its ``register_tasks`` hook in a child process (``probe_main`` in
:mod:`mtreg.plugins.loader`), which reports on its stdout, one JSON line each, what it is
about to do and how each plugin ended. A child that dies names the plugin it was running
(exit code or signal); one silent for longer than the limit allows is killed and the plugin
is reported as hung; a fresh child goes on with the plugins left. Only plugins the probe
found healthy are then imported in-process.

The outcome is cached per plugin in the user's cache folder (:data:`USER_CACHE`, under
``$MTREG_CACHE_DIR`` when set: it is a fact about the plugin's files, not about a registry,
and a registry home must not change when a command only reads it), keyed by the identity of
its files (path, size, mtime; an entry point's distribution version), the time limit and the
interpreter, so a command pays for the subprocess only when a plugin changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from mtreg.core.env import PLUGIN_TIMEOUT_ENV, user_cache_dir
from mtreg.plugins.sources import Source

CACHE_FORMAT = 1
CACHE_ENTRIES = 512  # the most recently probed plugins kept (plugin paths come and go)
# Read once per process, when the loader is imported ($MTREG_CACHE_DIR moves it).
USER_CACHE = user_cache_dir() / "plugin-probes.json"
STARTUP_SECONDS = 60.0  # for the child to import mtreg and report in, on a busy machine
GRACE_SECONDS = 10.0  # past the limit, for the child's own guard to report a hang first
CHILD = "from mtreg.plugins.loader import probe_main; probe_main()"

log = logging.getLogger(__name__)


def probe(
    sources: Sequence[Source], paths: Sequence[str | Path], limit: float, cache: Path | None
) -> tuple[dict[str, str], list[str]]:
    """Probe ``sources`` (found through ``paths``) in subprocesses, using and updating the
    cache file ``cache`` (None: no cache).

    Returns:
        ``(broken, warnings)``: source key -> the one-line reason it may not be imported
        (crashed, hung, or failed in the probe), and warnings about the probe itself, also
        logged: it could not start, or ended before it tried some plugins; those are then
        loaded in-process, as without a probe.
    """
    identities = {s.key: f"{s.identity()} limit={limit:g}" for s in sources}
    stamp = f"{sys.executable} {sys.version}"
    cached = _read_cache(cache, stamp)
    outcome: dict[str, str | None] = {
        key: cached[key][1] for key in identities if cached.get(key, ("",))[0] == identities[key]
    }
    todo = [s.key for s in sources if s.key not in outcome]
    warnings: list[str] = []
    if todo:
        try:
            found, ended = _run(todo, [str(p) for p in paths], limit)
        except OSError as exc:
            warnings.append(
                f"the plugin probe could not start ({exc}); plugins were loaded without it"
            )
            log.warning("%s", warnings[-1])
            return {}, warnings
        outcome.update(found)
        if unknown := [key for key in todo if key not in found]:
            # Nothing is known against them: they load in-process, as without a probe, and
            # stay out of the cache so that the next command probes them again. Logged too:
            # only `mtreg plugins` shows a discovery's warnings, and every command loads.
            they = "it was" if len(unknown) == 1 else "they were"
            warnings.append(
                f"the plugin probe {ended} before it tried {', '.join(unknown)}, so {they} "
                f"loaded unprobed: check that `{sys.executable} -c 'import mtreg'` runs"
            )
            log.warning("%s", warnings[-1])
        if cache is not None:
            kept = {k: list(v) for k, v in cached.items() if k not in identities}
            entries = kept | {key: [identities[key], outcome[key]] for key in outcome}
            _write_cache(cache, stamp, dict(list(entries.items())[-CACHE_ENTRIES:]))
    broken = {key: error for key, error in outcome.items() if error is not None}
    return broken, warnings


def _run(keys: list[str], paths: list[str], limit: float) -> tuple[dict[str, str | None], str]:
    """Probe ``keys``, starting a fresh child after each death in a plugin.

    Returns:
        The outcome of each plugin a child tried, and how the last child ended (for the
        plugins it never tried, when it ended outside any plugin).
    """
    outcome: dict[str, str | None] = {}
    ended = "ended"
    while left := [k for k in keys if k not in outcome]:
        key, ended = _child(left, paths, limit, outcome)
        if key is None:
            break
        outcome[key] = ended
    return outcome, ended


def _child(
    keys: list[str], paths: list[str], limit: float, outcome: dict[str, str | None]
) -> tuple[str | None, str]:
    """Run one child over ``keys``, recording each plugin it finishes in ``outcome``.

    Returns:
        The plugin it was running when it died or was killed, and the reason; or None and
        how it ended (``exited with code 0`` when it finished) when it ended between plugins.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a plugin's own children go with it when it is killed
    )
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=_pump, args=(process, lines), daemon=True).start()
    assert process.stdin is not None
    with contextlib.suppress(OSError):
        process.stdin.write(json.dumps({"keys": keys, "paths": paths, "limit": limit}).encode())
        process.stdin.close()
    running: tuple[str, str] | None = None
    wait = STARTUP_SECONDS
    while True:
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            _kill(process)
            if running is None:
                return None, f"was silent for {wait:g} s and was stopped"
            return running[0], (
                f"hung: {running[1]} took longer than {limit:g} s in the plugin probe (the "
                f"limit, {PLUGIN_TIMEOUT_ENV}); fix the plugin or raise the limit"
            )
        if not line:  # the child's stdout closed: it ended
            code = process.wait()
            if running is None:
                return None, _ending(code)
            return running[0], _death(code, running[1])
        try:
            report = json.loads(line)
            report["key"]
        except (ValueError, TypeError, KeyError):
            continue  # not the child's own line: a plugin wrote to its descriptor
        if "doing" in report:
            running, wait = (report["key"], report["doing"]), limit + GRACE_SECONDS
        else:
            outcome[report["key"]] = report.get("error")
            running, wait = None, limit + GRACE_SECONDS


def _pump(process: subprocess.Popen[bytes], lines: queue.Queue[bytes]) -> None:
    """Hand the child's report lines to ``lines``; an empty one means it closed its stdout."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip():
            lines.put(line)
    lines.put(b"")


def _ending(code: int) -> str:
    """Return how a child that ended with ``code`` ended, e.g. ``exited with code 1``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _death(code: int, doing: str) -> str:
    """Return the one-line reason for a child that ended with ``code`` while ``doing``."""
    if code < 0:
        return (
            f"crashed: the process {_ending(code)} while {doing} (a crash in native code?); "
            "mtreg ran it in a probe process and left it out"
        )
    return (
        f"crashed: it ended the process (exit code {code}, os._exit?) while {doing}; "
        "a plugin must raise an exception instead; mtreg ran it in a probe process and left it out"
    )


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _read_cache(cache: Path | None, stamp: str) -> dict[str, tuple[str, str | None]]:
    """Return key -> (identity, error) from ``cache``; nothing when it is missing, unreadable
    or written for another interpreter."""
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT or data.get("stamp") != stamp:
            return {}
        return {str(k): (str(v[0]), v[1]) for k, v in data["plugins"].items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}


def _write_cache(cache: Path, stamp: str, entries: dict[str, list[str | None]]) -> None:
    """Replace ``cache`` atomically; a home that cannot be written just goes without one."""
    data = {"format": CACHE_FORMAT, "stamp": stamp, "plugins": entries}
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=cache.parent, prefix=".probe-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
            os.replace(temporary, cache)
        except OSError:
            Path(temporary).unlink(missing_ok=True)
