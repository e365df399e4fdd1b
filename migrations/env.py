"""Alembic environment for mtreg's registry database.

mtreg runs migrations on a connection it opened itself (``config.attributes["connection"]``,
see :mod:`mtreg.registry.db`). Run from the command line (``alembic -c alembic.ini ...``,
for writing a new revision) it connects to ``$MTREG_DATABASE_URL``.
"""

from __future__ import annotations

from alembic import context

from mtreg.core.env import database_url
from mtreg.registry.db import make_engine
from mtreg.registry.tables import Base


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = database_url() or context.config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    with engine.connect() as conn:
        run(conn)
