"""The path the CLI suggests works, and a missing extra is a hint (issue 19, families 7, 8).

Every "next:" hint the CLI prints is run as printed, in real ``mtreg`` processes on SQLite and
on PostgreSQL: ``mtreg train`` suggests ``mtreg distill TASK``, which suggests ``mtreg register
TASK``, for a plugin that names no weights file (the branch goes to the home's ``trained/``).
``mtreg new-plugin``'s hint (install, then onboard with ``--data-dir``) is followed by
``tests/test_scaffold.py::test_scaffolded_plugin_installs_and_onboards_in_a_subprocess``.

A command needing an optional dependency that is not installed ends in one line naming the
``pip install 'mtreg[EXTRA]'`` to run: checked in a fresh interpreter whose import system
refuses the extra's modules.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import CliPool, registry_state
from toy import OpenRegistry

pytestmark = pytest.mark.slow

# Speed flags for the tiny toy task (tests/toy.py's FAST); they change no hint.
SPEED = ["--lr", "3e-3", "--epochs", "4", "--batch-size", "16", "--patience", "0"]
HINT = re.compile(r"next: `(mtreg [^`]+)`")


def _hint(stdout: str) -> list[str]:
    """Return the argv of the one ``next:`` hint in ``stdout``."""
    (command,) = HINT.findall(stdout)
    return shlex.split(command)[1:]


def test_every_next_hint_is_one_that_is_run() -> None:
    """A new "next:" hint in the CLI fails here until a test runs it."""
    hint = re.compile(r"next: `?(mtreg [a-z-]+|pip install)")
    cli = Path(__file__).resolve().parents[1] / "cli"
    found = sorted(h for f in cli.glob("*.py") for h in hint.findall(f.read_text()))
    # distill and register: below; pip install (new-plugin's): test_scaffold.py.
    assert found == ["mtreg distill", "mtreg register", "pip install"]


def test_train_distill_register_hints_work_without_a_plugin_weights_path(
    toy_registry: OpenRegistry, pool: CliPool, db_url: str, tmp_path: Path
) -> None:
    toy_registry(tmp_path, db_url).close()
    env = {
        **os.environ,
        "MTREG_HOME": str(tmp_path / "home"),
        "MTREG_DATABASE_URL": db_url,
        "MTREG_PLUGINS_PATH": str(tmp_path / "plugins"),
    }
    train = pool.run(env, "train", "toy", "--search", "2..2", *SPEED)
    assert train.code == 0, train.stderr
    assert _hint(train.stdout) == ["distill", "toy"]
    distill = pool.run(env, *_hint(train.stdout), "--layers", "1", *SPEED)
    assert distill.code == 0, distill.stderr
    assert _hint(distill.stdout) == ["register", "toy"]
    assert (tmp_path / "home" / "trained" / "toy" / "1.0.0.safetensors").is_file()

    # sync sees the branch just written, as register does (it used to skip it: "no weights").
    dry = pool.run(env, "sync", "--dry-run", "--json")
    assert dry.code == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert "toy" not in [s["task"] for s in planned.get("skipped", [])], planned
    assert [t["task"] for t in planned["tasks"]] == ["toy"], planned

    register = pool.run(env, *_hint(distill.stdout))
    assert register.code == 0, register.stderr
    state = registry_state(db_url, str(tmp_path / "home"))
    assert state["active"] == {"toy": "1.0.0"}
    again = pool.run(env, "sync", "--json")
    assert again.code == 0, again.stderr
    assert [t["change"] for t in json.loads(again.stdout)["tasks"]] == ["unchanged"]
    assert registry_state(db_url, str(tmp_path / "home")) == state


# A fresh interpreter whose imports of the extra's modules fail as if it were not installed,
# then `python -m mtreg ARGS`.
_HIDDEN = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    sys.argv = ["mtreg", *ARGV]
    runpy.run_module("mtreg", run_name="__main__", alter_sys=True)
    """
)


# A trunk added to a remote store: the store's file system is opened (and needed).
_TO_STORE = ["trunk", "add", "other", "CKPT"]


@pytest.mark.parametrize(
    ("hidden", "argv", "target"),
    [
        (["fastapi"], ["serve", "--port", "0"], "mtreg[serve]"),
        (["uvicorn"], ["serve", "--port", "0"], "mtreg[serve]"),
        (["prometheus_client"], ["serve", "--port", "0"], "mtreg[serve]"),
        (["onnx", "onnxruntime"], ["export", "--format", "onnx", "--out", "OUT"], "mtreg[onnx]"),
        (["matplotlib"], ["report", "--out", "OUT"], "mtreg[report]"),
        (["s3fs"], ["--store", "s3://bucket/x", *_TO_STORE], "mtreg[s3]"),
        (["gcsfs"], ["--store", "gs://bucket/x", *_TO_STORE], "mtreg[gcs]"),
        (["adlfs"], ["--store", "az://bucket/x", *_TO_STORE], "mtreg[azure]"),
        (
            ["huggingface_hub"],
            ["export", "--out", "OUT", "--push-to-hub", "owner/name"],
            "huggingface_hub>=1.0",
        ),
    ],
    ids=[
        *("serve-fastapi", "serve-uvicorn", "serve-prometheus", "onnx", "report"),
        *("s3", "gcs", "azure", "hub-push"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_pip_command(
    toy_registry: OpenRegistry,
    tmp_path: Path,
    hidden: list[str],
    argv: list[str],
    target: str,
) -> None:
    from factories import make_branch_file

    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec

    registry = toy_registry(tmp_path)
    head = HeadSpec("classification", ("negative", "positive"))
    branch = make_branch_file(
        tmp_path / "toy.safetensors", read_checkpoint(tmp_path / "ckpt"), "toy", "1.0.0", 1, 1, head
    )
    registry.register(["toy"], weights={"toy": branch}, promote=True)
    registry.close()
    places = {"OUT": str(tmp_path / "out"), "CKPT": str(tmp_path / "ckpt")}
    argv = [places.get(a, a) for a in argv]
    code = f"HIDDEN = {hidden!r}\nARGV = {argv!r}\n" + _HIDDEN
    url, home = f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "home")
    env = {
        **{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"},
        "MTREG_HOME": home,
        "MTREG_DATABASE_URL": url,
    }
    before = registry_state(url, home)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    module, _, rest = line.removeprefix("Error: ").partition(" ")
    assert module in hidden and rest == f"is not installed: run pip install '{target}'", line
    assert not (tmp_path / "out").exists()
    assert registry_state(url, home) == before
