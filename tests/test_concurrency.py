"""Several processes writing at once, on SQLite and on PostgreSQL: no lost update, every
version recorded, the final bundle holds every task's newest version, and a reader loading
``serving`` all along never sees a partial bundle. The processes are forked children of one
driver (see ``harness.CliPool``), each running the real ``mtreg`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from factories import Checkpoints, make_branch_file
from harness import CliPool, Databases, Step, registry_state
from helpers import write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.core.spec import HeadSpec
from mtreg.registry.api import Registry

# Every test runs real mtreg commands in processes of the pool.
pytestmark = pytest.mark.slow

HEAD = ("classification", ("neg", "pos"))
WRITERS = 4
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")

READER = """
import json, os, sys, time
from mtreg.runtime.bundle import load_bundle
from mtreg.registry.api import Registry

want = json.loads(os.environ["WANT"])
loads, seen, deadline = 0, None, time.monotonic() + 150
with Registry() as registry:
    while time.monotonic() < deadline and seen != want:
        # Checks every file of the bundle against its manifest while loading it.
        bundle = load_bundle("serving", registry=registry)
        seen = {name: task.version for name, task in bundle.manifest.tasks.items()}
        loads += 1
print(json.dumps({"loads": loads, "seen": seen}))
sys.exit(0 if seen == want else 1)
"""


@pytest.fixture(scope="module")
def trunk(checkpoints: Checkpoints) -> Path:
    """The trunk's folder, shared: the tests only read it."""
    return checkpoints.shared(num_layers=3, seed=0)


def _env(url: str, home: Path, plugins: Path | str = "") -> dict[str, str]:
    env = {**os.environ, "MTREG_DATABASE_URL": url, "MTREG_HOME": str(home)}
    env["MTREG_PLUGINS_PATH"] = str(plugins)
    env.pop("MTREG_FAULT", None)
    return env


def test_processes_creating_one_new_database_at_once_all_succeed(
    pool: CliPool, databases: Databases, tmp_path: Path
) -> None:
    """Regression: on SQLite all but one used to fail with "database is locked"."""
    env = _env(databases.new(), tmp_path / "home")
    results = pool.jobs([[Step(env, ("init",))] for _ in range(6)])
    assert [r[0].code for r in results] == [0] * 6, [r[0].stderr for r in results]


def test_concurrent_writers_lose_nothing_and_readers_see_whole_bundles(
    pool: CliPool, databases: Databases, trunk: Path, tmp_path: Path
) -> None:
    url, home = databases.new(), tmp_path / "home"
    checkpoint = read_checkpoint(trunk)
    plugins: dict[tuple[str, str], Path] = {}
    for writer in range(WRITERS):
        name = f"task{writer}"
        for number, version in enumerate(VERSIONS):
            weights = make_branch_file(
                tmp_path / "weights" / f"{name}-{version}.safetensors",
                checkpoint,
                name,
                version,
                1 + writer % 3,  # forks at three depths
                1,
                HeadSpec(*HEAD),
                seed=10 * writer + number,
            )
            plugins[name, version] = tmp_path / "plugins" / f"{name}-{version}"
            spec = {"name": name, "version": version, "head": HEAD, "trunk": "tiny"}
            write_plugin(plugins[name, version], "p", [{**spec, "weights": str(weights)}])
    with Registry(url=url, home=home, plugins_dirs=[plugins["task0", "1.0.0"]]) as registry:
        registry.add_trunk("tiny", trunk)
        registry.register(["task0"], promote=True)  # `serving` exists before the writers
    want = {f"task{w}": VERSIONS[-1] for w in range(WRITERS)}
    jobs = [
        [
            Step(_env(url, home, plugins[f"task{w}", v]), ("register", f"task{w}", "--promote"))
            for v in (VERSIONS if w else VERSIONS[1:])
        ]
        for w in range(WRITERS)
    ]
    reader = Step({**_env(url, home), "WANT": json.dumps(want)}, code=READER)
    results = pool.jobs([*jobs, [reader]], timeout=300)
    for job in results:
        for result in job:
            assert result.code == 0, result.stderr
    assert sum(len(job) for job in jobs) == WRITERS * len(VERSIONS) - 1
    assert json.loads(results[-1][0].stdout)["loads"] >= 1
    with Registry(url=url, home=home) as registry:
        for name in want:
            assert [v.version for v in registry.versions(name)] == list(VERSIONS), name
        latest = registry.bundle("latest")
        assert latest.members == want
        assert "serving" in latest.aliases
        changes = [e for e in registry.events(limit=1000) if e.kind.startswith("task.")]
        assert len(changes) == WRITERS * len(VERSIONS)
    state = registry_state(url, str(home))
    assert state["directories"] == state["bundles"]
