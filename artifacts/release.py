"""The ``releases`` part of a bundle manifest: a task's candidate version beside its stable one.

A task with a release has two branches in one bundle: the stable version (its entry in
``tasks``) and the candidate (its entry here, its branch file under ``candidates/``). Both
fork from the same trunk pass. ``mode`` says how traffic reaches the candidate:

- ``canary``: ``percent`` of the task's rows are answered by the candidate (0: only rows
  that pin its version); with ``key_field`` the split is sticky by that input field.
- ``shadow``: the candidate runs beside the stable version on every row; the stable answers.

:class:`~mtreg.artifacts.manifest.Manifest` reads and writes this part through
:meth:`Release.to_dict` and :meth:`Release.from_dict`; nothing else reads it by key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from mtreg.core.spec import HeadSpec, validate_name
from mtreg.errors import MtregError


class TaskEntry(Protocol):
    """What a release reads of a manifest's task entry (``mtreg.artifacts.manifest.TaskEntry``,
    which imports this module, so it is not imported here)."""

    name: str
    version: str
    head: HeadSpec
    inputs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as ``manifest.json`` holds it."""
        ...


MODES = ("canary", "shadow")
CANDIDATE_SUFFIX = "@candidate"


def candidate_key(task: str) -> str:
    """Return the name the candidate branch of ``task`` runs under in a loaded bundle.

    ``@`` is not allowed in a task name, so it never collides with a task.
    """
    return f"{task}{CANDIDATE_SUFFIX}"


def candidate_path(task: str) -> str:
    """Return the bundle-relative path of the candidate branch file of ``task``."""
    return f"candidates/{task}.safetensors"


def check_percent(percent: object) -> float:
    """Return ``percent`` as a float if it is a number in 0..100.

    Raises:
        MtregError: a bool, a non-number, NaN, or a value outside 0..100.
    """
    if (
        isinstance(percent, bool)
        or not isinstance(percent, int | float)
        or not math.isfinite(percent)
        or not 0 <= percent <= 100
    ):
        raise MtregError(f"canary percent must be a number in 0..100, got {percent!r}")
    return float(percent)


@dataclass(frozen=True, kw_only=True)
class Release:
    """A task's candidate version and how traffic reaches it (see the module docstring)."""

    candidate: TaskEntry
    mode: str
    percent: float = 0.0
    key_field: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MtregError(f"release mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "percent", check_percent(self.percent))
        if self.mode == "shadow" and self.percent:
            raise MtregError("a shadow release answers no traffic: its percent must be 0")
        if self.key_field is not None:
            validate_name(self.key_field, "key field")

    @property
    def task(self) -> str:
        """The task released."""
        return self.candidate.name

    @property
    def mixes(self) -> bool:
        """True when the candidate's answers go out beside the stable one's (a canary share
        above 0): both must then give the same kind of answer."""
        return self.mode == "canary" and self.percent > 0

    def conflict(self, stable: TaskEntry) -> str | None:
        """Return why this release cannot go beside ``stable``, or None when it can.

        A split that mixes answers needs the same head kind and labels; any release that
        runs the candidate on the stable version's rows (a split, shadow) needs the same
        inputs. A candidate reached only by a pin (canary 0) may differ in both.
        """
        candidate = self.candidate
        if self.mixes and candidate.head != stable.head:
            return (
                f"version {candidate.version} of {stable.name!r} has head {_head(candidate)}, "
                f"stable {stable.version} has {_head(stable)}: a split would mix their answers; "
                "release it with --shadow or --canary 0 (pinned requests only)"
            )
        if (self.percent or self.mode == "shadow") and candidate.inputs != stable.inputs:
            return (
                f"version {candidate.version} of {stable.name!r} reads "
                f"{', '.join(candidate.inputs)}, stable {stable.version} reads "
                f"{', '.join(stable.inputs)}: only --canary 0 (pinned requests) can serve it"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        """Return the task's entry in the manifest's ``releases``."""
        return {
            "candidate": self.candidate.to_dict(),
            "mode": self.mode,
            "percent": self.percent,
            "key_field": self.key_field,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], candidate: TaskEntry) -> Release:
        """Return the release :meth:`to_dict` wrote, its candidate entry already parsed.

        Raises:
            MtregError: an unknown mode, a bad percent or key field.
            KeyError, TypeError: a part missing or malformed.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"release of {candidate.name}")
        return cls(
            candidate=candidate,
            mode=data["mode"],
            percent=data["percent"],
            key_field=data["key_field"],
        )


def check_releases(
    tasks: Mapping[str, TaskEntry], releases: Mapping[str, Release]
) -> Mapping[str, Release]:
    """Return ``releases`` sorted by task, read-only, once each fits its stable version.

    Raises:
        MtregError: a release keyed by another task than its candidate's, of a task not in
            ``tasks``, or conflicting with its stable version (:meth:`Release.conflict`).
    """
    for name, release in releases.items():
        stable = tasks.get(name)
        if release.task != name or stable is None:
            raise MtregError(f"release of task {name!r} has no stable version of that task")
        if (why := release.conflict(stable)) is not None:
            raise MtregError(f"release of task {name!r} is refused: {why}")
    return MappingProxyType(dict(sorted(releases.items())))


def live_releases(tasks: Mapping[str, TaskEntry], releases: Sequence[Release]) -> list[Release]:
    """Return the ``releases`` a bundle of stable ``tasks`` can hold.

    A release goes inert, rather than blocking every rebuild of its trunk, when its task was
    removed, its candidate became the stable version, or the stable version changed to one
    it conflicts with (``mtreg releases`` shows why).
    """
    return [r for r in releases if release_problem(tasks, r) is None]


def release_problem(tasks: Mapping[str, TaskEntry], release: Release) -> str | None:
    """Return why ``release`` is inert beside the stable ``tasks``, or None when it is live."""
    stable = tasks.get(release.task)
    if stable is None:
        return "the task is removed"
    if stable.version == release.candidate.version:
        return "the candidate is the stable version"
    return release.conflict(stable)


def _head(entry: TaskEntry) -> str:
    return f"{entry.head.kind} {list(entry.head.labels)}"
