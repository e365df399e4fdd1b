"""Many tasks onboarded at once (``mtreg onboard A B C``, ``--all``, ``--engine ray``): on a
real Ray, each task a Ray task, side by side; one task's failure reported in one line without
stopping the others; the same choices as one after another; a worker killed mid-onboarding
(SIGKILL by its PID) retried by Ray and resumed after the runs it had finished.

Ray rewrites 127.0.0.1 to the host's address, so every Ray here runs inside a private network
namespace (``unshare --net``, loopback only) and a private PID namespace (``--pid --fork
--mount-proc``): when the command ends, everything it started in there ends with it, and
nothing outside is touched (never ``ray stop``, which kills by name machine-wide).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from factories import Checkpoints
from helpers import LOOPBACK_UP, ray_tmpdir, require_namespaces, unshare
from object_stores import object_server

from mtreg.cli.main import cli
from mtreg.registry.api import Registry
from mtreg.training.onboard import onboard
from mtreg.training.settings import Settings

PLUGIN = textwrap.dedent(
    """
    import random

    import mtreg

    POS = ["good", "great", "love", "excellent", "fun", "fine"]
    NEG = ["bad", "awful", "hate", "terrible", "boring", "slow"]
    FILLER = ["the", "movie", "film", "book", "service", "food", "it", "this", "was", "is"]


    def sentiment(seed):
        def load(split):
            rng = random.Random(seed * 10 + {"train": 0, "dev": 1}[split])
            for i in range({"train": 64, "dev": 16}[split]):
                label = "positive" if i % 2 == 0 else "negative"
                words = rng.sample(FILLER, 3)
                words.insert(rng.randrange(4), rng.choice(POS if i % 2 == 0 else NEG))
                yield {"text": " ".join(words), "label": label}

        return load


    def broken(split):
        yield {"text": "good film", "label": "neutral"}


    def task(name, loader):
        return mtreg.TaskSpec(
            name=name,
            version="1.0.0",
            head=mtreg.HeadSpec("classification", ("negative", "positive")),
            load_dataset=loader,
            metrics=("accuracy",),
            trunk="tiny",
            max_length=12,
        )


    @mtreg.hookimpl
    def register_tasks(register):
        register(task("a", sentiment(1)))
        register(task("b", sentiment(2)))
        register(task("broken", broken))
        register(task("nodata", None))
    """
)

# The fastest search that still has a teacher and a student: one L, one rate each.
FLAGS = ["--search", "2..2", "--lr", "3e-3", "--student-lr", "3e-3", "--epochs", "2"]
FLAGS += ["--batch-size", "16", "--patience", "0"]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
NAMESPACES = ("--net", "--pid", "--fork", "--mount-proc")

# Run inside the namespaces: a worker killed by its PID once a first run is saved; prints
# what was saved before the kill (name -> mtime) and the command's exit code.
KILLER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from pathlib import Path

    runs, out = Path(sys.argv[1]), Path(sys.argv[2])
    with open(out / "cli.out", "w") as stdout, open(out / "cli.err", "w") as stderr:
        command = subprocess.Popen(sys.argv[3:], stdout=stdout, stderr=stderr)

    def workers():
        found = []
        for entry in os.listdir("/proc"):
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if entry.isdigit() and title.startswith(b"ray::onboard_task"):
                found.append(int(entry))
        return found

    saved, killed = {}, []
    while command.poll() is None and not killed:
        if list(runs.glob("*-lr*.json")):
            saved = {p.name: p.stat().st_mtime_ns for p in runs.glob("*-lr*.json")}
            for pid in workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    code = command.wait(timeout=900)
    print(json.dumps({"code": code, "killed": killed, "saved": saved}))
    """
)


@pytest.fixture
def namespaced() -> Any:
    """Run argv inside private network and PID namespaces with loopback up; return the
    CompletedProcess. Outside CI, skipped where namespaces cannot be made; in CI, failed."""
    require_namespaces(*NAMESPACES, probe=LOOPBACK_UP)

    def run(argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
        inside = ["bash", "-c", f'{LOOPBACK_UP} && exec "$@"', "-", *argv]
        return subprocess.run(
            [*unshare(*NAMESPACES), *inside],
            env={**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_tmpdir()},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def make_home(checkpoints: Checkpoints, root: Path, **registry: Any) -> list[str]:
    """Build a registry at ``root/home`` (Registry's keywords: ``registry``) with trunk
    ``tiny`` and the plugin above; return the CLI's global options for it."""
    checkpoints.copy(root / "ckpt", num_layers=3, seed=0)
    (root / "plugins").mkdir(parents=True)
    (root / "plugins" / "fleetplug.py").write_text(PLUGIN)
    with Registry(home=root / "home", plugins_dirs=[root / "plugins"], **registry) as opened:
        opened.add_trunk("tiny", root / "ckpt")
    return ["--home", str(root / "home"), "--plugins-dir", str(root / "plugins")]


def mtreg(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtreg", *args]


def chosen(payload: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """Task -> (chosen run, its dev accuracy), for the tasks onboarded."""
    return {
        t["task"]: (
            t["report"]["chosen"]["stage"] + str(t["report"]["chosen"]["layers"]),
            t["report"]["chosen"]["dev_metrics"]["accuracy"],
        )
        for t in payload["tasks"]
        if t["ok"]
    }


@pytest.mark.slow
def test_all_on_ray_onboards_side_by_side_reports_a_failure_and_chooses_as_one_by_one(
    checkpoints: Checkpoints, tmp_path: Path, namespaced: Any
) -> None:
    ray_home = make_home(checkpoints, tmp_path / "ray")
    done = namespaced(mtreg(*ray_home, "onboard", "--all", "--engine", "ray", "--json", *FLAGS))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Error: 1 of 3 tasks failed: broken"
    payload = json.loads(done.stdout)
    outcomes = {t["task"]: t for t in payload["tasks"]}
    assert sorted(outcomes) == ["a", "b", "broken"]  # --all: not `nodata`, which has no data
    error = outcomes["broken"]["error"]
    assert "row 1" in error and "'neutral'" in error and "\n" not in error
    assert all(outcomes[t]["ok"] and outcomes[t]["threads"] == 1 for t in "ab")
    with Registry(None, tmp_path / "ray" / "home", [tmp_path / "ray" / "plugins"]) as registry:
        assert {t.name: t.active_version for t in registry.tasks()} == {"a": "1.0.0", "b": "1.0.0"}
        assert registry.bundle("latest").members == {"a": "1.0.0", "b": "1.0.0"}

    # The same tasks one after another, in this process, on a registry of their own.
    local_home = make_home(checkpoints, tmp_path / "local")
    result = CliRunner().invoke(cli, [*local_home, "onboard", "a", "b", "--json", *FLAGS])
    assert result.exit_code == 0, result.output
    local = json.loads(result.stdout)
    assert [t["task"] for t in local["tasks"]] == ["a", "b"]
    assert chosen(local) == chosen(payload)

    # --all again: nothing left but the broken task.
    again = CliRunner().invoke(cli, [*local_home, "onboard", "--all", *FLAGS])
    assert again.exit_code == 1
    assert again.output.splitlines()[0].startswith("broken: failed: task 'broken'")


@pytest.mark.slow
def test_a_worker_killed_mid_onboarding_is_retried_and_resumes_after_its_finished_runs(
    checkpoints: Checkpoints, tmp_path: Path, namespaced: Any
) -> None:
    home = make_home(checkpoints, tmp_path)
    (tmp_path / "killer.py").write_text(KILLER)
    runs = tmp_path / "home" / "onboarding" / "a" / "1.0.0"
    rates = [arg for lr in ("2e-3", "1e-3", "5e-3") for arg in ("--lr", lr)]  # and FLAGS' 3e-3
    command = mtreg(*home, "onboard", "a", "--engine", "ray", "--json", *FLAGS, *rates)
    killer = [sys.executable, str(tmp_path / "killer.py"), str(runs), str(tmp_path)]
    done = namespaced([*killer, *command])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    err = (tmp_path / "cli.err").read_text()
    assert seen["killed"] and seen["saved"], err
    assert seen["code"] == 0, err
    (outcome,) = json.loads((tmp_path / "cli.out").read_text())["tasks"]
    assert outcome["ok"], outcome["error"]
    runs_done = outcome["report"]["runs"]
    resumed = {
        f"{r['stage']}-{'L' if r['stage'] == 'teacher' else 'l'}{r['layers']}-lr{r['lr']:g}.json"
        for r in runs_done
        if r["resumed"]
    }
    # Every run finished before the kill was taken as it was, never trained again.
    assert set(seen["saved"]) <= resumed
    for name, mtime in seen["saved"].items():
        assert (runs / name).stat().st_mtime_ns == mtime
    assert sum(r["stage"] == "teacher" for r in runs_done) == 4
    assert not all(r["resumed"] for r in runs_done)  # the rest trained after the retry
    with Registry(None, tmp_path / "home", [tmp_path / "plugins"]) as registry:
        assert registry.task("a").active_version == "1.0.0"


def test_without_ray_or_its_cluster_the_command_says_so_in_one_line(
    checkpoints: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = make_home(checkpoints, tmp_path)
    runner = CliRunner()

    def fails(*args: str, code: int = 1) -> str:
        result = runner.invoke(cli, [*home, "onboard", *args, *FLAGS])
        assert result.exit_code == code, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        return lines[0]

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = fails("a", "b", "--engine", "ray", "--address", f"127.0.0.1:{port}")
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in line and "--address" in line
    assert "invalid Ray address 'nowhere'" in fails("a", "--engine", "ray", "--address", "nowhere")
    assert "--all, not both" in fails("a", "--all", code=2)
    assert "single task" in fails("a", "b", "--out", str(tmp_path / "x"), code=2)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert (
        fails("a", "--engine", "ray") == "Error: ray is not installed: run pip install 'mtreg[ray]'"
    )
    with Registry(None, tmp_path / "home", [tmp_path / "plugins"]) as registry:
        assert registry.tasks() == [] and not (tmp_path / "home" / "onboarding").exists()


@pytest.mark.slow
def test_runs_saved_on_one_machine_resume_on_another_through_the_remote_store(
    checkpoints: Checkpoints, tmp_path: Path
) -> None:
    # Where a retried Ray task lands on another node: the runs its first machine finished
    # are in the bucket, and the second machine trains only the rest.
    settings = Settings(
        teacher_layers=(2,),
        teacher_lrs=(3e-3, 1e-3),
        student_lrs=(3e-3,),
        epochs=2,
        batch_size=16,
        patience=None,
    )

    def killed(line: str) -> None:
        if line.startswith("student"):
            raise KeyboardInterrupt  # as if the machine died during distillation

    with object_server("s3", tmp_path / "s3") as server:
        where = {"url": f"sqlite:///{tmp_path / 'shared.db'}", "store": server.url("fleet")}
        make_home(checkpoints, tmp_path / "first", **where)
        plugins = [tmp_path / "first" / "plugins"]
        first = Registry(home=tmp_path / "first" / "home", plugins_dirs=plugins, **where)
        with first, pytest.raises(KeyboardInterrupt):
            onboard(first, "a", settings, progress=killed)
        saved = sorted(k for k in server.keys("fleet") if k.startswith("onboarding/a/1.0.0/"))
        assert len(saved) == 4  # two teacher runs: weights and record each
        with Registry(home=tmp_path / "second", plugins_dirs=plugins, **where) as second:
            report = onboard(second, "a", settings)
            assert second.task("a").active_version == "1.0.0"
    teachers = [r for r in report.runs if r.stage == "teacher"]
    assert len(teachers) == 2 and all(r.resumed for r in teachers)
    assert not any(r.resumed for r in report.runs if r.stage == "student")
