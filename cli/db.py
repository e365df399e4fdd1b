"""``mtreg db upgrade | current | check``: the registry database's schema."""

from __future__ import annotations

import click

from mtreg.artifacts.home import Home
from mtreg.cli.context import Context, pass_context
from mtreg.errors import DatabaseError


@click.group()
def db() -> None:
    """Create, upgrade and check the registry database schema."""


def _engine(ctx: Context, create: bool = False):
    from mtreg.registry.db import make_engine

    home = Home.resolve(ctx.home)
    url = home.database_url(ctx.url)
    if not create:
        home.require_database(url)
    return make_engine(url, create)


@db.command("upgrade")
@click.option("--to", "revision", default="head", show_default=True, help="Target revision.")
@pass_context
def upgrade(ctx: Context, revision: str) -> None:
    """Apply the migrations the database lacks (creates a new database)."""
    from mtreg.registry import db as schema

    engine = _engine(ctx, create=True)
    before = schema.current_revision(engine)
    schema.upgrade(engine, revision)
    after = schema.current_revision(engine)
    click.echo(f"database at {after}" + (" (unchanged)" if before == after else f" (was {before})"))


@db.command("current")
@pass_context
def current(ctx: Context) -> None:
    """Print the database's revision and whether it matches this mtreg."""
    from mtreg.registry import db as schema

    engine = _engine(ctx)
    state = schema.schema_state(engine)
    click.echo(
        f"{schema.current_revision(engine) or '(empty)'} {state} "
        f"(code head {schema.head_revision()})"
    )


@db.command("check")
@pass_context
def check(ctx: Context) -> None:
    """Check that the database schema matches the code; exit 1 if not."""
    from mtreg.registry import db as schema

    engine = _engine(ctx)
    state = schema.schema_state(engine)
    if state != "current":
        raise DatabaseError(f"database schema is {state}: run `mtreg db upgrade`")
    differences = schema.check(engine)
    if differences:
        raise DatabaseError(
            f"database schema differs from the code in {len(differences)} place(s): "
            + "; ".join(differences[:3])
        )
    click.echo("database schema matches the code")


@click.command("init")
@pass_context
def init(ctx: Context) -> None:
    """Create the registry home and database, if they do not exist yet."""
    info = ctx.registry.init()
    click.echo(f"registry home {info['home']}\ndatabase {info['database']} at {info['revision']}")


COMMANDS = [db, init]
