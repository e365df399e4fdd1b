"""Plain, immutable records that the store returns. No SQLAlchemy objects leave the store."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any

from mtreg.artifacts.manifest import Manifest, TaskEntry, branch_path
from mtreg.artifacts.release import Release, candidate_path
from mtreg.core.spec import HeadSpec


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict (datetimes in ISO 8601)."""
        return _jsonable(asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class TrunkRecord(_Record):
    name: str
    model_type: str
    num_layers: int
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    objects: dict[str, Any]
    source: str
    created_at: datetime | None = None


@dataclass(frozen=True)
class TaskVersionRecord(_Record):
    task: str
    version: str
    weights_sha256: str
    fork_depth: int
    num_layers: int
    head_kind: str
    labels: list[str]
    inputs: list[str]
    max_length: int
    trunk: str
    trunk_prefix: dict[str, Any]
    description: str = ""
    metric_names: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    plugin: str = ""
    plugin_version: str = ""
    created_at: datetime | None = None

    def manifest_entry(self) -> TaskEntry:
        """Return this version's entry in a bundle manifest.

        Raises:
            MtregError: a head the record holds is not valid (never for a registered one).
        """
        return TaskEntry(
            name=self.task,
            version=self.version,
            head=HeadSpec(self.head_kind, tuple(self.labels)),
            inputs=tuple(self.inputs),
            fork_depth=self.fork_depth,
            num_layers=self.num_layers,
            max_length=self.max_length,
            metrics=self.metrics,
            file=branch_path(self.task),
            sha256=self.weights_sha256,
        )


@dataclass(frozen=True)
class TaskRecord(_Record):
    name: str
    trunk: str
    active_version: str | None
    latest_version: str
    description: str
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def status(self) -> str:
        return "active" if self.active_version is not None else "removed"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "status": self.status}


@dataclass(frozen=True)
class ReleaseRecord(_Record):
    """A task's release under way: its ``candidate`` version and how traffic reaches it."""

    task: str
    candidate: TaskVersionRecord
    mode: str
    percent: float
    key_field: str | None = None
    updated_at: datetime | None = None
    # Why the bundle leaves it out (see mtreg.artifacts.release.release_problem); None: live.
    inert: str | None = None

    def manifest_release(self) -> Release:
        """Return this release's entry in a bundle manifest (its branch under ``candidates/``).

        Raises:
            MtregError: a mode, percent or key field a release cannot hold.
        """
        entry = replace(self.candidate.manifest_entry(), file=candidate_path(self.task))
        return Release(
            candidate=entry, mode=self.mode, percent=self.percent, key_field=self.key_field
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict naming the candidate by its version."""
        return {
            "task": self.task,
            "candidate": self.candidate.version,
            "mode": self.mode,
            "percent": self.percent,
            "key_field": self.key_field,
            "updated_at": _jsonable(self.updated_at),
            "inert": self.inert,
        }


@dataclass(frozen=True)
class BundleRecord(_Record):
    id: str
    trunk: str
    manifest: Manifest
    members: dict[str, str]  # task -> version
    aliases: list[str] = field(default_factory=list)
    created_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict, its manifest as ``manifest.json`` holds it."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _jsonable({**values, "manifest": self.manifest.to_dict()})


@dataclass(frozen=True)
class EventRecord(_Record):
    id: int
    at: datetime
    kind: str
    subject: str
    actor: str
    detail: dict[str, Any]
