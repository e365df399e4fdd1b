"""Engines and schema: connecting to the registry database and migrating it with Alembic.

The migrations ship inside the package (``mtreg.migrations``), so an installed mtreg can
create and upgrade its own database; ``alembic.ini`` at the repository root points at the
same directory for developers writing new revisions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from mtreg.core.disk import disk_errors
from mtreg.core.env import DATABASE_ENV
from mtreg.errors import DatabaseError
from mtreg.registry.tables import Base

SchemaState = Literal["empty", "current", "outdated", "newer", "unmanaged"]
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# SQLite waits this long for another writer's lock before giving up (milliseconds).
BUSY_TIMEOUT_MS = 60_000
# PostgreSQL's SQLSTATE for "permission denied" (a role that may not create tables there).
_INSUFFICIENT_PRIVILEGE = "42501"


def make_engine(url: str, create: bool = True) -> sa.Engine:
    """Return an engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys.

    SQLite transactions are begun explicitly, so that a write transaction can take the
    database's write lock up front (``BEGIN IMMEDIATE``, see :mod:`mtreg.registry.store`)
    instead of failing half-way when another process writes. A SQLite file in a folder
    mtreg cannot write (a read-only mount) is opened read-only, so that it can still be
    listed; a write then fails with a one-line error. Without ``create``, a SQLite file in
    a folder that does not exist is refused rather than made (a mistyped ``--db``).

    Raises:
        DatabaseError: the URL cannot be parsed or names a driver that is not installed;
            the SQLite file's folder is missing and ``create`` is False.
        StorageError: the SQLite file's folder cannot be created.
    """
    try:
        parsed = sa.engine.make_url(url)
        file = _sqlite_file(parsed)
        readonly = file is not None and _read_only(file)
        if readonly:
            # immutable: SQLite reads the file without the WAL index it cannot create there;
            # unless a WAL file is there, whose pages an immutable reader would not see.
            immutable = {} if Path(f"{file}-wal").exists() else {"immutable": "1"}
            parsed = parsed.set(
                database=f"file:{file}", query={"uri": "true", "mode": "ro", **immutable}
            )
        elif file is not None:
            if not create and not file.parent.is_dir():
                raise DatabaseError(
                    f"no registry at {mask(url)} (no folder {file.parent}): run `mtreg init` "
                    f"to create it, or check --db or {DATABASE_ENV}"
                )
            with disk_errors(file.parent):
                file.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError, sa.exc.NoSuchModuleError, ValueError) as exc:
        missing = isinstance(exc, ImportError | sa.exc.NoSuchModuleError)
        hint = (
            " (PostgreSQL needs `pip install 'mtreg[postgres]'`)"
            if missing and "postgres" in url
            else ""
        )
        raise DatabaseError(
            f"cannot use database URL {mask(url)}: {exc}{hint}: check --db or {DATABASE_ENV}"
        ) from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_read_only if readonly else _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_file(url: sa.URL) -> Path | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _read_only(path: Path) -> bool:
    # WAL needs to create files beside the database: a folder that refuses them (a read-only
    # mount; for anyone but root, a read-only folder) can only be read.
    return path.is_file() and not os.access(path.parent, os.W_OK)


def _sqlite_read_only(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None


def _sqlite_connect(dbapi_connection, _record) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(connection: sa.Connection) -> None:
    write = connection.get_execution_options().get("mtreg_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def mask(url: str) -> str:
    """Return ``url`` with any password hidden, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        return "<unparseable URL>"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Return an Alembic config for the packaged migrations (bound to ``connection``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Return the newest migration revision this mtreg knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "mtreg ships at least one migration"
    return head


def known_revisions() -> list[str]:
    """Return every migration revision this mtreg knows, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def is_fault(exc: sa.exc.DatabaseError) -> bool:
    """Return True for a database that is unreachable, damaged, read-only or full, as
    opposed to a query the code got wrong (an integrity or programming error, a bug)."""
    denied = getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE
    return denied or isinstance(exc, sa.exc.OperationalError) or type(exc) is sa.exc.DatabaseError


def failure(url: str, exc: sa.exc.DatabaseError, otherwise: str) -> DatabaseError:
    """Return the one-line error for a database fault (see :func:`is_fault`) on ``url``.

    ``otherwise`` says what to do when the fault is neither damage, a read-only file nor
    a full disk; it may use ``{url}`` and ``{reason}``.
    """
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    if getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE:
        what = "refuses this user"
        todo = "grant it the rights mtreg needs (create tables, write) or use another database"
    elif not isinstance(exc, sa.exc.OperationalError):
        # SQLite's "file is not a database", "database disk image is malformed".
        what = "is damaged or not an mtreg registry"
        todo = f"restore it from a backup, or check --home, --db or {DATABASE_ENV}"
    elif "readonly" in reason:
        what, todo = "is read-only", "change the registry where its files are writable"
    elif "full" in reason or "disk I/O" in reason:
        # SQLite says "disk I/O error" when a full disk refuses its WAL index.
        what, todo = "is on a full or failing disk", "free space on that disk and retry"
    else:
        return DatabaseError(otherwise.format(url=url, reason=reason))
    return DatabaseError(f"database {url} {what} ({reason}): {todo}")


@contextmanager
def _connect(engine: sa.Engine) -> Iterator[sa.Connection]:
    # A damaged SQLite file may connect and fail at the first page read: both are covered.
    try:
        with engine.connect() as connection:
            yield connection
    except sa.exc.DatabaseError as exc:
        if not is_fault(exc):
            raise
        otherwise = f"cannot reach database {{url}}: {{reason}}: check --db or {DATABASE_ENV}"
        raise failure(mask(str(engine.url)), exc, otherwise) from None


def current_revision(engine: sa.Engine) -> str | None:
    """Return the database's migration revision, or None for a database mtreg never touched.

    Raises:
        DatabaseError: the database cannot be reached.
    """
    with _connect(engine) as connection:
        return _revision(connection, engine)


def _revision(connection: sa.Connection, engine: sa.Engine) -> str | None:
    try:
        return MigrationContext.configure(connection).get_current_revision()
    except CommandError as exc:
        # Several rows in alembic_version: the table was edited by hand or damaged.
        raise DatabaseError(
            f"database {mask(str(engine.url))} has a damaged alembic_version table ({exc}): "
            "restore it from a backup"
        ) from None


def schema_state(engine: sa.Engine) -> SchemaState:
    """Compare the database's revision with the code's.

    Returns:
        ``empty`` (no tables), ``current``, ``outdated`` (run ``mtreg db upgrade``),
        ``newer`` (written by a newer mtreg) or ``unmanaged`` (tables but no revision).
    """
    # Tables first, then the revision, in one transaction: another process may be creating
    # this database right now, and its tables and revision row commit together. Read in
    # this order, a half-seen creation looks "empty" (and our upgrade then waits for its
    # lock), never "unmanaged".
    with _connect(engine) as connection, connection.begin():
        tables = sa.inspect(connection).get_table_names()
        revision = _revision(connection, engine)
    if revision is None:
        return "unmanaged" if "trunks" in tables else "empty"
    if revision == head_revision():
        return "current"
    return "outdated" if revision in known_revisions() else "newer"


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` in one transaction.

    Raises:
        DatabaseError: unreachable database, a database newer than the code, or an
            unknown target revision.
    """
    if schema_state(engine) == "newer":
        raise DatabaseError(
            f"database revision {current_revision(engine)} is newer than this mtreg "
            f"(head {head_revision()}): upgrade mtreg"
        )
    _run(engine, lambda config: command.upgrade(config, revision))


def downgrade(engine: sa.Engine, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base`` empties the database)."""
    _run(engine, lambda config: command.downgrade(config, revision))


def _run(engine: sa.Engine, operation) -> None:
    with _connect(engine) as connection:
        # SQLite: take the write lock up front (BEGIN IMMEDIATE, see _sqlite_begin). A deferred
        # transaction that reads the revision, then writes, fails at once with "database is
        # locked" when another process is creating the same new database.
        connection.execution_options(mtreg_write=True)
        with connection.begin():
            if connection.dialect.name == "postgresql":
                # Two processes creating one new database must not both run the migrations.
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7291)")
            try:
                operation(alembic_config(connection))
            except CommandError as exc:
                raise DatabaseError(f"migration failed: {exc}") from None


def check(engine: sa.Engine) -> list[str]:
    """Return the differences between the database schema and the code's tables."""
    with _connect(engine) as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "render_as_batch": True}
        )
        return [str(diff) for diff in compare_metadata(context, Base.metadata)]
