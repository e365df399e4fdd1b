"""Shared fixtures: every registry test runs on a real SQLite file and on a real PostgreSQL
server (a fresh database per test).

PostgreSQL comes from ``MTREG_TEST_POSTGRES_URL`` (a role allowed to create databases;
``.ci/run`` starts one). Without it the PostgreSQL cases are skipped on a workstation and
fail under CI (``CI=true``), so a CI run can never pass without them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "MTREG_TEST_POSTGRES_URL"

# The models here are tiny: a second torch thread gains nothing and, on a loaded machine,
# makes every step wait for a thread that is not scheduled (a test of 9 s took 66 s). Set
# before torch is imported, and inherited by the CLI subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's own registry, plugins and settings out of every test."""
    for name in ("MTREG_DATABASE_URL", "MTREG_PLUGINS_PATH", "MTREG_LOAD_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MTREG_HOME", str(tmp_path / "default-home"))


@pytest.fixture(autouse=True)
def _no_builtin_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide mtreg's own entry points (glue, intent): tests see only the plugins they write."""
    from mtreg.plugins import loader

    real = loader._entry_point_sources
    monkeypatch.setattr(
        loader,
        "_entry_point_sources",
        lambda: [s for s in real() if not s.where.startswith("entry point mtreg.")],
    )


def _postgres_database() -> Iterator[str]:
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} is not set: CI must test against PostgreSQL")
        pytest.skip(f"set {POSTGRES_ENV} to run the PostgreSQL cases")
    name = f"mtreg_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty registry database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        yield from _postgres_database()
