"""The versioning rules of registration, on plain records (no SQL, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mtreg.core.spec import find_version, parse_version
from mtreg.errors import AlreadyExists, InvalidVersion
from mtreg.registry.records import TaskVersionRecord

Change = Literal["added", "upgraded", "unchanged", "reactivated", "removed", "rolled back"]


@dataclass(frozen=True)
class Decision:
    """What registering one task version does."""

    change: Change
    previous: str | None  # the version active before, if any


def decide(
    candidate: TaskVersionRecord,
    history: Sequence[TaskVersionRecord],
    active: str | None,
) -> Decision:
    """Apply the version rules to a candidate against the task's registered history.

    Returns:
        ``unchanged`` for the same version with the same weights (a no-op, or a
        ``reactivated`` task that had been removed), ``added`` for a first version,
        ``upgraded`` for a newer one.

    Raises:
        AlreadyExists: same version, different weights.
        InvalidVersion: a version not greater than the latest, or a changed label list or
            head kind without a new major version.
    """
    name = candidate.task
    # "1.0.0-rc1" and "1.0.0rc1" are one version: the same weights under both are a no-op.
    found = find_version(candidate.version, [v.version for v in history])
    same = next((v for v in history if v.version == found), None)
    if same is not None:
        if same.weights_sha256 != candidate.weights_sha256:
            raise AlreadyExists(
                f"task {name!r} version {candidate.version} is already registered with "
                f"different weights (sha256 {same.weights_sha256[:12]}, new "
                f"{candidate.weights_sha256[:12]}): bump the task version"
            )
        if active is None:
            return Decision("reactivated", None)
        return Decision("unchanged", active)
    if not history:
        return Decision("added", None)
    latest = max(history, key=lambda v: parse_version(v.version))
    new, old = parse_version(candidate.version), parse_version(latest.version)
    if new <= old:
        raise InvalidVersion(
            f"task {name!r} version {candidate.version} is not greater than the latest "
            f"registered {latest.version}: bump the version (to roll back, use "
            f"`mtreg rollback {name} --to {candidate.version}` on a registered version)"
        )
    head_changed = (candidate.head_kind, list(candidate.labels)) != (
        latest.head_kind,
        list(latest.labels),
    )
    if head_changed and new.major == old.major:
        raise InvalidVersion(
            f"task {name!r} changes its head ({latest.head_kind} {latest.labels} -> "
            f"{candidate.head_kind} {candidate.labels}) in {candidate.version}: a changed "
            f"label list needs a new major version ({old.major + 1}.0.0)"
        )
    return Decision("added" if active is None else "upgraded", active)
