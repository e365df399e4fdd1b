"""``mtreg events``: the registry's audit log, newest first, as a table (times with their
time zone) or JSON, filtered by task and limited, on SQLite and on PostgreSQL; a user's
mistake is one line, exit code 1, and the registry unchanged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import Checkpoints, make_branch_file
from harness import Databases, registry_state
from helpers import STAMP, task_spec, write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.cli.main import cli
from mtreg.core.spec import HeadSpec
from mtreg.registry.api import Registry

# What JSON holds: the registry's time in ISO 8601, to the microsecond, with its UTC offset.
ISO = STAMP.replace("[+-]", r"(\.\d+)?[+-]")


@pytest.fixture(scope="module")
def world(
    databases: Databases, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """A registry whose log holds a trunk added, task ``sentiment`` added, upgraded and
    rolled back, the bundles built and ``serving`` set; returns the environment."""
    root = tmp_path_factory.mktemp("events")
    trunk = checkpoints.copy(root / "trunk", num_layers=3, seed=0)
    checkpoint = read_checkpoint(trunk)
    head = HeadSpec("classification", ("neg", "pos"))
    env = {
        "MTREG_HOME": str(root / "home"),
        "MTREG_DATABASE_URL": databases.new(),
        "MTREG_PLUGINS_PATH": str(root / "plugins"),
    }

    def registry() -> Registry:  # a new one per step: a Registry loads plugins once
        return Registry(env["MTREG_DATABASE_URL"], root / "home", [root / "plugins"])

    with registry() as first:
        first.add_trunk("tiny", trunk)
    for version, seed in (("1.0.0", 0), ("1.1.0", 1)):
        weights = root / f"s-{version}.safetensors"
        make_branch_file(weights, checkpoint, "sentiment", version, 2, 1, head, seed=seed)
        write_plugin(root / "plugins", "sentiment", [task_spec("sentiment", weights, version)])
        with registry() as each:
            each.sync()
    with registry() as last:
        last.rollback("sentiment", "1.0.0")
        last.set_alias("serving", "latest")
    return env


def _events(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(cli, ["events", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_json_lists_every_change_newest_first_with_zoned_times(world: dict[str, str]) -> None:
    events = json.loads(_events(world, "--json"))
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "alias.set" and kinds[-1] == "trunk.add"
    assert [k for k in kinds if k.startswith("task.")] == [
        "task.rollback",
        "task.upgraded",
        "task.added",
    ]
    assert kinds.count("bundle.build") >= 2
    assert all(re.fullmatch(ISO, e["at"]) for e in events)
    rollback = events[kinds.index("task.rollback")]
    assert rollback["subject"] == "sentiment"
    assert rollback["detail"] == {"version": "1.0.0", "previous": "1.1.0"}


def test_task_and_limit_filter_the_log(world: dict[str, str]) -> None:
    about = json.loads(_events(world, "--task", "sentiment", "--json"))
    assert {e["subject"] for e in about} == {"sentiment"}
    assert [e["kind"] for e in about] == ["task.rollback", "task.upgraded", "task.added"]
    newest = json.loads(_events(world, "--limit", "2", "--json"))
    assert [e["id"] for e in newest] == [e["id"] for e in json.loads(_events(world, "--json"))][:2]


def test_the_table_shows_times_with_their_zone_and_details_as_pairs(
    world: dict[str, str],
) -> None:
    lines = _events(world, "--task", "sentiment").splitlines()
    assert lines[0].split() == ["ID", "AT", "KIND", "SUBJECT", "BY", "DETAIL"]
    assert len(lines) == 2 + 3
    cells = lines[2].split()
    assert re.fullmatch(STAMP, cells[1]) and cells[2:4] == ["task.rollback", "sentiment"]
    assert lines[2].endswith("previous=1.1.0 version=1.0.0")
    assert lines[4].endswith("previous=null version=1.0.0")


def test_an_empty_log_says_so(databases: Databases, tmp_path: Path) -> None:
    env = {"MTREG_HOME": str(tmp_path / "home"), "MTREG_DATABASE_URL": databases.new()}
    assert CliRunner().invoke(cli, ["init"], env=env).exit_code == 0
    assert _events(env).startswith("no events")
    assert json.loads(_events(env, "--json")) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--task", "nosuch"], 1, "task 'nosuch' is not registered"),
        (["--limit", "0"], 2, "--limit"),
    ],
)
def test_mistakes_are_one_line_and_change_nothing(
    world: dict[str, str], args: list[str], code: int, message: str
) -> None:
    before = registry_state(world["MTREG_DATABASE_URL"], world["MTREG_HOME"])
    done = subprocess.run(
        [sys.executable, "-m", "mtreg", "events", *args],
        env={**os.environ, **world},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code and done.stdout == ""
    assert message in done.stderr and "Traceback" not in done.stderr
    if code == 1:
        assert done.stderr.count("\n") == 1
    assert registry_state(world["MTREG_DATABASE_URL"], world["MTREG_HOME"]) == before
