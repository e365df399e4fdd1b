"""Migrations with a full registry's data in every table (tests/test_migrations.py covers
the schema itself): for every revision, downgrading to it keeps the rows its tables hold,
upgrading back from it keeps them too, and the registry works afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from factories import Checkpoints, make_branch_file
from helpers import write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.core.spec import HeadSpec
from mtreg.errors import DatabaseError
from mtreg.registry import db
from mtreg.registry.api import Registry

HEAD = ("classification", ("neg", "pos"))


def _rows(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """Every table's column names and rows (values as strings), alembic's own excluded."""
    meta = sa.MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return {
            name: {
                "columns": [c.name for c in table.columns],
                "rows": [dict(row._mapping) for row in conn.execute(table.select())],
            }
            for name, table in meta.tables.items()
            if name != "alembic_version"
        }


def _project(rows: list[dict[str, Any]], columns: list[str]) -> list[tuple[str, ...]]:
    return sorted(tuple(str(row[c]) for c in columns) for row in rows)


def _offer(plugins: Path, tmp: Path, checkpoint, version: str, seed: int) -> None:
    weights = make_branch_file(
        tmp / f"s-{version}.safetensors",
        checkpoint,
        "sentiment",
        version,
        2,
        1,
        HeadSpec(*HEAD),
        seed=seed,
    )
    spec = {"name": "sentiment", "version": version, "head": HEAD, "trunk": "tiny"}
    write_plugin(plugins, "p", [{**spec, "weights": str(weights)}])


@pytest.mark.parametrize("revision", db.known_revisions())
def test_every_revision_round_trips_a_full_registry(
    db_url: str, tmp_path: Path, checkpoints: Checkpoints, revision: str
) -> None:
    trunk = checkpoints.copy(tmp_path / "trunk", num_layers=3)
    checkpoint, plugins = read_checkpoint(trunk), tmp_path / "plugins"
    with Registry(url=db_url, home=tmp_path / "home", plugins_dirs=[plugins]) as registry:
        registry.add_trunk("tiny", trunk)
        for number, version in enumerate(("1.0.0", "1.1.0")):
            _offer(plugins, tmp_path, checkpoint, version, number)
            registry.discover(refresh=True)
            registry.register(["sentiment"], promote=number == 0)
        # A release fills the releases table (revision 0002).
        registry.release("sentiment", "1.0.0", shadow=True)
    engine = db.make_engine(db_url)
    try:
        full = _rows(engine)
        assert all(table["rows"] for table in full.values()), "a table without data"
        db.downgrade(engine, revision)
        assert db.current_revision(engine) == revision
        kept = _rows(engine)
        for name, table in kept.items():
            # Columns a later revision adds are gone; every row and older column stays.
            assert _project(table["rows"], table["columns"]) == _project(
                full[name]["rows"], table["columns"]
            ), name
        db.upgrade(engine)
        assert db.check(engine) == []
        upgraded = _rows(engine)
        for name, table in kept.items():
            assert _project(upgraded[name]["rows"], table["columns"]) == _project(
                table["rows"], table["columns"]
            ), name
    finally:
        engine.dispose()
    # The registry works on the upgraded database: rollback rebuilds from its rows.
    with Registry(url=db_url, home=tmp_path / "home", plugins_dirs=[plugins]) as registry:
        assert registry.bundle("serving").members == {"sentiment": "1.0.0"}
        registry.rollback("sentiment", "1.0.0")
        assert registry.bundle("latest").members == {"sentiment": "1.0.0"}


def test_a_newer_database_is_refused_before_anything_is_read_or_written(
    db_url: str, tmp_path: Path
) -> None:
    with Registry(url=db_url, home=tmp_path / "home") as registry:
        registry.init()
    engine = db.make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    before = _rows(engine)
    for operation in (
        lambda r: r.tasks(),
        lambda r: r.gc(),
        lambda r: r.set_alias("x", "latest"),
    ):
        with (
            Registry(url=db_url, home=tmp_path / "home") as registry,
            pytest.raises(DatabaseError, match="newer mtreg"),
        ):
            operation(registry)
    with pytest.raises(DatabaseError, match="newer than this mtreg"):
        db.upgrade(engine)
    assert _rows(engine) == before
    engine.dispose()
