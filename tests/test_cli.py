"""The click CLI: through CliRunner for breadth, through real subprocesses where the process
boundary matters (exit codes, stderr, start-up imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import Checkpoints, make_branch_file
from harness import SQLITE_ONLY
from helpers import snapshot, write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.cli.main import cli
from mtreg.core.spec import HeadSpec

HEAD = ("classification", ("neg", "pos"))


@pytest.fixture
def env(tmp_path: Path, db_url: str, checkpoints: Checkpoints) -> dict[str, str]:
    """Environment for a registry in tmp_path with a tiny trunk folder and a plugin dir."""
    trunk = checkpoints.copy(tmp_path / "trunk", num_layers=3, seed=0)
    checkpoint = read_checkpoint(trunk)
    plugins = tmp_path / "plugins"
    for version, seed in (("1.0.0", 0), ("1.1.0", 1)):
        make_branch_file(
            tmp_path / f"s-{version}.safetensors",
            checkpoint,
            "sentiment",
            version,
            2,
            1,
            HeadSpec(*HEAD),
            seed=seed,
        )
    write_plugin(plugins, "sentiment", [_spec(tmp_path, "1.0.0")])
    return {
        "MTREG_HOME": str(tmp_path / "home"),
        "MTREG_DATABASE_URL": db_url,
        "MTREG_PLUGINS_PATH": str(plugins),
        "TRUNK": str(trunk),
        "TMP": str(tmp_path),
    }


def _spec(tmp: Path, version: str) -> dict:
    return {
        "name": "sentiment",
        "version": version,
        "head": HEAD,
        "trunk": "tiny",
        "weights": str(tmp / f"s-{version}.safetensors"),
        "description": "reviews",
    }


def run(env: dict[str, str], *args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


def test_walkthrough(env: dict[str, str]) -> None:
    run(env, "init")
    run(env, "trunk", "add", "tiny", env["TRUNK"])
    trunks = json.loads(run(env, "trunk", "list", "--json").stdout)
    assert [t["name"] for t in trunks] == ["tiny"]
    assert "layer 2 sha256" in run(env, "trunk", "show", "tiny").stdout
    plugins = json.loads(run(env, "plugins", "--json").stdout)
    assert plugins["plugins"][0]["tasks"] == ["sentiment"]
    assert "would be added" in run(env, "register", "--all", "--dry-run").stdout
    out = run(env, "register", "sentiment").stdout
    assert "sentiment 1.0.0: added" in out and "bundle" in out
    listed = json.loads(run(env, "list", "--json").stdout)
    assert [(t["name"], t["active_version"]) for t in listed] == [("sentiment", "1.0.0")]
    write_plugin(Path(env["MTREG_PLUGINS_PATH"]), "sentiment", [_spec(Path(env["TMP"]), "1.1.0")])
    assert "sentiment 1.1.0: upgraded (was 1.0.0)" in run(env, "sync").stdout
    versions = json.loads(run(env, "versions", "sentiment", "--json").stdout)
    assert [(v["version"], v["active"]) for v in versions] == [("1.0.0", False), ("1.1.0", True)]
    shown = json.loads(run(env, "show", "sentiment", "--json").stdout)
    assert shown["version"]["fork_depth"] == 2
    run(env, "rollback", "sentiment", "--to", "1.0.0")
    bundles = json.loads(run(env, "bundle", "list", "--json").stdout)
    # Bundles are content-addressed: rolling back brings the first bundle back as latest.
    assert len(bundles) == 2
    (upgraded,) = [b["id"] for b in bundles if "latest" not in b["aliases"]]
    diff = json.loads(run(env, "bundle", "diff", upgraded, "latest", "--json").stdout)
    assert diff == {"sentiment": {"a": "1.1.0", "b": "1.0.0"}}
    run(env, "alias", "set", "serving", "latest")
    assert json.loads(run(env, "alias", "list", "--json").stdout).keys() == {"latest", "serving"}
    assert "removed" in run(env, "remove", "sentiment").stdout
    gc = json.loads(run(env, "gc", "--json").stdout)
    assert gc["bundles"] == [upgraded]
    assert "schema matches" in run(env, "db", "check").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "nosuch"], "task 'nosuch' is not registered"),
        (["trunk", "show", "nosuch"], "mtreg trunk add nosuch PATH"),
        (["trunk", "add", "tiny", "/does/not/exist"], "/does/not/exist"),
        (["rollback", "nosuch", "--to", "1.0.0"], "not registered"),
        (["register", "nosuch"], "nosuch"),
        (["register"], "no tasks to register"),
        (["bundle", "show", "nosuch"], "no bundle or alias 'nosuch'"),
        (["alias", "set", "Bad/Name", "latest"], "invalid alias name"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_1(
    env: dict[str, str], args: list[str], message: str
) -> None:
    run(env, "init")
    before = snapshot(env["MTREG_DATABASE_URL"], Path(env["MTREG_HOME"]))
    result = run(env, *args, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(env["MTREG_DATABASE_URL"], Path(env["MTREG_HOME"])) == before


def test_usage_errors_exit_2(env: dict[str, str]) -> None:
    assert run(env, "rollback", "sentiment", code=2).exit_code == 2
    assert run(env, "register", "x", "--all", code=2).exit_code == 2


# (argv, what the one line says, the command whose --help it names)
USAGE_ERRORS = [
    (["--bogus", "list"], "No such option '--bogus'", "mtreg"),
    (["nosuch"], "No such command 'nosuch'", "mtreg"),
    (["predict", "--nope", "x"], "No such option '--nope'", "mtreg predict"),
    (["rollback", "sentiment"], "Missing option '--to'", "mtreg rollback"),
    (["trunk", "add", "tiny"], "Missing argument 'PATH_OR_HUB_ID'", "mtreg trunk add"),
    (["train", "toy", "--precision", "fp8"], "'fp8' is not one of 'fp32', 'bf16'", "mtreg train"),
    (["predict"], "give either TEXT [TEXT_PAIR] or --input FILE.jsonl", "mtreg predict"),
]


@pytest.mark.parametrize(
    ("argv", "message", "command"), USAGE_ERRORS, ids=[" ".join(a) for a, _, _ in USAGE_ERRORS]
)
def test_a_usage_error_is_one_line_naming_the_help_and_exits_2(
    tmp_path: Path, argv: list[str], message: str, command: str
) -> None:
    env = {"MTREG_HOME": str(tmp_path / "home"), "MTREG_DATABASE_URL": ""}
    result = CliRunner().invoke(cli, argv, env=env, catch_exceptions=False, prog_name="mtreg")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and message in line, line
    assert line.endswith(f"(see `{command} --help`)"), line
    assert result.stdout == "" and not (tmp_path / "home").exists()


def test_a_bare_group_still_shows_its_help(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["trunk"], env={"MTREG_HOME": str(tmp_path)})
    assert result.exit_code == 2 and "Commands:" in result.stderr


def _subprocess(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtreg", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_real_subprocess_register_and_error(env: dict[str, str]) -> None:
    assert _subprocess(env, "trunk", "add", "tiny", env["TRUNK"]).returncode == 0
    done = _subprocess(env, "register", "sentiment", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tasks"][0]["change"] == "added"
    failed = _subprocess(env, "register", "sentiment", "--all")
    assert failed.returncode == 2
    # Through a real process too: one line on stderr, nothing on stdout.
    assert failed.stderr.count("\n") == 1 and failed.stdout == "", failed.stderr
    failed = _subprocess(env, "rollback", "sentiment", "--to", "9.9.9")
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "has no version '9.9.9'" in failed.stderr
    debug = _subprocess(env, "--debug", "rollback", "sentiment", "--to", "9.9.9")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_listing_does_not_import_torch(env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "from mtreg.cli.main import cli\n"
        "try:\n"
        "    cli.main(['list', '--json'], standalone_mode=False)\n"
        "finally:\n"
        "    assert 'torch' not in sys.modules, 'mtreg list imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.slow
@SQLITE_ONLY
def test_predict_and_export_in_real_subprocesses(env: dict[str, str]) -> None:
    run(env, "trunk", "add", "tiny", env["TRUNK"])
    run(env, "register", "sentiment", "--promote")
    done = _subprocess(env, "predict", "the film was great")
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["input"] == "the film was great"
    assert line["predictions"]["sentiment"]["label"] in HEAD[1]
    inputs = Path(env["TMP"]) / "in.jsonl"
    inputs.write_text('"good"\n{"text": "bad"}\n\n["awful"]\n')
    done = _subprocess(env, "predict", "--bundle", "latest", "--input", str(inputs), "--logits")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in done.stdout.splitlines()]
    assert [r["input"] for r in rows] == ["good", "bad", ["awful"]]
    assert len(rows[0]["predictions"]["sentiment"]["logits"]) == 2
    out = Path(env["TMP"]) / "exports"
    for fmt, extra in (
        ("dir", []),
        ("onnx", ["--quantize", "int8"]),
        ("hf", ["--tasks", "sentiment"]),
    ):
        done = _subprocess(env, "export", "--format", fmt, "--out", str(out / fmt), *extra)
        assert done.returncode == 0, done.stderr
    assert (out / "onnx" / "model.int8.onnx").is_file()
    assert (out / "hf" / "config.json").is_file()
    onnx = _subprocess(
        env, "predict", "--bundle", str(out / "onnx"), "--backend", "onnx", "the film was great"
    )
    assert (
        json.loads(onnx.stdout)["predictions"]["sentiment"]["label"]
        == line["predictions"]["sentiment"]["label"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["export", "--tasks", "nosuch", "--out", "{TMP}/x"],
            "task 'nosuch' is not in this bundle",
        ),
        (["export", "--out", "{TMP}"], "already exists"),
        (["predict", "--bundle", "nosuch", "hello"], "no bundle or alias 'nosuch'"),
        (["predict", "--input", "{TMP}/bad.jsonl"], "bad.jsonl:1 is not valid JSON"),
        (["predict", "--bundle", "latest", "--backend", "onnx", "hi"], "holds no model.onnx"),
    ],
)
def test_bundle_user_errors_are_one_line(
    env: dict[str, str], args: list[str], message: str
) -> None:
    run(env, "trunk", "add", "tiny", env["TRUNK"])
    run(env, "register", "sentiment", "--promote")
    (Path(env["TMP"]) / "bad.jsonl").write_text("{nope\n")
    before = snapshot(env["MTREG_DATABASE_URL"], Path(env["MTREG_HOME"]))
    result = run(env, *[a.replace("{TMP}", env["TMP"]) for a in args], code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert snapshot(env["MTREG_DATABASE_URL"], Path(env["MTREG_HOME"])) == before
