"""SQLAlchemy tables of the registry. Only :mod:`mtreg.registry.store` queries them.

Every schema change here needs an Alembic revision in ``migrations/versions``; a test
checks that autogenerate finds no difference between these models and the migrations.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from mtreg.core.spec import VERSION_MAX
from mtreg.errors import MtregError

# Named constraints, so that batch migrations on SQLite can find and alter them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


ACTOR_MAX = 200  # characters of the user name an event records


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


@event.listens_for(Base, "before_insert", propagate=True)
@event.listens_for(Base, "before_update", propagate=True)
def check_lengths(_mapper: Any, _connection: Any, row: Base) -> None:
    """Refuse a row holding a string longer than its column, on every database.

    SQLite ignores VARCHAR lengths and PostgreSQL fails with a driver error; this check runs
    inside the flush, so the transaction rolls back and the registry is unchanged.

    Raises:
        MtregError: the column, the length and the limit.
    """
    for column in row.__table__.columns:
        limit = getattr(column.type, "length", None)
        value = getattr(row, column.key, None)
        if limit and isinstance(value, str) and len(value) > limit:
            raise MtregError(
                f"{row.__tablename__}.{column.key} {value[:24]!r}... is {len(value)} "
                f"characters, the registry stores at most {limit}: shorten it"
            )


class TrunkRow(Base):
    __tablename__ = "trunks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    model_type: Mapped[str] = mapped_column(String(32))
    num_layers: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]]
    # {"tokenizer", "config", "embeddings": sha256, "layers": [sha256, ...]}
    fingerprint: Mapped[dict[str, Any]]
    # Object-store ids: {"embeddings", "layers": [...], "pooler" | None, "tokenizer": {file: id}}
    objects: Mapped[dict[str, Any]]
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TaskRow(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    trunk_id: Mapped[int] = mapped_column(ForeignKey("trunks.id"))
    # The version served; NULL once the task is removed (its history stays).
    active_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("task_versions.id", use_alter=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class TaskVersionRow(Base):
    """One registered version of a task. Rows are never updated or deleted."""

    __tablename__ = "task_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    version: Mapped[str] = mapped_column(String(VERSION_MAX))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    fork_depth: Mapped[int] = mapped_column(Integer)
    num_layers: Mapped[int] = mapped_column(Integer)
    head_kind: Mapped[str] = mapped_column(String(16))
    labels: Mapped[list[Any]]
    inputs: Mapped[list[Any]]
    max_length: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, default="")
    metric_names: Mapped[list[Any]]
    # Dev metrics and training summary copied from the weight file's metadata ({} if none).
    metrics: Mapped[dict[str, Any]]
    training: Mapped[dict[str, Any]]
    trunk_prefix: Mapped[dict[str, Any]]
    plugin: Mapped[str] = mapped_column(String(200), default="")
    plugin_version: Mapped[str] = mapped_column(String(VERSION_MAX), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BundleRow(Base):
    """An immutable merged artifact; ``id`` is the sha256 of its manifest."""

    __tablename__ = "bundles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    trunk_id: Mapped[int] = mapped_column(ForeignKey("trunks.id"))
    manifest: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BundleMemberRow(Base):
    __tablename__ = "bundle_members"

    bundle_id: Mapped[str] = mapped_column(ForeignKey("bundles.id"), primary_key=True)
    task_version_id: Mapped[int] = mapped_column(ForeignKey("task_versions.id"), primary_key=True)


class AliasRow(Base):
    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    bundle_id: Mapped[str] = mapped_column(ForeignKey("bundles.id"))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class EventRow(Base):
    """Audit log: one row per change, written in the same transaction as the change."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(200), default="")
    actor: Mapped[str] = mapped_column(String(ACTOR_MAX), default="")
    detail: Mapped[dict[str, Any]]


class ReleaseRow(Base):
    """A task's release under way: a candidate version served beside the active one.

    At most one per task; promoting or rolling back deletes it. Its history is in events.
    """

    __tablename__ = "releases"

    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    candidate_version_id: Mapped[int] = mapped_column(ForeignKey("task_versions.id"))
    mode: Mapped[str] = mapped_column(String(16))
    # The candidate's share of the task's traffic, 0..100 (0 in shadow mode).
    percent: Mapped[float] = mapped_column(Float)
    key_field: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
