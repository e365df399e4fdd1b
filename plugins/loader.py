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
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

import pluggy

from mtreg.core import env
from mtreg.core.env import LOAD_PLUGINS_ENV
from mtreg.core.spec import TaskSpec
from mtreg.core.text import printable
from mtreg.errors import NotFound, PluginError
from mtreg.plugins import hookspecs
from mtreg.plugins.isolation import Guarded, guarded

ENTRY_POINT_GROUP = "mtreg"


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


@dataclass(frozen=True)
class _Loaded:
    """An imported plugin: the object to register, where relative weights live, its version."""

    plugin: object
    base: Path | None
    version: str | None


@dataclass(frozen=True)
class _Source:
    """A plugin found but not imported yet (importing is what may fail)."""

    name: str
    where: str
    version: str | None
    load: Callable[[], _Loaded]


def discover(paths: Sequence[str | Path] = ()) -> Discovery:
    """Find, load and collect every plugin: entry points, ``paths``, ``$MTREG_PLUGINS_PATH``.

    Returns:
        The :class:`Discovery`. Never raises for a broken plugin, a missing path or a clash:
        those are recorded in it (``plugins[i].error``, ``warnings``, ``conflicts``).

    Raises:
        MtregError: ``$MTREG_PLUGIN_TIMEOUT`` is not a number of seconds.
    """
    limit = env.plugin_timeout()
    warnings: list[str] = []
    sources = _entry_point_sources() + _path_sources([*paths, *env.plugins_path()], warnings)
    allowed = env.load_plugins()
    if allowed is not None:
        found = {s.name for s in sources}
        warnings += [
            f"{LOAD_PLUGINS_ENV} names plugin {name!r}, which was not found"
            for name in allowed
            if name not in found
        ]
        sources = [s for s in sources if s.name in allowed]

    plugins: list[PluginInfo] = []
    claims: dict[str, list[tuple[TaskSpec, PluginInfo]]] = {}
    for source in sources:
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


def _load(source: _Source, limit: float, warnings: list[str]) -> tuple[PluginInfo, list[TaskSpec]]:
    """Import one plugin and call its hook, each guarded; a failure becomes its error."""
    info = PluginInfo(source.name, source.version, [], None, source.where)
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

    called = guarded(
        partial(_call_hook, loaded.plugin, register), "running its register_tasks hook", limit
    )
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


def _warn_output(source: _Source, call: Guarded[Any], doing: str, warnings: list[str]) -> None:
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


# -- entry points -------------------------------------------------------------------------


def _entry_point_sources() -> list[_Source]:
    sources = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_ep_key):
        dist = getattr(ep, "dist", None)
        version = getattr(dist, "version", None) if dist is not None else None
        sources.append(
            _Source(ep.name, f"entry point {ep.value}", version, partial(_load_entry_point, ep))
        )
    return sources


def _ep_key(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    return ep.name, ep.value


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> _Loaded:
    plugin = ep.load()
    module = plugin if isinstance(plugin, ModuleType) else sys.modules.get(ep.module)
    file = getattr(module, "__file__", None)
    return _Loaded(plugin, Path(file).parent if file else None, None)


# -- path plugins -------------------------------------------------------------------------


def _path_sources(paths: Sequence[str | Path], warnings: list[str]) -> list[_Source]:
    """Return a source per plugin file or package under ``paths``, each path once."""
    sources: list[_Source] = []
    seen: set[Path] = set()
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = [
                child
                for child in sorted(path.iterdir(), key=lambda p: p.name)
                if not child.name.startswith(("_", "."))
                and (
                    (child.is_file() and child.suffix == ".py")
                    or (child.is_dir() and (child / "__init__.py").is_file())
                )
            ]
        elif path.is_file() and path.suffix == ".py":
            found = [path]
        elif path.exists():
            warnings.append(f"plugin path {path} is neither a .py file nor a directory: skipped")
            continue
        else:
            warnings.append(f"plugin path {path} does not exist: skipped")
            continue
        for location in found:
            if location.resolve() in seen:
                continue
            seen.add(location.resolve())
            name = location.name if location.is_dir() else location.stem
            sources.append(_Source(name, str(location), None, partial(_import_path, location)))
    return sources


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """A source loader that always compiles the file as it is now.

    A plugin rewritten within the same second at the same size (a version bump from 1.0.0 to
    1.1.0) would otherwise run from its stale ``__pycache__`` entry.
    """

    def get_code(self, fullname: str) -> CodeType:
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


def _import_path(location: Path) -> _Loaded:
    """Import a plugin file or package directory under a private module name."""
    package = location.is_dir()
    file = location / "__init__.py" if package else location
    digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", location.name if package else location.stem)
    # Unique per file, so two plugins with one stem in different directories do not collide.
    name = f"mtreg_plugin_{stem}_{digest}"
    _forget(name)
    spec = importlib.util.spec_from_file_location(
        name,
        file,
        loader=_FreshSourceLoader(name, str(file)),
        submodule_search_locations=[str(location)] if package else None,
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses and relative imports look the module up here.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        _forget(name)
        raise
    version = getattr(module, "__version__", None)
    shown = printable(version, 64) if isinstance(version, str) else None
    return _Loaded(module, file.parent, shown)


def _forget(name: str) -> None:
    """Drop ``name`` and its submodules from ``sys.modules`` so the next import re-runs them."""
    for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
        del sys.modules[key]
