"""The store: every query and transaction of the registry database lives here.

Callers open a transaction and call methods of :class:`Tx`; they get plain records back
(:mod:`mtreg.registry.records`), never ORM objects, and never build SQL themselves.

Write transactions serialise: on SQLite they begin with ``BEGIN IMMEDIATE`` (the database's
write lock, waited for up to the busy timeout), on PostgreSQL they take a transaction-level
advisory lock. One writer at a time is what keeps "rebuild the bundle, then commit"
consistent when several teams register at once.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from mtreg.artifacts.manifest import Manifest
from mtreg.core.spec import find_version, parse_version
from mtreg.errors import DatabaseError, MtregError
from mtreg.registry import db
from mtreg.registry.records import (
    BundleRecord,
    EventRecord,
    ReleaseRecord,
    TaskRecord,
    TaskVersionRecord,
    TrunkRecord,
)
from mtreg.registry.tables import (
    ACTOR_MAX,
    AliasRow,
    BundleMemberRow,
    BundleRow,
    EventRow,
    ReleaseRow,
    TaskRow,
    TaskVersionRow,
    TrunkRow,
)

# Arbitrary constant naming mtreg's write lock among PostgreSQL advisory locks.
_PG_WRITE_LOCK = 0x6D747265
MIN_PREFIX = 6


class Store:
    """The registry database at ``url``, migrated to the code's schema.

    A new (empty) database is created by running the migrations (without ``create``, a
    SQLite file is created only in a folder that exists). An older one is refused
    until ``mtreg db upgrade`` runs; one written by a newer mtreg is refused outright.

    Raises:
        DatabaseError: unreachable, outdated, newer or unmanaged database.
    """

    def __init__(self, url: str, create: bool = True) -> None:
        self.engine = db.make_engine(url, create)
        self.url = db.mask(url)
        try:
            state = db.schema_state(self.engine)
            if state == "empty":
                db.upgrade(self.engine)
            elif state != "current":
                revision = db.current_revision(self.engine)
                raise DatabaseError(_STATE_MESSAGES[state].format(url=self.url, rev=revision))
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        """Release all pooled connections."""
        self.engine.dispose()

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Tx]:
        """Open a transaction; commit when the block ends, roll back if it raises.

        ``write=True`` takes the registry's write lock first (see the module docstring).

        Raises:
            DatabaseError: the database cannot be reached or the lock not taken in time.
        """
        try:
            with Session(self.engine) as session:
                connection = session.connection(execution_options={"mtreg_write": write})
                if write and connection.dialect.name == "postgresql":
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_WRITE_LOCK)))
                yield Tx(session)
                session.commit()
        except sa.exc.DatabaseError as exc:
            if not db.is_fault(exc):
                raise
            otherwise = "database {url} failed: {reason}: check that it is reachable and retry"
            raise db.failure(self.url, exc, otherwise) from None


_STATE_MESSAGES = {
    "outdated": "database {url} has an older schema than this mtreg: run `mtreg db upgrade`",
    # An unknown revision is what a newer mtreg writes, and also what a damaged table holds.
    "newer": "database {url} was written by a newer mtreg (revision {rev!r} is unknown here): "
    "upgrade mtreg to use it, or restore the database from a backup if it is damaged",
    "unmanaged": "database {url} has tables but no mtreg migration history: use another "
    "database for mtreg, or restore this one from a backup if its alembic_version table "
    "was lost",
}


class Tx:
    """Queries inside one transaction. Every method returns records or None."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: if the block raises, only its own changes are undone."""
        with self.session.begin_nested():
            yield

    # -- trunks -------------------------------------------------------------------------

    def add_trunk(self, record: TrunkRecord) -> None:
        """Insert a trunk. The caller has checked that the name is free."""
        self.session.add(TrunkRow(**_row_values(record, TrunkRow)))
        self.session.flush()

    def get_trunk(self, name: str) -> TrunkRecord | None:
        """Return the trunk called ``name``, or None."""
        row = self._trunk_row(name)
        return _trunk_record(row) if row else None

    def list_trunks(self) -> list[TrunkRecord]:
        """Return every trunk, by name."""
        rows = self.session.scalars(sa.select(TrunkRow).order_by(TrunkRow.name))
        return [_trunk_record(row) for row in rows]

    def _trunk_row(self, name: str) -> TrunkRow | None:
        return self.session.scalars(sa.select(TrunkRow).where(TrunkRow.name == name)).one_or_none()

    # -- tasks and versions ---------------------------------------------------------------

    def get_task(self, name: str) -> TaskRecord | None:
        """Return task ``name`` (removed or not), or None if it was never registered."""
        row = self._task_row(name)
        return self._task_record(row) if row else None

    def list_tasks(self, include_removed: bool = False) -> list[TaskRecord]:
        """Return the tasks by name; removed ones (no active version) only when asked."""
        query = sa.select(TaskRow).order_by(TaskRow.name)
        if not include_removed:
            query = query.where(TaskRow.active_version_id.is_not(None))
        return [self._task_record(row) for row in self.session.scalars(query)]

    def list_versions(self, task: str) -> list[TaskVersionRecord]:
        """Return every version of ``task``, lowest semantic version first."""
        rows = self.session.execute(
            sa.select(TaskVersionRow, TrunkRow.name)
            .join(TaskRow, TaskVersionRow.task_id == TaskRow.id)
            .join(TrunkRow, TaskRow.trunk_id == TrunkRow.id)
            .where(TaskRow.name == task)
        ).all()
        records = [_version_record(version, task, trunk) for version, trunk in rows]
        return sorted(records, key=lambda r: parse_version(r.version))

    def get_version(self, task: str, version: str) -> TaskVersionRecord | None:
        """Return the version of a task that ``version`` names (in any normalised form, see
        :func:`mtreg.core.spec.find_version`), or None."""
        records = self.list_versions(task)
        found = find_version(version, [r.version for r in records])
        return next((r for r in records if r.version == found), None)

    def add_version(self, record: TaskVersionRecord, activate: bool = True) -> None:
        """Insert a task version (creating the task on first use) and activate it.

        Raises:
            MtregError: the record names a trunk that is not registered.
        """
        task = self._task_row(record.task)
        if task is None:
            trunk = self._trunk_row(record.trunk)
            if trunk is None:
                raise MtregError(f"trunk {record.trunk!r} is not registered")
            task = TaskRow(name=record.task, trunk_id=trunk.id)
            self.session.add(task)
            self.session.flush()
        row = TaskVersionRow(task_id=task.id, **_row_values(record, TaskVersionRow))
        self.session.add(row)
        self.session.flush()
        if activate:
            task.active_version_id = row.id
            self.session.flush()

    def set_active(self, task: str, version: str | None) -> None:
        """Serve ``version`` of ``task`` (None: remove it from bundles, keep its history)."""
        row = self._task_row(task)
        assert row is not None, f"set_active on unknown task {task!r}"
        row.active_version_id = None if version is None else self._version_id(row.id, version)
        self.session.flush()

    def active_versions(self, trunk: str) -> list[TaskVersionRecord]:
        """Return the active version of every task on ``trunk``, by task name."""
        rows = self.session.execute(
            sa.select(TaskVersionRow, TaskRow.name)
            .join(TaskRow, TaskRow.active_version_id == TaskVersionRow.id)
            .join(TrunkRow, TaskRow.trunk_id == TrunkRow.id)
            .where(TrunkRow.name == trunk)
            .order_by(TaskRow.name)
        ).all()
        return [_version_record(version, name, trunk) for version, name in rows]

    def _task_row(self, name: str) -> TaskRow | None:
        return self.session.scalars(sa.select(TaskRow).where(TaskRow.name == name)).one_or_none()

    def _version_id(self, task_id: int, version: str) -> int:
        return self.session.scalars(
            sa.select(TaskVersionRow.id).where(
                TaskVersionRow.task_id == task_id, TaskVersionRow.version == version
            )
        ).one()

    def _task_record(self, row: TaskRow) -> TaskRecord:
        trunk = self.session.get(TrunkRow, row.trunk_id)
        versions = self.session.scalars(
            sa.select(TaskVersionRow).where(TaskVersionRow.task_id == row.id)
        ).all()
        latest = max(versions, key=lambda v: parse_version(v.version))
        active = next((v for v in versions if v.id == row.active_version_id), None)
        return TaskRecord(
            name=row.name,
            trunk=trunk.name if trunk else "",
            active_version=active.version if active else None,
            latest_version=latest.version,
            description=(active or latest).description,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    # -- releases ---------------------------------------------------------------------------

    def set_release(self, release: ReleaseRecord) -> None:
        """Start or change the release of ``release.task`` (both registered)."""
        task = self._task_row(release.task)
        assert task is not None, f"release of unknown task {release.task!r}"
        row = self.session.get(ReleaseRow, task.id) or ReleaseRow(task_id=task.id)
        row.candidate_version_id = self._version_id(task.id, release.candidate.version)
        row.mode, row.percent, row.key_field = release.mode, release.percent, release.key_field
        self.session.add(row)
        self.session.flush()

    def delete_release(self, task: str) -> None:
        """End the release of ``task``, if any."""
        row = self._task_row(task)
        if row is not None:
            self.session.execute(sa.delete(ReleaseRow).where(ReleaseRow.task_id == row.id))

    def list_releases(self, trunk: str | None = None) -> list[ReleaseRecord]:
        """Return the releases under way (of tasks on ``trunk``, or all), by task name."""
        query = (
            sa.select(ReleaseRow, TaskVersionRow, TaskRow.name, TrunkRow.name)
            .join(TaskRow, ReleaseRow.task_id == TaskRow.id)
            .join(TaskVersionRow, ReleaseRow.candidate_version_id == TaskVersionRow.id)
            .join(TrunkRow, TaskRow.trunk_id == TrunkRow.id)
            .order_by(TaskRow.name)
        )
        if trunk is not None:
            query = query.where(TrunkRow.name == trunk)
        return [
            ReleaseRecord(
                task=task,
                candidate=_version_record(version, task, trunk_name),
                mode=row.mode,
                percent=row.percent,
                key_field=row.key_field,
                updated_at=row.updated_at,
            )
            for row, version, task, trunk_name in self.session.execute(query).all()
        ]

    # -- bundles and aliases -----------------------------------------------------------------

    def add_bundle(self, record: BundleRecord) -> None:
        """Insert a bundle and its members (task -> version, all registered)."""
        trunk = self._trunk_row(record.trunk)
        assert trunk is not None, f"bundle on unknown trunk {record.trunk!r}"
        self.session.add(
            BundleRow(id=record.id, trunk_id=trunk.id, manifest=record.manifest.to_dict())
        )
        self.session.flush()
        for task, version in sorted(record.members.items()):
            task_row = self._task_row(task)
            assert task_row is not None, f"bundle member {task!r} is not registered"
            self.session.add(
                BundleMemberRow(
                    bundle_id=record.id, task_version_id=self._version_id(task_row.id, version)
                )
            )
        self.session.flush()

    def get_bundle(self, ref: str) -> BundleRecord | None:
        """Return the bundle with id ``ref``, or with a unique id prefix of 6+ characters.

        Raises:
            MtregError: the prefix matches more than one bundle.
        """
        row = self.session.get(BundleRow, ref)
        if row is None and len(ref) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in ref):
            rows = self.session.scalars(
                sa.select(BundleRow).where(BundleRow.id.startswith(ref, autoescape=True)).limit(2)
            ).all()
            if len(rows) > 1:
                raise MtregError(f"bundle id prefix {ref!r} is ambiguous: give more characters")
            row = rows[0] if rows else None
        return self._bundle_record(row) if row else None

    def list_bundles(self) -> list[BundleRecord]:
        """Return every bundle, newest first."""
        rows = self.session.scalars(
            sa.select(BundleRow).order_by(BundleRow.created_at.desc(), BundleRow.id)
        ).all()
        return [self._bundle_record(row) for row in rows]

    def delete_bundle(self, ident: str) -> None:
        """Delete a bundle's rows. The caller has checked that no alias points at it."""
        self.session.execute(sa.delete(BundleMemberRow).where(BundleMemberRow.bundle_id == ident))
        self.session.execute(sa.delete(BundleRow).where(BundleRow.id == ident))

    def set_alias(self, name: str, bundle: str) -> None:
        """Point alias ``name`` at bundle id ``bundle`` (creating the alias if new)."""
        row = self.session.get(AliasRow, name)
        if row is None:
            self.session.add(AliasRow(name=name, bundle_id=bundle))
        elif row.bundle_id != bundle:
            row.bundle_id = bundle
        self.session.flush()

    def get_alias(self, name: str) -> BundleRecord | None:
        """Return the bundle alias ``name`` points at, or None."""
        row = self.session.get(AliasRow, name)
        return self.get_bundle(row.bundle_id) if row else None

    def list_aliases(self) -> dict[str, str]:
        """Return every alias: name -> bundle id."""
        rows = self.session.scalars(sa.select(AliasRow).order_by(AliasRow.name))
        return {row.name: row.bundle_id for row in rows}

    def delete_alias(self, name: str) -> None:
        """Delete alias ``name`` if it exists."""
        self.session.execute(sa.delete(AliasRow).where(AliasRow.name == name))

    def _bundle_record(self, row: BundleRow) -> BundleRecord:
        members = self.session.execute(
            sa.select(TaskRow.name, TaskVersionRow.version)
            .join(TaskVersionRow, TaskVersionRow.task_id == TaskRow.id)
            .join(BundleMemberRow, BundleMemberRow.task_version_id == TaskVersionRow.id)
            .where(BundleMemberRow.bundle_id == row.id)
        ).all()
        aliases = self.session.scalars(
            sa.select(AliasRow.name).where(AliasRow.bundle_id == row.id).order_by(AliasRow.name)
        ).all()
        trunk = self.session.get(TrunkRow, row.trunk_id)
        return BundleRecord(
            id=row.id,
            trunk=trunk.name if trunk else "",
            manifest=Manifest.from_dict(row.manifest),
            members=dict(sorted(members)),
            aliases=list(aliases),
            created_at=row.created_at,
        )

    # -- events ---------------------------------------------------------------------------

    def add_event(self, kind: str, subject: str, detail: dict[str, Any]) -> None:
        """Append to the audit log (committed with the change it describes)."""
        self.session.add(EventRow(kind=kind, subject=subject, actor=_actor(), detail=detail))
        self.session.flush()

    def list_events(
        self, limit: int = 50, subject: str | None = None, kind_prefix: str | None = None
    ) -> list[EventRecord]:
        """Return up to ``limit`` events, newest first, optionally about one subject and of
        the kinds starting with ``kind_prefix``."""
        query = sa.select(EventRow).order_by(EventRow.id.desc()).limit(limit)
        if subject is not None:
            query = query.where(EventRow.subject == subject)
        if kind_prefix is not None:
            query = query.where(EventRow.kind.startswith(kind_prefix, autoescape=True))
        return [
            EventRecord(row.id, row.at, row.kind, row.subject, row.actor, row.detail)
            for row in self.session.scalars(query)
        ]


def _actor() -> str:
    # The user name comes from the environment (LOGNAME, USER): an audit note, cut to fit
    # rather than a reason to refuse the command.
    try:
        return getpass.getuser()[:ACTOR_MAX]
    except (KeyError, OSError):
        return ""


def _trunk_record(row: TrunkRow) -> TrunkRecord:
    return TrunkRecord(**{f.name: getattr(row, f.name) for f in fields(TrunkRecord)})


def _row_values(record: Any, table: type) -> dict[str, Any]:
    """The record's fields that are also columns of ``table`` (ids and timestamps are the
    database's to set)."""
    columns = set(table.__table__.columns.keys()) - {"id", "created_at"}
    return {f.name: getattr(record, f.name) for f in fields(record) if f.name in columns}


def _version_record(row: TaskVersionRow, task: str, trunk: str) -> TaskVersionRecord:
    names = {f.name for f in fields(TaskVersionRecord)} - {"task", "trunk"}
    return TaskVersionRecord(task=task, trunk=trunk, **{n: getattr(row, n) for n in names})
