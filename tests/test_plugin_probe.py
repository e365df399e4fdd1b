"""The plugin probe: every plugin is imported and its hook run in a short-lived subprocess
before mtreg imports it, so ``os._exit``, a segfault or a hang holding the interpreter lock
disables that plugin only, even in this very process; the outcome is cached by the plugin's
files. And the time limit on a task's ``load_dataset``."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mtreg.core import env
from mtreg.core.spec import HeadSpec, TaskSpec
from mtreg.errors import MtregError
from mtreg.plugins.loader import discover
from mtreg.training.job import load_split

GOOD = """\
import mtreg


@mtreg.hookimpl
def register_tasks(register):
    register(mtreg.TaskSpec("{task}", "1.0.0", mtreg.HeadSpec("regression")))
"""
CRASHING = {
    "exits": "import os\nos._exit(0)\n",
    "segfaults": "import ctypes\nctypes.string_at(0)\n",
}


def _plugins(folder: Path, **sources: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        (folder / f"{name}.py").write_text(source)
    return folder


@pytest.fixture
def popens(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every process started from now on (the probe's children among them)."""
    started: list[Any] = []
    real = subprocess.Popen

    def counting(*args: Any, **kwargs: Any) -> Any:
        started.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counting)
    return started


def test_a_crashing_plugin_cannot_end_the_process_that_discovers_it(tmp_path: Path) -> None:
    folder = _plugins(tmp_path / "p", good=GOOD.format(task="kept"), **CRASHING)
    found = discover([folder], cache=None)  # this test process would die without the probe
    errors = {p.name: p.error for p in found.plugins}
    assert errors["good"] is None and list(found.tasks) == ["kept"]
    assert errors["exits"].startswith("crashed: it ended the process (exit code 0")
    assert "killed by SIGSEGV while importing it" in errors["segfaults"]
    with pytest.raises(MtregError, match="2 plugin\\(s\\) failed to load: exits \\(crashed"):
        found.task("missing")


def test_the_probe_is_cached_by_the_plugin_files(tmp_path: Path, popens: list[Any]) -> None:
    folder = _plugins(tmp_path / "p", good=GOOD.format(task="one"), exits=CRASHING["exits"])
    cache = tmp_path / "cache" / "probes.json"
    first = discover([folder], cache=cache)
    # exits.py ends the first probe process; a second one goes on with good.py.
    assert len(popens) == 2 and first.plugins[0].error.startswith("crashed")
    entries = json.loads(cache.read_text())["plugins"]
    assert {Path(key).name for key in entries} == {"good.py", "exits.py"}

    again = discover([folder], cache=cache)
    assert len(popens) == 2  # nothing changed: no probe process
    assert [p.error for p in again.plugins] == [p.error for p in first.plugins]

    (folder / "good.py").write_text(GOOD.format(task="two-renamed"))
    changed = discover([folder], cache=cache)
    assert len(popens) == 3 and list(changed.tasks) == ["two-renamed"]
    assert changed.plugins[0].error == first.plugins[0].error  # from the cache still


def test_a_longer_limit_probes_again(
    tmp_path: Path, popens: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _plugins(tmp_path / "p", good=GOOD.format(task="one"))
    cache = tmp_path / "probes.json"
    discover([folder], cache=cache)
    monkeypatch.setenv(env.PLUGIN_TIMEOUT_ENV, "120")
    discover([folder], cache=cache)
    assert len(popens) == 2  # a plugin that hung at one limit may not at another


def test_a_damaged_cache_is_probed_again(tmp_path: Path, popens: list[Any]) -> None:
    folder = _plugins(tmp_path / "p", good=GOOD.format(task="one"))
    cache = tmp_path / "probes.json"
    cache.write_text('{"format": 1, "stamp": 3, "plugins": [')
    assert list(discover([folder], cache=cache).tasks) == ["one"]
    assert len(popens) == 1 and json.loads(cache.read_text())["format"] == 1


def test_a_hung_plugin_is_killed_after_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock held: the probe's own guard thread cannot run, so the parent kills it.
    monkeypatch.setenv(env.PLUGIN_TIMEOUT_ENV, "0.5")
    hangs = "import ctypes\nctypes.PyDLL(None).sleep(3600)\n"
    folder = _plugins(tmp_path / "p", hangs=hangs, good=GOOD.format(task="kept"))
    started = time.monotonic()
    found = discover([folder], cache=None)
    assert time.monotonic() - started < 30
    assert found.plugins[1].error.startswith(
        "hung: importing it took longer than 0.5 s in the plugin probe (the limit, "
        "MTREG_PLUGIN_TIMEOUT); fix the plugin or raise the limit"
    )
    assert list(found.tasks) == ["kept"]  # probed by a fresh process after the kill


# -- the time limit on a task's load_dataset ----------------------------------------------------


def _spec(loader: Any) -> TaskSpec:
    return TaskSpec("stuck", "1.0.0", HeadSpec("regression"), load_dataset=loader)


def test_a_loader_that_never_returns_is_stopped_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never_returns(split: str) -> Any:
        yield {"text": "one row", "label": 1.0}
        while True:  # a busy loop: the abandoned thread is asked to stop, and does
            pass

    monkeypatch.setenv(env.LOADER_TIMEOUT_ENV, "0.5")
    with pytest.raises(MtregError) as caught:
        load_split(_spec(never_returns), "train", "slowdata")
    assert str(caught.value) == (
        "task 'stuck', train split: plugin 'slowdata''s load_dataset hook gave no complete "
        "split within 0.5 s (the limit, MTREG_LOADER_TIMEOUT); fix the loader or raise the limit"
    )


def test_a_loader_within_its_limit_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.LOADER_TIMEOUT_ENV, "30")
    rows = load_split(_spec(lambda split: [{"text": "a", "label": 0.5}]), "dev")
    assert rows == [{"text": "a", "label": 0.5}]
    with pytest.raises(MtregError, match="its loader failed: ValueError: no"):
        load_split(_spec(lambda split: (_ for _ in ()).throw(ValueError("no"))), "dev")


def test_loader_timeout_variable() -> None:
    assert env.loader_timeout({}) == env.DEFAULT_LOADER_TIMEOUT
    assert env.loader_timeout({env.LOADER_TIMEOUT_ENV: " 90 "}) == 90.0
    for bad in ("abc", "0", "-1", "nan", "inf"):
        with pytest.raises(MtregError, match="MTREG_LOADER_TIMEOUT must be a number of seconds"):
            env.loader_timeout({env.LOADER_TIMEOUT_ENV: bad})
