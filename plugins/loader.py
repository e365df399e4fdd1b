"""Plugin discovery: find task plugins, load each one in isolation, collect their tasks.

Plugins come from installed entry points (group ``mtreg``) and from plugin paths (the
``paths`` given to :func:`discover` plus ``$MTREG_PLUGINS_PATH``); ``$MTREG_LOAD_PLUGINS``
restricts which of them load. Each plugin is imported and its ``register_tasks`` hook called
on its own, each under :func:`~mtreg.plugins.isolation.guarded` (a time limit, output
captured, every exception caught), so a plugin that fails to import, raises or exits in its
hook, hangs, or builds a bad spec is reported, contributes no tasks, and every other plugin
keeps working; one that prints is reported in the warnings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pluggy

from mtreg.core import env
from mtreg.core.env import LOAD_PLUGINS_ENV
from mtreg.core.spec import TaskSpec
from mtreg.core.text import printable
from mtreg.errors import NotFound, PluginError
from mtreg.plugins import hookspecs, sources
from mtreg.plugins.isolation import Guarded, guarded
from mtreg.plugins.probe import USER_CACHE, probe
from mtreg.plugins.sources import Source

HOOK_DOING = "running its register_tasks hook"


@dataclass(frozen=True)
class LoadedTask:
    """A task offered by a plugin, with the plugin it came from."""

    spec: TaskSpec
    plugin: str
    plugin_version: str | None


@dataclass
class PluginInfo:
    """One discovered plugin: its tasks, or the one-line error that disabled it."""

    name: str
    version: str | None
    tasks: list[str]
    error: str | None
    where: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "name": self.name,
            "version": self.version,
            "tasks": list(self.tasks),
            "error": self.error,
            "where": self.where,
        }


@dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes:
        plugins: every plugin that was loaded (or failed to), in discovery order.
        tasks: the tasks on offer by name; a task claimed twice is not among them.
        conflicts: one message per task claimed twice.
        warnings: missing plugin paths, plugins without a hook, unknown allow-list names.
        conflicted: task name -> its conflict message (the source of ``conflicts``).
    """

    plugins: list[PluginInfo]
    tasks: dict[str, LoadedTask]
    conflicts: list[str]
    warnings: list[str]
    conflicted: dict[str, str] = field(default_factory=dict)

    def task(self, name: str) -> LoadedTask:
        """Return the task ``name`` a plugin offers.

        Raises:
            PluginError: two plugins (or one, twice) register ``name``; the message names both.
            NotFound: no plugin offers it; the message names the plugins that failed to load.
        """
        if name in self.conflicted:
            raise PluginError(self.conflicted[name])
        if name not in self.tasks:
            detail = ""
            if self.broken:
                listed = ", ".join(f"{p.name} ({p.error})" for p in self.broken)
                detail = f"; {len(self.broken)} plugin(s) failed to load: {listed}"
            raise NotFound(
                f"no plugin offers task {name!r}{detail}; `mtreg plugins` lists the plugins, "
                "their tasks and errors"
            )
        return self.tasks[name]

    def failures(self) -> list[tuple[str, str]]:
        """Return ``(plugin name, message)`` per broken plugin, then ``(task, message)`` per
        conflict; every message is one line."""
        found = [(p.name, f"plugin {p.name!r} failed to load: {p.error}") for p in self.broken]
        return found + list(self.conflicted.items())

    @property
    def broken(self) -> list[PluginInfo]:
        """Return the plugins that failed to load, in discovery order."""
        return [p for p in self.plugins if p.error]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: ``plugins``, ``tasks``, ``conflicts``, ``warnings``."""
        return {
            "plugins": [p.to_dict() for p in self.plugins],
            "tasks": {
                name: {
                    "plugin": loaded.plugin,
                    "version": loaded.spec.version,
                    "head": loaded.spec.head.to_dict(),
                    "trunk": loaded.spec.trunk,
                    "weights": None if loaded.spec.weights is None else str(loaded.spec.weights),
                }
                for name, loaded in self.tasks.items()
            },
            "conflicts": list(self.conflicts),
            "warnings": list(self.warnings),
        }


def discover(paths: Sequence[str | Path] = (), cache: Path | None = USER_CACHE) -> Discovery:
    """Find, load and collect every plugin: entry points, ``paths``, ``$MTREG_PLUGINS_PATH``.

    Every plugin is first tried in a probe subprocess (:mod:`mtreg.plugins.probe`, its
    outcomes kept in the file ``cache``, by default the user's; None: probe every time); one
    that crashed, hung or failed there is reported and never imported here.

    Returns:
        The :class:`Discovery`. Never raises for a broken plugin, a missing path or a clash:
        those are recorded in it (``plugins[i].error``, ``warnings``, ``conflicts``).

    Raises:
        MtregError: ``$MTREG_PLUGIN_TIMEOUT`` is not a number of seconds.
    """
    limit = env.plugin_timeout()
    warnings: list[str] = []
    searched = [*paths, *env.plugins_path()]
    found = sources.entry_point_sources() + sources.path_sources(searched, warnings)
    allowed = env.load_plugins()
    if allowed is not None:
        names = {s.name for s in found}
        warnings += [
            f"{LOAD_PLUGINS_ENV} names plugin {name!r}, which was not found"
            for name in allowed
            if name not in names
        ]
        found = [s for s in found if s.name in allowed]
    broken, trouble = probe(found, searched, limit, cache)
    warnings += trouble

    plugins: list[PluginInfo] = []
    claims: dict[str, list[tuple[TaskSpec, PluginInfo]]] = {}
    for source in found:
        if source.key in broken:
            info, specs = PluginInfo(source.name, source.version, [], None, source.where), []
            info.error = broken[source.key]
        else:
            info, specs = _load(source, limit, warnings)
        plugins.append(info)
        for spec in specs:
            claims.setdefault(spec.name, []).append((spec, info))

    tasks: dict[str, LoadedTask] = {}
    conflicted: dict[str, str] = {}
    for name in sorted(claims):
        owners = claims[name]
        if len(owners) > 1:
            conflicted[name] = _conflict_message(name, [info for _, info in owners])
        else:
            spec, info = owners[0]
            tasks[name] = LoadedTask(spec, info.name, info.version)
    return Discovery(plugins, tasks, list(conflicted.values()), warnings, conflicted)


def _load(
    source: Source,
    limit: float,
    warnings: list[str],
    note: Callable[[str], None] = lambda doing: None,
) -> tuple[PluginInfo, list[TaskSpec]]:
    """Import one plugin and call its hook, each guarded; a failure becomes its error.
    ``note`` is told what is about to run ("importing it"), for the probe's report."""
    info = PluginInfo(source.name, source.version, [], None, source.where)
    note("importing it")
    imported = guarded(source.load, "importing it", limit)
    _warn_output(source, imported, "importing it", warnings)
    if imported.value is None:
        info.error = imported.error or "importing it gave nothing to register"
        return info, []
    loaded = imported.value
    info.version = info.version or loaded.version
    specs: list[TaskSpec] = []

    def register(spec: TaskSpec) -> None:
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"register() takes a mtreg.TaskSpec, got {type(spec).__name__}")
        specs.append(_resolve_weights(spec, loaded.base))

    note(HOOK_DOING)
    called = guarded(partial(_call_hook, loaded.plugin, register), HOOK_DOING, limit)
    _warn_output(source, called, "running its hook", warnings)
    if called.error is not None:
        # A half-run hook contributes nothing: its tasks might depend on the part that failed.
        info.error = called.error
        return info, []
    if not called.value:
        warnings.append(
            f"plugin {source.name!r} ({source.where}) defines no @mtreg.hookimpl "
            "register_tasks: it offers no tasks"
        )
        return info, []
    info.tasks = list(dict.fromkeys(spec.name for spec in specs))
    return info, list(specs)


def _call_hook(plugin: object, register: Callable[[TaskSpec], None]) -> bool:
    """Call ``plugin``'s ``register_tasks`` alone; return False if it defines none.

    A manager of its own per plugin: a plugin abandoned mid-hook must not share state with
    the next one, and one plugin raising must not stop or hide the others.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(plugin)
    if not manager.hook.register_tasks.get_hookimpls():
        return False
    manager.hook.register_tasks(register=register)
    return True


def _warn_output(source: Source, call: Guarded[Any], doing: str, warnings: list[str]) -> None:
    """Record that the plugin printed while ``doing`` (its output is kept out of mtreg's)."""
    if call.written:
        warnings.append(
            f"plugin {source.name!r} ({source.where}) wrote {call.written} bytes to "
            f"stdout/stderr while {doing}; mtreg kept them out of its output (plugins should "
            f"not print), they began: {printable(call.output, 80)}"
        )


def _resolve_weights(spec: TaskSpec, base: Path | None) -> TaskSpec:
    """Return ``spec`` with a relative ``weights`` path made absolute against ``base``."""
    if spec.weights is None:
        return spec
    weights = spec.weights.expanduser()
    if not weights.is_absolute() and base is not None:
        # Relative to the plugin, not to wherever the user happens to run mtreg from.
        weights = base / weights
    return spec if weights == spec.weights else dataclasses.replace(spec, weights=weights)


def _conflict_message(task: str, owners: list[PluginInfo]) -> str:
    """Return the one-line message for ``task`` registered by several ``owners``."""
    unique = list({id(info): info for info in owners}.values())
    named = [f"{info.name!r} ({info.where})" for info in unique]
    if len(unique) == 1:
        return (
            f"task {task!r} is registered twice by plugin {named[0]}: both copies are ignored; "
            "register it once"
        )
    message = f"task {task!r} is registered by both plugins {named[0]} and {named[1]}"
    if len(unique) > 2:
        return f"{message}, and also by {', '.join(named[2:])}: uninstall or rename all but one"
    return f"{message}: uninstall or rename one"


# -- the probe's child process ---------------------------------------------------------------


def probe_main() -> None:
    """The probe subprocess (:mod:`mtreg.plugins.probe`): read ``{"keys", "paths", "limit"}``
    as JSON on stdin, load each plugin named by a key in turn as :func:`discover` would, and
    write one JSON line before each step (``{"key", "doing"}``) and after each plugin
    (``{"key", "error"}``) to the stdout it started with; then end at once, whatever threads
    or exit handlers the plugins left behind. Returns nothing: it never returns."""
    report = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    # Whatever a plugin writes outside its guarded calls must not garble the report.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    request = json.loads(sys.stdin.read())
    found = sources.entry_point_sources() + sources.path_sources(request["paths"], [])
    by_key = {s.key: s for s in found}
    for key in request["keys"]:
        if key not in by_key:
            continue

        def note(doing: str, key: str = key) -> None:
            report.write(json.dumps({"key": key, "doing": doing}) + "\n")

        info, _ = _load(by_key[key], float(request["limit"]), [], note)
        report.write(json.dumps({"key": key, "error": info.error}) + "\n")
    report.flush()
    os._exit(0)
