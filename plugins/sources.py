"""Where plugins come from: a :class:`Source` per installed entry point or plugin path, how
each one is imported, and the identity of its files (what the probe's cache is keyed by).

Nothing here runs plugin code except :attr:`Source.load`, which the loader calls guarded.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import CodeType, ModuleType

from mtreg.core.text import printable

ENTRY_POINT_GROUP = "mtreg"


@dataclass(frozen=True)
class Loaded:
    """An imported plugin: the object to register, where relative weights live, its version."""

    plugin: object
    base: Path | None
    version: str | None


@dataclass(frozen=True)
class Source:
    """A plugin found but not imported yet (importing is what may fail).

    Attributes:
        key: names the source uniquely (the entry point, or the plugin path resolved).
        identity: returns a string that changes when the plugin's files change.
    """

    name: str
    where: str
    version: str | None
    load: Callable[[], Loaded]
    key: str
    identity: Callable[[], str]


# -- entry points -------------------------------------------------------------------------


def entry_point_sources() -> list[Source]:
    """Return a source per installed entry point of the ``mtreg`` group, sorted by name."""
    sources = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_ep_key):
        dist = getattr(ep, "dist", None)
        version = getattr(dist, "version", None) if dist is not None else None
        key = f"entry point {ep.name} = {ep.value}"
        sources.append(
            Source(
                ep.name,
                f"entry point {ep.value}",
                version,
                partial(_load_entry_point, ep),
                key,
                partial(_entry_point_identity, ep, f"{key} {version}"),
            )
        )
    return sources


def _ep_key(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    return ep.name, ep.value


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Loaded:
    plugin = ep.load()
    module = plugin if isinstance(plugin, ModuleType) else sys.modules.get(ep.module)
    file = getattr(module, "__file__", None)
    return Loaded(plugin, Path(file).parent if file else None, None)


def _entry_point_identity(ep: importlib.metadata.EntryPoint, named: str) -> str:
    """Return the entry point and its distribution's version, with the stat of its module's
    file when the path finder can locate it without importing anything (an editable install
    keeps its version while its code changes)."""
    locations: list[str] | None = None
    spec = None
    for part in ep.module.split("."):
        # PathFinder only looks at files: no parent package's __init__ runs.
        spec = importlib.machinery.PathFinder.find_spec(part, locations)
        if spec is None:
            return named
        locations = list(spec.submodule_search_locations or [])
    origin = spec.origin if spec is not None else None
    return f"{named} {_stat(Path(origin))}" if origin else named


# -- plugin paths -------------------------------------------------------------------------


def path_sources(paths: Sequence[str | Path], warnings: list[str]) -> list[Source]:
    """Return a source per plugin file or package under ``paths``, each path once; a path
    that is missing or not a plugin adds a line to ``warnings``."""
    sources: list[Source] = []
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
            resolved = location.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            name = location.name if location.is_dir() else location.stem
            sources.append(
                Source(
                    name,
                    str(location),
                    None,
                    partial(_import_path, location),
                    str(resolved),
                    partial(_path_identity, resolved),
                )
            )
    return sources


def _path_identity(location: Path) -> str:
    """Return the stat of a plugin file, or of every ``.py`` file of a plugin package."""
    files = sorted(location.rglob("*.py")) if location.is_dir() else [location]
    return ";".join(f"{file}:{_stat(file)}" for file in files)


def _stat(file: Path) -> str:
    try:
        st = os.stat(file)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """A source loader that always compiles the file as it is now.

    A plugin rewritten within the same second at the same size (a version bump from 1.0.0 to
    1.1.0) would otherwise run from its stale ``__pycache__`` entry.
    """

    def get_code(self, fullname: str) -> CodeType:
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


def _import_path(location: Path) -> Loaded:
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
    return Loaded(module, file.parent, shown)


def _forget(name: str) -> None:
    """Drop ``name`` and its submodules from ``sys.modules`` so the next import re-runs them."""
    for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
        del sys.modules[key]
