"""What the registry's write operations report: per-task outcomes, refusals, bundles built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtreg.registry.records import BundleRecord
from mtreg.registry.versioning import Change


@dataclass(frozen=True)
class Refusal:
    """A task that :meth:`Registry.sync` could not register, and why."""

    task: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready dict."""
        return {"task": self.task, "reason": self.reason}


@dataclass(frozen=True)
class Registration:
    """The outcome of registering one task version."""

    task: str
    version: str
    change: Change
    previous: str | None
    plugin: str

    def to_dict(self) -> dict[str, str | None]:
        """Return a JSON-ready dict."""
        return {
            "task": self.task,
            "version": self.version,
            "change": self.change,
            "previous": self.previous,
            "plugin": self.plugin,
        }


@dataclass(frozen=True)
class Changes:
    """What a write command did: per-task outcomes, refusals, the bundles it built, and
    (for sync) the tasks skipped because they have no weights yet."""

    tasks: list[Registration]
    refused: list[Refusal]
    bundles: list[BundleRecord]
    skipped: list[Refusal] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "tasks": [t.to_dict() for t in self.tasks],
            "refused": [r.to_dict() for r in self.refused],
            "bundles": [b.id for b in self.bundles],
            "skipped": [r.to_dict() for r in self.skipped],
        }
