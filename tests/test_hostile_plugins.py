"""Plugins are isolated for real: a plugin that exits, raises ``KeyboardInterrupt`` or another
``BaseException``, prints (ANSI escapes included), never returns (holding the interpreter
lock included), calls ``os._exit`` or crashes in native code, at import or in its hook, is
reported by ``mtreg plugins`` while the command, its exit code, its ``--json`` output and
every other plugin carry on. Run through the real ``mtreg`` command (``harness.CliPool``)
with plugins the tests write into a plugin path, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from factories import Checkpoints, make_branch_file
from harness import CliPool, Databases, Result, Step
from helpers import snapshot, write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.core import env
from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.plugins.loader import discover
from mtreg.registry.api import Registry

HEAD = ("classification", ("neg", "pos"))
LIMIT = "1"  # MTREG_PLUGIN_TIMEOUT for these tests, in seconds

HOOK = "import mtreg\n\n\n@mtreg.hookimpl\ndef register_tasks(register):\n"

# name -> (plugin source, what its error says; None: it loads, its output captured)
HOSTILE: dict[str, tuple[str, str | None]] = {
    "exits_at_import": (
        "import sys\nsys.exit(3)\n",
        "SystemExit: it called sys.exit(3) while importing it; a plugin must raise",
    ),
    "exits_0_in_hook": (
        HOOK + "    raise SystemExit(0)\n",
        "SystemExit: it called sys.exit(0) while running its register_tasks hook",
    ),
    "interrupts_at_import": (
        "raise KeyboardInterrupt\n",
        "KeyboardInterrupt (raised while importing it)",
    ),
    "base_exception_in_hook": (
        "class Boom(BaseException):\n    pass\n\n\n"
        + HOOK
        + "    raise Boom('went \\x1b[2J\\x1b[Hoff\\nbadly')\n",
        "Boom: went \\x1b[2J\\x1b[Hoff badly (raised while running its register_tasks hook)",
    ),
    "spins_at_import": (
        "while True:\n    pass\n",
        f"hung: importing it took longer than {LIMIT} s (the limit, MTREG_PLUGIN_TIMEOUT)",
    ),
    "sleeps_in_hook": (
        "import time\n\n" + HOOK + "    time.sleep(3600)\n",
        "hung: running its register_tasks hook took longer than 1 s",
    ),
    # Past what a thread can contain: the probe subprocess meets these first.
    "os_exit_at_import": (
        "import os\nos._exit(0)\n",
        "crashed: it ended the process (exit code 0, os._exit?) while importing it",
    ),
    "os_exit_in_hook": (
        HOOK + "    import os\n\n    os._exit(7)\n",
        "crashed: it ended the process (exit code 7, os._exit?) while running its "
        "register_tasks hook",
    ),
    "segfaults_in_hook": (
        HOOK + "    import ctypes\n\n    ctypes.string_at(0)\n",
        "crashed: the process was killed by SIGSEGV while running its register_tasks hook",
    ),
    "hangs_holding_the_gil": (
        # PyDLL keeps the interpreter lock through the call: no thread of mtreg's would run.
        "import ctypes\nctypes.PyDLL(None).sleep(3600)\n",
        f"hung: importing it took longer than {LIMIT} s in the plugin probe (the limit, "
        "MTREG_PLUGIN_TIMEOUT)",
    ),
    "prints": (
        textwrap.dedent(
            """\
            import os, sys
            print("\\x1b[2J\\x1b[Hplugin says hello")
            sys.stderr.write("plugin warns\\n")
            sys.stdout.write("x" * 1_000_000)
            os.write(1, b"raw fd write\\n")
            os.system("printf 'from a child process\\\\033[2J'")
            import mtreg


            @mtreg.hookimpl
            def register_tasks(register):
                print("printed in the hook")
                register(mtreg.TaskSpec("chatty", "1.0.0", mtreg.HeadSpec("regression")))
            """
        ),
        None,
    ),
}
# What the printing plugin writes; ``mtreg plugins`` quotes only its escaped start in a warning.
PRINTED = ("says hello", "plugin warns", "xxxx", "raw fd write", "from a child", "in the hook")


def _write(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(HOSTILE[name][0])
    return directory


def _plugins(stdout: str) -> dict[str, dict]:
    """Return the plugins of ``mtreg plugins --json`` by name; the whole stdout must be JSON."""
    return {p["name"]: p for p in json.loads(stdout)["plugins"]}


def _clean(result: Result, quoted: bool = False) -> None:
    """No escape reached the terminal and no traceback was printed; unless the command
    ``quoted`` the plugin's output in a warning, none of that output is seen either."""
    for leak in ("\x1b", "Traceback", *([] if quoted else PRINTED)):
        assert leak not in result.stdout and leak not in result.stderr, leak


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Path:
    """A plugin directory holding plugin ``good``, offering task ``probe`` with its weights
    (a branch for the trunk at ``good/../trunk``)."""
    tmp = tmp_path_factory.mktemp("good")
    trunk = checkpoints.copy(tmp / "trunk", num_layers=3, seed=0)
    weights = make_branch_file(
        tmp / "probe.safetensors", read_checkpoint(trunk), "probe", "1.0.0", 2, 1, HeadSpec(*HEAD)
    )
    spec = {"name": "probe", "version": "1.0.0", "head": HEAD, "weights": str(weights)}
    write_plugin(tmp / "plugins", "good", [{**spec, "trunk": "tiny"}])
    return tmp / "plugins"


def _env(tmp: Path, good: Path, hostile: Path, url: str | None = None) -> dict[str, str]:
    values = {
        **os.environ,
        "MTREG_HOME": str(tmp / "home"),
        "MTREG_PLUGINS_PATH": os.pathsep.join([str(good), str(hostile)]),
        "MTREG_PLUGIN_TIMEOUT": LIMIT,
    }
    values.pop("MTREG_LOAD_PLUGINS", None)
    values.pop("MTREG_DATABASE_URL", None)
    return values if url is None else {**values, "MTREG_DATABASE_URL": url}


# -- mtreg plugins: each hostile plugin alone beside a good one --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HOSTILE))
def test_plugins_json_reports_the_hostile_plugin_and_keeps_the_others(
    pool: CliPool, good: Path, tmp_path: Path, name: str
) -> None:
    hostile = _write(tmp_path / "hostile", name)
    started = time.monotonic()
    result = pool.run(_env(tmp_path, good, hostile), "plugins", "--json")
    assert time.monotonic() - started < 30  # a hung plugin costs its limit, not forever
    assert result.code == 0, result.stderr
    _clean(result, quoted=True)
    found = _plugins(result.stdout)
    assert found["good"]["error"] is None and found["good"]["tasks"] == ["probe"]
    report = found[name]
    expected = HOSTILE[name][1]
    warnings = json.loads(result.stdout)["warnings"]
    if expected is None:
        assert report["error"] is None and report["tasks"] == ["chatty"]
        assert any("wrote 10000" in w and "plugins should not print" in w for w in warnings)
        assert any("\\x1b[2J\\x1b[Hplugin says hello" in w for w in warnings)
    else:
        assert report["tasks"] == [] and expected in report["error"], report["error"]
        assert "\n" not in report["error"]


@pytest.mark.slow
def test_plugins_table_keeps_every_hostile_plugin_off_the_terminal(
    pool: CliPool, good: Path, tmp_path: Path
) -> None:
    hostile = tmp_path / "hostile"
    for name in HOSTILE:
        _write(hostile, name)
    result = pool.run(_env(tmp_path, good, hostile), "plugins")
    assert result.code == 0, result.stderr
    _clean(result, quoted=True)
    assert not any(text in result.stdout for text in PRINTED)
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert "ok" in rows["good"] and "ok" in rows["prints"]
    broken = [n for n, (_, error) in HOSTILE.items() if error]
    assert all("ERROR " in rows[n] for n in broken), result.stdout
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())


@pytest.mark.slow
def test_a_bad_time_limit_is_a_one_line_error(pool: CliPool, good: Path, tmp_path: Path) -> None:
    values = _env(tmp_path, good, _write(tmp_path / "hostile", "prints"))
    limits = ("abc", "0", "-1", "nan")
    jobs = [[Step({**values, "MTREG_PLUGIN_TIMEOUT": v}, ("plugins", "--json"))] for v in limits]
    for value, (result,) in zip(limits, pool.jobs(jobs), strict=True):
        assert result.code == 1, result.stderr
        assert result.stderr.strip() == (
            f"Error: MTREG_PLUGIN_TIMEOUT must be a number of seconds greater than 0, got "
            f"{value!r}: fix or unset it"
        )
        assert result.stdout == ""


# -- sync, register and list on a real registry, SQLite and PostgreSQL --------------------------


@pytest.fixture
def registry_url(databases: Databases, good: Path, tmp_path: Path) -> str:
    """A registry (home ``tmp_path/home``) holding trunk ``tiny`` and no task."""
    url = databases.new()
    with Registry(url=url, home=tmp_path / "home") as registry:
        registry.add_trunk("tiny", good.parent / "trunk")
    return url


@pytest.mark.slow
def test_sync_registers_the_good_plugin_and_refuses_each_hostile_one(
    pool: CliPool, good: Path, tmp_path: Path, registry_url: str
) -> None:
    hostile = tmp_path / "hostile"
    for name in HOSTILE:
        _write(hostile, name)
    result = pool.run(_env(tmp_path, good, hostile, registry_url), "sync", "--json")
    # sync's own rule (1 when a plugin was refused), not 0 or 3 from a plugin's sys.exit.
    assert result.code == 1, result.stderr
    _clean(result)
    changes = json.loads(result.stdout)
    assert [(t["task"], t["change"]) for t in changes["tasks"]] == [("probe", "added")]
    refused = {r["task"]: r["reason"] for r in changes["refused"]}
    for name, (_, error) in HOSTILE.items():
        if error is not None:
            assert error in refused[name]
    with Registry(url=registry_url, home=tmp_path / "home") as registry:
        assert [(t.name, t.active_version) for t in registry.tasks()] == [("probe", "1.0.0")]


@pytest.mark.slow
def test_a_printing_plugin_changes_neither_exit_code_nor_json(
    pool: CliPool, good: Path, tmp_path: Path, registry_url: str
) -> None:
    values = _env(tmp_path, good, _write(tmp_path / "hostile", "prints"), registry_url)
    registered = pool.run(values, "register", "probe", "--json")
    assert registered.code == 0, registered.stderr
    _clean(registered)
    assert [t["task"] for t in json.loads(registered.stdout)["tasks"]] == ["probe"]
    before = snapshot(registry_url, tmp_path / "home")
    synced = pool.run(values, "sync", "--json")
    assert synced.code == 0, synced.stderr
    _clean(synced)
    assert json.loads(synced.stdout)["tasks"][0]["change"] == "unchanged"
    assert snapshot(registry_url, tmp_path / "home") == before


@pytest.mark.slow
def test_list_never_runs_plugin_code(
    pool: CliPool, good: Path, tmp_path: Path, registry_url: str
) -> None:
    hostile = tmp_path / "hostile"
    for name in HOSTILE:
        _write(hostile, name)
    values = _env(tmp_path, good, hostile, registry_url)
    before = snapshot(registry_url, tmp_path / "home")
    started = time.monotonic()
    result = pool.run(values, "list", "--json")
    assert time.monotonic() - started < 10  # no plugin's time limit was waited for
    assert result.code == 0, result.stderr
    _clean(result)
    assert json.loads(result.stdout) == []
    assert snapshot(registry_url, tmp_path / "home") == before


# -- the probe itself dies ---------------------------------------------------------------------

# A sitecustomize (on PYTHONPATH) that ends the probe's child as it starts, before its first
# report, as a broken interpreter or an out-of-memory kill would; the command itself is a
# fork of the pool's process and never reads it.
PROBE_DIES = "import os, sys\n\nif 'probe_main' in ' '.join(sys.orig_argv):\n    os._exit(3)\n"


@pytest.mark.slow
def test_a_probe_that_dies_before_its_first_report_is_a_one_line_warning(
    pool: CliPool, good: Path, tmp_path: Path, registry_url: str
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE_DIES)
    # A plugin of its own: one the session's probe cache already knows is not probed at all.
    spec = {"name": "probe", "version": "1.0.0", "head": HEAD, "trunk": "tiny"}
    plugin = write_plugin(
        tmp_path / "fresh", "fresh", [{**spec, "weights": str(good.parent / "probe.safetensors")}]
    )
    values = {
        **_env(tmp_path, good, tmp_path / "fresh", registry_url),
        "MTREG_PLUGINS_PATH": str(tmp_path / "fresh"),
        "MTREG_LOAD_PLUGINS": "fresh",  # not mtreg's own (glue, intent)
        "PYTHONPATH": str(site),
    }
    warning = (
        f"the plugin probe exited with code 3 before it tried {plugin.resolve()}, so it was "
        f"loaded unprobed: check that `{sys.executable} -c 'import mtreg'` runs"
    )
    listed = pool.run(values, "plugins", "--json")
    assert listed.code == 0, listed.stderr
    assert _plugins(listed.stdout)["fresh"]["tasks"] == ["probe"]
    assert json.loads(listed.stdout)["warnings"] == [warning]
    assert listed.stderr.splitlines() == [warning]
    # Not cached as healthy: the next command probes again, and says so again.
    synced = pool.run(values, "sync", "--json")
    assert synced.code == 0, synced.stderr
    assert synced.stderr.splitlines() == [warning]
    assert [t["task"] for t in json.loads(synced.stdout)["tasks"]] == ["probe"]
    # The table prints its warnings itself: the probe's once, not also as a logged line.
    table = pool.run(values, "plugins")
    assert table.code == 0 and table.stderr.splitlines() == [f"warning: {warning}"], table.stderr


# -- in process: what the CLI relies on ---------------------------------------------------------


@pytest.mark.parametrize("name", ["exits_at_import", "interrupts_at_import", "exits_0_in_hook"])
def test_discover_never_lets_a_base_exception_out(tmp_path: Path, name: str) -> None:
    found = discover([_write(tmp_path, name)])
    (info,) = found.plugins
    assert HOSTILE[name][1] in info.error


def test_a_spinning_plugin_is_stopped_after_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.PLUGIN_TIMEOUT_ENV, "0.5")
    found = discover([_write(tmp_path, "spins_at_import")])
    assert found.plugins[0].error.startswith("hung: importing it took longer than 0.5 s")
    # The abandoned thread is ended, so it does not hold the GIL for the rest of the command.
    deadline = time.monotonic() + 5
    while any(t.name == "mtreg-plugin" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the spinning plugin thread still runs"
        time.sleep(0.05)


def test_plugin_timeout_variable() -> None:
    assert env.plugin_timeout({}) == env.DEFAULT_PLUGIN_TIMEOUT
    assert env.plugin_timeout({env.PLUGIN_TIMEOUT_ENV: " 2.5 "}) == 2.5
    for bad in ("abc", "0", "-1", "nan", "inf"):
        with pytest.raises(MtregError, match="must be a number of seconds greater than 0"):
            env.plugin_timeout({env.PLUGIN_TIMEOUT_ENV: bad})
