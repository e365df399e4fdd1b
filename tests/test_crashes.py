"""Crash safety: SIGKILL at every named fault point of register, rebuild (upgrade, rollback),
alias move, gc and trunk add, on SQLite and on PostgreSQL.

After each kill: the served bundle is still whole and still the one served before (unless
the kill came after the commit), the database is consistent, and running the interrupted
command again succeeds; after it and a ``gc`` the registry is exactly where an uninterrupted
run leaves it, with no leftover anywhere. The commands run in forked children of one driver
process (see ``harness.CliPool``); every scenario has its own registry, so they all
run at once.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from factories import Checkpoints, make_branch_file
from harness import CliPool, Databases, Result, Step, registry_state
from helpers import write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.core import faults
from mtreg.core.env import FAULT_ENV
from mtreg.core.spec import HeadSpec
from mtreg.registry.api import Registry

HEAD = ("classification", ("neg", "pos"))


CHECK = (
    "from typing import Any\n"
    + inspect.getsource(registry_state)
    + (
        "import json, os\n"
        "print(json.dumps(registry_state(os.environ['MTREG_DATABASE_URL'], "
        "os.environ['MTREG_HOME'])))\n"
    )
)


@dataclass(frozen=True)
class Scenario:
    """An interrupted command: what is registered first, then the command and its points."""

    name: str
    argv: tuple[str, ...]
    points: tuple[str, ...]
    prepare: tuple[tuple[str, ...], ...] = ()  # versions of sentiment/topic to register first
    offer: tuple[str, ...] = ("sentiment:1.0.0",)  # what the plugin offers for the command


SCENARIOS = [
    Scenario(
        "register",
        ("register", "topic"),
        (
            "objects.incoming",
            "objects.stored",
            "bundle.scratch",
            "bundle.renamed",
            "write.before_commit",
            "write.after_commit",
        ),
        offer=("sentiment:1.0.0", "topic:1.0.0"),
    ),
    Scenario(
        "upgrade-promote",
        ("register", "sentiment", "--promote"),
        ("objects.stored", "bundle.renamed", "write.before_commit", "write.after_commit"),
        offer=("sentiment:1.1.0",),
    ),
    Scenario(
        "rollback",
        ("rollback", "sentiment", "--to", "1.0.0"),
        ("bundle.scratch", "bundle.renamed", "write.before_commit", "write.after_commit"),
        prepare=(("sentiment:1.1.0",), ("sentiment:1.1.0", "topic:1.0.0")),
        offer=("sentiment:1.1.0", "topic:1.0.0"),
    ),
    Scenario(
        "alias-move",
        ("alias", "set", "serving", "latest"),
        ("write.before_commit", "write.after_commit"),
        prepare=(("sentiment:1.1.0",),),
        offer=("sentiment:1.1.0",),
    ),
    Scenario(
        "gc",
        ("gc",),
        ("write.before_commit", "gc.after_commit", "gc.deleting"),
        prepare=(("sentiment:1.1.0",), ("sentiment:1.1.0", "topic:1.0.0")),
        offer=("sentiment:1.1.0", "topic:1.0.0"),
    ),
    Scenario(
        "trunk-add",
        ("trunk", "add", "second", "{TRUNK}"),
        # Same content as trunk "tiny": every object exists already, none is stored anew.
        ("objects.incoming", "write.before_commit"),
    ),
]
PRE_COMMIT = {
    "objects.incoming",
    "objects.stored",
    "bundle.scratch",
    "bundle.renamed",
    "write.before_commit",
}


def test_every_fault_point_is_exercised() -> None:
    used = {point for s in SCENARIOS for point in s.points}
    assert used == set(faults.POINTS)


class Lab:
    """Builds one registry per (scenario, fault point) from shared weight files."""

    def __init__(self, root: Path, databases: Databases, checkpoints: Checkpoints) -> None:
        self.root, self.databases = root, databases
        self.built: dict[str, tuple[str, Path]] = {}
        self.trunk = checkpoints.copy(root / "trunk", num_layers=3, seed=0)
        checkpoint = read_checkpoint(self.trunk)
        self.weights = {}
        for key, depth, seed in (("sentiment:1.0.0", 2, 0), ("sentiment:1.1.0", 2, 1)):
            self.weights[key] = self._branch(checkpoint, key, depth, seed)
        self.weights["topic:1.0.0"] = self._branch(checkpoint, "topic:1.0.0", 3, 2)

    def _branch(self, checkpoint, key: str, depth: int, seed: int) -> Path:
        name, version = key.split(":")
        path = self.root / "weights" / f"{name}-{version}.safetensors"
        head = HeadSpec(*HEAD)
        return make_branch_file(path, checkpoint, name, version, depth, 1, head, seed=seed)

    def offer(self, plugins: Path, keys: tuple[str, ...]) -> None:
        """Make the plugin directory offer exactly these task versions."""
        tasks = []
        for key in keys:
            name, version = key.split(":")
            weights = str(self.weights[key])
            tasks.append(
                {
                    "name": name,
                    "version": version,
                    "head": HEAD,
                    "weights": weights,
                    "trunk": "tiny",
                }
            )
        write_plugin(plugins, "p", tasks)

    def registry(self, label: str, scenario: Scenario) -> dict[str, str]:
        """Create the scenario's starting registry; return its environment.

        The first registry of a scenario is built; the others are copies of it (database
        and home), which is much faster on PostgreSQL.
        """
        home, plugins = self.root / label / "home", self.root / label / "plugins"
        if scenario.name in self.built:
            url, first = self.built[scenario.name]
            shutil.copytree(first, home)
            self.offer(plugins, scenario.offer)
            return self._env(self.databases.copy(url), home, plugins)
        url = self.databases.new()
        self.offer(plugins, ("sentiment:1.0.0",))
        with Registry(url=url, home=home, plugins_dirs=[plugins]) as registry:
            registry.add_trunk("tiny", self.trunk)
            registry.register(["sentiment"], promote=True)
            for keys in scenario.prepare:
                self.offer(plugins, keys)
                registry.discover(refresh=True)
                registry.register([k.split(":")[0] for k in keys])
        self.offer(plugins, scenario.offer)
        self.built[scenario.name] = (url, home)
        return self._env(url, home, plugins)

    @staticmethod
    def _env(url: str, home: Path, plugins: Path) -> dict[str, str]:
        env = {**os.environ, "MTREG_HOME": str(home), "MTREG_DATABASE_URL": url}
        env["MTREG_PLUGINS_PATH"] = str(plugins)
        env.pop("MTREG_FAULT", None)
        return env


@pytest.fixture(scope="module")
def lab(
    databases: Databases, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> Lab:
    return Lab(tmp_path_factory.mktemp("lab"), databases, checkpoints)


def _steps(scenario: Scenario, env: dict[str, str], point: str | None, trunk: Path) -> list[Step]:
    argv = [a.replace("{TRUNK}", str(trunk)) for a in scenario.argv]
    steps = []
    if point is not None:
        steps += [
            Step({**env, FAULT_ENV: point}, argv, keep_going=True),
            Step(env, code=CHECK),  # right after the crash: consistent, bundles whole
            Step(env, ("list",)),  # the next command works
        ]
    return [*steps, Step(env, argv), Step(env, ("gc", "--json"))]


@pytest.mark.slow
def test_sigkill_at_every_fault_point_leaves_a_working_registry(pool: CliPool, lab: Lab) -> None:
    runs: dict[tuple[str, str | None], tuple[dict[str, str], list[Step]]] = {}
    for scenario in SCENARIOS:
        for point in (None, *scenario.points):  # None: the uninterrupted reference run
            label = f"{scenario.name}-{point or 'reference'}"
            env = lab.registry(label, scenario)
            with Registry(url=env["MTREG_DATABASE_URL"], home=env["MTREG_HOME"]) as registry:
                before = {
                    "aliases": {a: b.id for b in registry.bundles() for a in b.aliases},
                    "active": {t.name: t.active_version for t in registry.tasks(True)},
                }
            runs[scenario.name, point] = (env, before)
    jobs = [
        _steps(s, runs[s.name, p][0], p, lab.trunk) for s in SCENARIOS for p in (None, *s.points)
    ]
    results = iter(pool.jobs(jobs))
    survived = 0
    for scenario in SCENARIOS:
        reference = None
        for point in (None, *scenario.points):
            env, before = runs[scenario.name, point]
            outcome: list[Result] = next(results)
            where = f"{scenario.name} at {point}"
            if point is not None:
                assert len(outcome) == 5, f"{where}: {outcome}"
                killed, check, listing = outcome[:3]
                assert killed.code == -signal.SIGKILL, f"{where}: {killed.stderr}"
                assert check.code == 0, f"{where}: {check.stderr}"
                assert listing.code == 0, f"{where}: {listing.stderr}"
                after = json.loads(check.stdout)
                if point in PRE_COMMIT:
                    # Nothing committed: the aliases still name the bundles they named.
                    assert after["aliases"] == before["aliases"], where
                    assert after["active"] == before["active"], where
            rerun, gc = outcome[-2:]
            assert rerun.code == 0, f"{where}: rerun: {rerun.stderr}"
            assert gc.code == 0, f"{where}: gc: {gc.stderr}"
            final = registry_state(env["MTREG_DATABASE_URL"], env["MTREG_HOME"])
            assert final["unreferenced"] == [] and final["incoming"] == [], where
            assert final["directories"] == final["bundles"], f"{where}: leftover directories"
            summary = {k: final[k] for k in ("aliases", "bundles", "active", "versions", "hash")}
            if point is None:
                reference = summary
            else:
                assert summary == reference, f"{where}: ends elsewhere than an uninterrupted run"
                survived += 1
    assert survived == sum(len(s.points) for s in SCENARIOS)


@pytest.mark.slow
def test_gc_never_deletes_a_bundle_rebuilt_while_it_ran(pool: CliPool, lab: Lab) -> None:
    """gc stopped between its commit and its file deletion while a rollback rebuilds the
    very bundle gc doomed (bundles are content-addressed): the bundle must survive."""
    scenario = Scenario("race", (), (), prepare=(("sentiment:1.1.0",),))
    env = lab.registry("gc-race", scenario)
    with Registry(url=env["MTREG_DATABASE_URL"], home=env["MTREG_HOME"]) as registry:
        doomed = registry.bundle("serving").id
    assert pool.run(env, "alias", "set", "serving", "latest").code == 0  # old bundle unaliased
    gc = subprocess.Popen(
        [sys.executable, "-m", "mtreg", "gc", "--json"],
        env={**env, FAULT_ENV: "gc.after_commit:stop"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_stopped(gc.pid)
        rollback = pool.run(env, "rollback", "sentiment", "--to", "1.0.0")
        assert rollback.code == 0, rollback.stderr
    finally:
        os.kill(gc.pid, signal.SIGCONT)
    out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, err
    assert json.loads(out)["bundles"] == [doomed]
    state = registry_state(env["MTREG_DATABASE_URL"], env["MTREG_HOME"])
    assert state["aliases"]["latest"] == doomed  # rebuilt, and still on disk, whole
    served = pool.run(env, "predict", "--bundle", "latest", "fine")
    assert served.code == 0, served.stderr


def _wait_until_stopped(pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} never reached its fault point")


def test_a_refused_write_undoes_its_files_while_holding_the_lock(tmp_path: Path) -> None:
    """Cleanup of a failed write happens before the lock is released: afterwards another
    writer may already have linked the same object or bundle directory."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url=url, home=tmp_path / "home")
    registry.home.root.mkdir(parents=True)
    source = tmp_path / "blob"
    source.write_bytes(b"x" * 100)
    seen = []

    def discard(sha: str) -> None:
        # Another connection must not get the write lock yet.
        import sqlite3

        other = sqlite3.connect(str(tmp_path / "registry.db"), timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            seen.append("unlocked")
        except sqlite3.OperationalError:
            seen.append("locked")
        finally:
            other.close()
        os.unlink(registry.objects.path(sha))

    registry.objects.discard = discard  # type: ignore[method-assign]
    with pytest.raises(RuntimeError), registry._writing() as write:
        write.put_object(source)
        raise RuntimeError("refused")
    registry.close()
    assert seen == ["locked"]
    assert registry.objects.list() == []
