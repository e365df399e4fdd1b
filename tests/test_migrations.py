"""Alembic migrations applied to real databases: create, upgrade with data, downgrade,
and refusal of databases older or newer than the code."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from factories import Checkpoints
from helpers import stamp

from mtreg.errors import DatabaseError
from mtreg.registry import db
from mtreg.registry.api import Registry
from mtreg.registry.store import Store


def test_a_new_database_is_created_at_head_and_matches_the_tables(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert db.current_revision(store.engine) == db.head_revision()
        assert db.schema_state(store.engine) == "current"
        # The migrations and the SQLAlchemy models describe the same schema.
        assert db.check(store.engine) == []
    finally:
        store.close()


@pytest.mark.parametrize("revision", db.known_revisions())
def test_every_revision_upgrades_to_head_keeping_rows(db_url: str, tmp_path, revision) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, revision)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO events (at, kind, subject, actor, detail) "
                "VALUES (CURRENT_TIMESTAMP, 'probe', 'kept', '', '{}')"
            )
        )
    db.upgrade(engine, "head")
    with engine.connect() as conn:
        subjects = conn.execute(sa.text("SELECT subject FROM events")).scalars().all()
    assert subjects == ["kept"]
    engine.dispose()


def test_downgrade_to_base_and_back(db_url: str, tmp_path, checkpoints: Checkpoints) -> None:
    with Registry(url=db_url, home=tmp_path / "home") as registry:
        registry.add_trunk("tiny", checkpoints.copy(tmp_path / "trunk", 2))
    engine = db.make_engine(db_url)
    for revision in reversed(["base", *db.known_revisions()[:-1]]):
        db.downgrade(engine, revision)
        assert db.current_revision(engine) == (None if revision == "base" else revision)
    assert db.schema_state(engine) == "empty"
    db.upgrade(engine)
    assert db.check(engine) == []
    engine.dispose()


def test_a_database_newer_than_the_code_is_refused(db_url: str) -> None:
    Store(db_url).close()
    stamp(db_url, "9999_from_the_future")
    with pytest.raises(DatabaseError, match="newer mtreg"):
        Store(db_url)
    engine = db.make_engine(db_url)
    with pytest.raises(DatabaseError, match="newer than this mtreg"):
        db.upgrade(engine)
    engine.dispose()


def test_an_outdated_database_asks_for_an_upgrade(db_url: str, monkeypatch) -> None:
    Store(db_url).close()
    # Pretend the code has a newer head than the database's revision.
    monkeypatch.setattr(db, "head_revision", lambda: "9999_next")
    with pytest.raises(DatabaseError, match="mtreg db upgrade"):
        Store(db_url)


def test_unreachable_database_is_one_clear_line() -> None:
    with pytest.raises(DatabaseError, match="cannot reach database") as info:
        Store("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
