"""What every command shares: the global options and a lazily opened Registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from mtreg.registry.api import Registry


@dataclass
class Context:
    url: str | None
    home: Path | None
    plugins_dirs: tuple[Path, ...]
    debug: bool
    store: str | None = None
    _registry: Registry | None = field(default=None, repr=False)

    @property
    def registry(self) -> Registry:
        """The Registry for this invocation, opened on first use. Only ``mtreg init``
        creates a home's database: a mistyped ``--home`` is an error, not a new registry."""
        if self._registry is None:
            self._registry = self.open_registry()
        return self._registry

    def open_registry(self) -> Registry:
        """Return a new Registry for these options (the server opens one per thread)."""
        from mtreg.registry.api import Registry

        return Registry(self.url, self.home, self.plugins_dirs, create=False, store=self.store)

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()


pass_context = click.make_pass_decorator(Context)
