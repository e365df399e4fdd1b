"""Per-task releases: a candidate version served beside a task's stable (active) one.

``mtreg release TASK VERSION --canary P`` / ``--shadow`` starts or changes a release,
``--promote`` makes the candidate the stable version, ``--rollback`` ends the release (or,
right after a promotion, re-activates the version it replaced). Each is one write
transaction: the ``releases`` row, an event (the history), and the trunk's bundle rebuilt
with the candidate's branch beside the stable one (:mod:`mtreg.artifacts.release`).

The rebuilt bundle becomes ``latest``; ``serving`` follows it when it pointed at the bundle
``latest`` named before, so a served registry picks the release up by hot reload while a
``serving`` alias held back on purpose (unpromoted registrations) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from mtreg.artifacts.release import check_percent, release_problem
from mtreg.core.spec import validate_name
from mtreg.errors import MtregError, NotFound
from mtreg.registry.lookup import require_task
from mtreg.registry.records import BundleRecord, ReleaseRecord, TaskVersionRecord
from mtreg.registry.writing import rebuild_bundle

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from mtreg.registry.records import EventRecord, TaskRecord
    from mtreg.registry.store import Store, Tx
    from mtreg.registry.writing import Write

Action = Literal["canary", "shadow", "promote", "rollback"]
EVENT_PREFIX = "release."


@dataclass(frozen=True)
class ReleaseAsk:
    """One release command: what to do, to which candidate version, with what split."""

    action: Action
    version: str | None = None
    percent: float = 0.0
    key_field: str | None = None

    @classmethod
    def parse(
        cls,
        version: str | None,
        canary: float | None,
        shadow: bool,
        promote: bool,
        rollback: bool,
        key_field: str | None,
    ) -> ReleaseAsk:
        """Return the one action the arguments ask for.

        Raises:
            MtregError: no action or several, a missing or superfluous VERSION, a percent
                outside 0..100, or a key field without a canary.
        """
        asked = {"canary": canary is not None, "shadow": shadow}
        asked |= {"promote": promote, "rollback": rollback}
        chosen = [name for name, on in asked.items() if on]
        if len(chosen) != 1:
            raise MtregError(
                "say what to do with one of --canary PERCENT, --shadow, --promote, --rollback"
            )
        action: Action = chosen[0]  # type: ignore[assignment]
        if action in ("canary", "shadow") and version is None:
            raise MtregError(f"--{action} needs the candidate VERSION to release")
        if action in ("promote", "rollback") and version is not None:
            raise MtregError(f"--{action} takes no VERSION: it acts on the release under way")
        if key_field is not None and action != "canary":
            raise MtregError("--key-field goes with --canary: it makes the split sticky")
        if key_field is not None:
            validate_name(key_field, "key field")
        percent = check_percent(canary) if canary is not None else 0.0
        return cls(action, version, percent, key_field)


@dataclass(frozen=True)
class ReleaseOutcome:
    """What a release command did (or, with ``dry_run``, would do).

    ``stable`` and ``candidate`` are the task's versions afterwards (``candidate`` None once
    the release ended); ``previous`` is the stable version before; ``ended`` the candidate
    a promotion or roll-back took out of the bundle; ``bundle`` the bundle built (None for
    a dry run).
    """

    task: str
    action: Action
    stable: str
    candidate: str | None
    previous: str
    mode: str | None = None
    percent: float = 0.0
    key_field: str | None = None
    ended: str | None = None
    bundle: BundleRecord | None = None
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (the bundle by its id and aliases)."""
        bundle = self.bundle
        return {
            "task": self.task,
            "action": self.action,
            "stable": self.stable,
            "candidate": self.candidate,
            "previous": self.previous,
            "mode": self.mode,
            "percent": self.percent,
            "key_field": self.key_field,
            "ended": self.ended,
            "bundle": None if bundle is None else {"id": bundle.id, "aliases": bundle.aliases},
            "dry_run": self.dry_run,
        }


def apply_release(write: Write, task: str, ask: ReleaseAsk, dry_run: bool) -> ReleaseOutcome:
    """Do ``ask`` to ``task`` inside ``write`` and rebuild its trunk's bundle.

    Raises:
        NotFound: an unknown task or version. MtregError: a removed task, a candidate that
            is the stable version or conflicts with it, nothing to promote or roll back.
    """
    record = require_task(write.tx, validate_name(task))
    if record.active_version is None:
        raise MtregError(
            f"task {task!r} is removed: re-activate it with `mtreg rollback {task} --to VERSION`"
        )
    step = {"promote": _promote, "rollback": _roll_back}.get(ask.action, _start)
    if dry_run:
        # The step runs in full, so a dry run refuses what the real one would; its writes
        # are undone with the savepoint.
        try:
            with write.tx.savepoint():
                raise _Undo(step(write, record, ask))
        except _Undo as undone:
            return replace(undone.outcome, dry_run=True)
    outcome = step(write, record, ask)
    write.tx.add_event(f"{EVENT_PREFIX}{ask.action}", task, _detail(outcome))
    return replace(outcome, bundle=rebuild_following(write, record.trunk))


class _Undo(Exception):
    """Leaves a dry run's savepoint, rolling it back, with the outcome it computed."""

    def __init__(self, outcome: ReleaseOutcome) -> None:
        super().__init__(outcome.task)
        self.outcome = outcome


def current_release(write: Write, task: str) -> ReleaseRecord | None:
    """Return the release of ``task`` under way, or None."""
    return next((r for r in write.tx.list_releases() if r.task == task), None)


def _start(write: Write, record: TaskRecord, ask: ReleaseAsk) -> ReleaseOutcome:
    tx, task = write.tx, record.name
    stable = _version(write, task, str(record.active_version))
    candidate = _version(write, task, str(ask.version))
    if candidate.version == stable.version:
        raise MtregError(
            f"{task} {candidate.version} is the stable version already: release another one "
            f"(`mtreg versions {task}` lists them)"
        )
    mode = "shadow" if ask.action == "shadow" else "canary"
    release = ReleaseRecord(task, candidate, mode, ask.percent, ask.key_field)
    conflict = release.manifest_release().conflict(stable.manifest_entry())
    if conflict is not None:
        raise MtregError(conflict)
    tx.set_release(release)
    return ReleaseOutcome(
        task, ask.action, stable.version, candidate.version, stable.version, mode,
        ask.percent, ask.key_field,
    )  # fmt: skip


def _promote(write: Write, record: TaskRecord, ask: ReleaseAsk) -> ReleaseOutcome:
    release = current_release(write, record.name)
    if release is None:
        raise MtregError(
            f"task {record.name!r} has no release under way to promote: start one with "
            f"`mtreg release {record.name} VERSION --canary 5`"
        )
    write.tx.set_active(record.name, release.candidate.version)
    write.tx.delete_release(record.name)
    version = release.candidate.version
    return ReleaseOutcome(
        record.name, "promote", version, None, str(record.active_version), ended=version
    )


def _roll_back(write: Write, record: TaskRecord, ask: ReleaseAsk) -> ReleaseOutcome:
    task, stable = record.name, str(record.active_version)
    release = current_release(write, task)
    if release is not None:
        write.tx.delete_release(task)
        ended = release.candidate.version
        return ReleaseOutcome(task, "rollback", stable, None, stable, ended=ended)
    last = next(
        (e for e in write.tx.list_events(subject=task) if e.kind.startswith(EVENT_PREFIX)), None
    )
    if last is None or last.kind != f"{EVENT_PREFIX}promote" or last.detail["stable"] != stable:
        raise MtregError(
            f"task {task!r} has no release under way and was not just promoted: nothing to "
            f"roll back (`mtreg rollback {task} --to VERSION` re-activates any version)"
        )
    write.tx.set_active(task, last.detail["previous"])
    return ReleaseOutcome(task, "rollback", last.detail["previous"], None, stable)


def _inert(tx: Tx, release: ReleaseRecord) -> str | None:
    """Return why the bundle leaves ``release`` out, or None when it serves it."""
    active = require_task(tx, release.task).active_version
    stable = None if active is None else tx.get_version(release.task, active)
    tasks = {} if stable is None else {release.task: stable.manifest_entry()}
    return release_problem(tasks, release.manifest_release())


def _version(write: Write, task: str, version: str) -> TaskVersionRecord:
    found = write.tx.get_version(task, version)
    if found is None:
        registered = ", ".join(v.version for v in write.tx.list_versions(task))
        raise NotFound(
            f"task {task!r} has no version {version!r}: registered versions are {registered}"
        )
    return found


def _detail(outcome: ReleaseOutcome) -> dict[str, Any]:
    detail = outcome.to_dict()
    del detail["task"], detail["action"], detail["bundle"], detail["dry_run"]
    return detail


def rebuild_following(write: Write, trunk: str) -> BundleRecord:
    """Rebuild ``trunk``'s bundle; move ``serving`` too when it pointed where ``latest`` did.

    Returns:
        The bundle built (with its aliases).
    """
    tx = write.tx
    latest, serving = tx.get_alias("latest"), tx.get_alias("serving")
    follow = latest is not None and serving is not None and latest.id == serving.id
    ident = rebuild_bundle(write, trunk)
    if follow and serving is not None and serving.id != ident:
        tx.set_alias("serving", ident)
        tx.add_event("alias.set", "serving", {"bundle": ident})
    bundle = tx.get_bundle(ident)
    assert bundle is not None, "a bundle just built is recorded"
    write.bundles[trunk] = bundle
    return bundle


class Releasing:
    """The release operations of :class:`mtreg.Registry` (kept here, by topic)."""

    # What the Registry provides: its store, and its write transactions.
    store: Store
    _writing: Callable[[], AbstractContextManager[Write]]

    def release(
        self,
        task: str,
        version: str | None = None,
        *,
        canary: float | None = None,
        shadow: bool = False,
        key_field: str | None = None,
        promote: bool = False,
        rollback: bool = False,
        dry_run: bool = False,
    ) -> ReleaseOutcome:
        """Start or change a release of ``task`` (``version`` with ``canary`` percent or
        ``shadow``), ``promote`` its candidate, or ``rollback``; then rebuild the bundle
        (see :mod:`mtreg.registry.releases`).

        Returns:
            What changed, and the bundle built (None with ``dry_run``, which writes nothing).

        Raises:
            NotFound: an unknown task or version. MtregError: arguments asking for no action
                or several, a percent outside 0..100, a candidate that is the stable version
                or whose head, labels or inputs a split would mix, nothing to promote or roll
                back; nothing is written.
        """
        ask = ReleaseAsk.parse(version, canary, shadow, promote, rollback, key_field)
        with self._writing() as write:
            return apply_release(write, task, ask, dry_run)

    def releases(self, task: str | None = None) -> list[ReleaseRecord]:
        """Return the releases under way (of ``task``, or all), by task.

        Raises:
            NotFound: ``task`` was never registered.
        """
        with self.store.transaction() as tx:
            if task is not None:
                require_task(tx, task)
            found = [r for r in tx.list_releases() if task in (None, r.task)]
            return [replace(r, inert=_inert(tx, r)) for r in found]

    def release_history(self, task: str | None = None, limit: int = 50) -> list[EventRecord]:
        """Return the release events (of ``task``, or all), newest first."""
        with self.store.transaction() as tx:
            return tx.list_events(limit=limit, subject=task, kind_prefix=EVENT_PREFIX)
