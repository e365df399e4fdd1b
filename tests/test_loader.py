"""Plugin discovery: real plugin files, packages and an entry point, loaded in isolation."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import write_plugin

from mtreg.errors import NotFound, PluginError
from mtreg.plugins.loader import Discovery, discover

HEAD = ("classification", ["neg", "pos"])


def task(name: str, version: str = "1.0.0", **fields: object) -> dict:
    return {"name": name, "version": version, "head": HEAD, **fields}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MTREG_PLUGINS_PATH", raising=False)
    monkeypatch.delenv("MTREG_LOAD_PLUGINS", raising=False)


def plugin(discovery: Discovery, name: str):
    (info,) = [p for p in discovery.plugins if p.name == name]
    return info


def test_file_and_directory_plugins(tmp_path: Path) -> None:
    single = write_plugin(tmp_path / "single", "alone", [task("solo")])
    many = tmp_path / "many"
    write_plugin(many, "b", [task("beta"), task("gamma", "2.0.0")])
    write_plugin(many, "a", [task("alpha")])
    write_plugin(many, "_private", [task("hidden")])
    (many / "notes.txt").write_text("not a plugin")

    found = discover([single, str(many)])

    assert [p.name for p in found.plugins] == ["alone", "a", "b"]
    assert sorted(found.tasks) == ["alpha", "beta", "gamma", "solo"]
    assert found.task("gamma").spec.version == "2.0.0"
    assert found.task("gamma").plugin == "b"
    assert plugin(found, "b").tasks == ["beta", "gamma"]
    assert plugin(found, "alone").where == str(single)
    assert found.failures() == [] and found.conflicts == [] and found.warnings == []


def test_package_plugin_with_relative_import_and_dataclass(tmp_path: Path) -> None:
    package = tmp_path / "plugins" / "pkgplug"
    package.mkdir(parents=True)
    (package / "labels.py").write_text(
        textwrap.dedent(
            """\
            from dataclasses import dataclass


            @dataclass
            class Labels:
                values: tuple = ("neg", "pos")
            """
        )
    )
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """\
            import mtreg

            from .labels import Labels

            __version__ = "0.3.0"


            @mtreg.hookimpl
            def register_tasks(register):
                head = mtreg.HeadSpec("classification", Labels().values)
                register(mtreg.TaskSpec(name="pkg-task", version="1.0.0", head=head))
            """
        )
    )

    found = discover([tmp_path / "plugins"])

    info = plugin(found, "pkgplug")
    assert info.error is None and info.tasks == ["pkg-task"]
    assert info.where == str(package)
    assert found.task("pkg-task").plugin_version == "0.3.0"


def test_relative_weights_resolve_against_the_plugin_file(tmp_path: Path) -> None:
    elsewhere = tmp_path / "abs.safetensors"
    write_plugin(
        tmp_path / "p",
        "w",
        [
            task("rel", weights="weights/rel.safetensors"),
            task("abs", weights=str(elsewhere)),
            task("none"),
        ],
    )

    found = discover([tmp_path / "p"])

    assert found.task("rel").spec.weights == tmp_path / "p" / "weights" / "rel.safetensors"
    assert found.task("abs").spec.weights == elsewhere
    assert found.task("none").spec.weights is None


def test_import_error_is_isolated_and_reported(tmp_path: Path) -> None:
    write_plugin(tmp_path, "good", [task("fine")])
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_for_mtreg\n")
    (tmp_path / "syntax.py").write_text("def (:\n")

    found = discover([tmp_path])

    assert found.task("fine").plugin == "good"
    info = plugin(found, "broken")
    assert info.tasks == [] and info.where == str(broken)
    assert info.error.startswith("ModuleNotFoundError: ")
    assert "no_such_module_for_mtreg" in info.error
    assert plugin(found, "syntax").error.startswith("SyntaxError: ")
    failures = dict(found.failures())
    assert failures["broken"].startswith("plugin 'broken' failed to load: ModuleNotFoundError")
    with pytest.raises(NotFound, match=r"2 plugin\(s\) failed to load: broken") as info_:
        found.task("missing")
    message = str(info_.value)
    assert "'missing'" in message and "mtreg plugins" in message and "\n" not in message


def test_hook_raising_disables_that_plugin_only(tmp_path: Path) -> None:
    (tmp_path / "raiser.py").write_text(
        textwrap.dedent(
            """\
            import mtreg


            @mtreg.hookimpl
            def register_tasks(register):
                register(mtreg.TaskSpec("early", "1.0.0", mtreg.HeadSpec("regression")))
                raise RuntimeError("boom\\nsecond line")
            """
        )
    )
    write_plugin(tmp_path, "zgood", [task("fine")])

    found = discover([tmp_path])

    info = plugin(found, "raiser")
    assert info.error == "RuntimeError: boom second line"
    assert info.tasks == [] and "early" not in found.tasks
    assert sorted(found.tasks) == ["fine"]


def test_invalid_task_spec_in_hook_is_a_plugin_error(tmp_path: Path) -> None:
    write_plugin(tmp_path, "badname", [task("Bad Name")])
    (tmp_path / "notaspec.py").write_text(
        textwrap.dedent(
            """\
            import mtreg


            @mtreg.hookimpl
            def register_tasks(register):
                register({"name": "dict-task"})
            """
        )
    )
    write_plugin(tmp_path, "ok", [task("fine")])

    found = discover([tmp_path])

    assert plugin(found, "badname").error.startswith("InvalidName: invalid task name 'Bad Name'")
    assert plugin(found, "notaspec").error == (
        "TypeError: register() takes a mtreg.TaskSpec, got dict"
    )
    assert sorted(found.tasks) == ["fine"]


def test_module_without_hook_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "empty.py").write_text("X = 1\n")

    found = discover([tmp_path])

    info = plugin(found, "empty")
    assert info.error is None and info.tasks == []
    assert any("'empty'" in w and "register_tasks" in w for w in found.warnings)


def test_duplicate_task_across_plugins_offers_neither(tmp_path: Path) -> None:
    p = write_plugin(tmp_path, "p", [task("t"), task("only-p")])
    q = write_plugin(tmp_path, "q", [task("t", "2.0.0")])

    found = discover([tmp_path])

    assert "t" not in found.tasks and found.task("only-p").plugin == "p"
    (conflict,) = found.conflicts
    assert f"'p' ({p})" in conflict and f"'q' ({q})" in conflict and "'t'" in conflict
    with pytest.raises(PluginError, match="both") as info:
        found.task("t")
    assert str(info.value) == conflict
    assert ("t", conflict) in found.failures()
    assert plugin(found, "p").tasks == ["t", "only-p"]


def test_one_plugin_registering_a_task_twice_is_a_conflict(tmp_path: Path) -> None:
    write_plugin(tmp_path, "twice", [task("t"), task("t", "1.1.0")])

    found = discover([tmp_path])

    assert "t" not in found.tasks
    with pytest.raises(PluginError, match=r"twice by plugin 'twice'.*both"):
        found.task("t")


def test_allow_list_restricts_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path, "keep", [task("kept")])
    write_plugin(tmp_path, "drop", [task("dropped")])
    monkeypatch.setenv("MTREG_LOAD_PLUGINS", " keep , ghost")

    found = discover([tmp_path])

    assert [p.name for p in found.plugins] == ["keep"]
    assert sorted(found.tasks) == ["kept"]
    assert any("'ghost'" in w and "MTREG_LOAD_PLUGINS" in w for w in found.warnings)

    monkeypatch.setenv("MTREG_LOAD_PLUGINS", "")
    nothing = discover([tmp_path])
    assert nothing.plugins == [] and nothing.tasks == {} and nothing.warnings == []


def test_plugins_path_env_and_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path / "one", "first", [task("from-env-1")])
    second = write_plugin(tmp_path / "two", "second", [task("from-env-2")])
    missing = tmp_path / "nowhere"
    entries = [str(tmp_path / "one"), "", str(second), str(missing)]
    monkeypatch.setenv("MTREG_PLUGINS_PATH", os.pathsep.join(entries))

    found = discover()

    assert sorted(found.tasks) == ["from-env-1", "from-env-2"]
    assert found.warnings == [f"plugin path {missing} does not exist: skipped"]


def test_same_path_twice_loads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path, "p", [task("t")])
    monkeypatch.setenv("MTREG_PLUGINS_PATH", str(tmp_path))

    found = discover([tmp_path, tmp_path / "p.py"])

    assert [p.name for p in found.plugins] == ["p"] and found.conflicts == []


def test_rewritten_plugin_is_reloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bytecode writing on (PYTHONDONTWRITEBYTECODE may hide the stale-.pyc case).
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    write_plugin(tmp_path, "p", [task("t", "1.0.0")])
    assert discover([tmp_path]).task("t").spec.version == "1.0.0"

    # Same size, same second: a cached .pyc must not win.
    write_plugin(tmp_path, "p", [task("t", "1.1.0")])
    assert discover([tmp_path]).task("t").spec.version == "1.1.0"


@pytest.fixture
def entry_point_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    site = tmp_path / "site"
    info = site / "epdist-4.5.6.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epdist\nVersion: 4.5.6\n")
    (info / "entry_points.txt").write_text("[mtreg]\nep = epmod\n")
    write_plugin(site, "epmod", [task("ep-task", weights="ep.safetensors")])
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("epmod", None)


def test_entry_point_plugin_loads_with_its_version(entry_point_dist: Path) -> None:
    found = discover()

    info = plugin(found, "ep")
    assert (info.version, info.where, info.error) == ("4.5.6", "entry point epmod", None)
    loaded = found.task("ep-task")
    assert (loaded.plugin, loaded.plugin_version) == ("ep", "4.5.6")
    assert loaded.spec.weights == entry_point_dist / "ep.safetensors"


def test_to_dict_is_json_ready(tmp_path: Path) -> None:
    write_plugin(tmp_path, "p", [task("t", weights="w.safetensors", trunk="tiny"), task("u")])
    write_plugin(tmp_path, "q", [task("u")])
    (tmp_path / "broken.py").write_text("raise ValueError('nope')\n")

    data = json.loads(json.dumps(discover([tmp_path, tmp_path / "gone"]).to_dict()))

    assert set(data) == {"plugins", "tasks", "conflicts", "warnings"}
    assert data["tasks"]["t"] == {
        "plugin": "p",
        "version": "1.0.0",
        "head": {"kind": "classification", "labels": ["neg", "pos"]},
        "trunk": "tiny",
        "weights": str(tmp_path / "w.safetensors"),
    }
    assert "u" not in data["tasks"] and len(data["conflicts"]) == 1
    broken = next(p for p in data["plugins"] if p["name"] == "broken")
    assert broken == {
        "name": "broken",
        "version": None,
        "tasks": [],
        "error": "ValueError: nope",
        "where": str(tmp_path / "broken.py"),
    }
    assert len(data["warnings"]) == 1
