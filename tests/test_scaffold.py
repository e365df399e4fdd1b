"""``mtreg new-plugin``: the generated package loads as a plugin, reads CSV/TSV/JSONL, is
ruff-clean, passes its own test and builds with pip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner
from helpers import missing

from mtreg.cli.main import cli
from mtreg.cli.scaffold import plan_plugin, scaffold_plugin
from mtreg.errors import MtregError
from mtreg.plugins.loader import discover

if TYPE_CHECKING:
    from factories import Checkpoints  # imports torch, which the other tests here do not need

RUFF = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))


def test_generated_plugin_loads_and_reads_each_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_plugin("my-para", ["no", "yes"], pair=True, trunk="tiny", max_length=64)
    target = scaffold_plugin(plan, tmp_path)

    assert target == tmp_path / "my-para"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "README.md",
        "pyproject.toml",
        "src/mtreg_my_para/__init__.py",
        "tests/test_mtreg_my_para.py",
    ]
    assert 'my-para = "mtreg_my_para"' in (target / "pyproject.toml").read_text()
    found = discover([target / "src"])
    (info,) = [p for p in found.plugins if p.name == "mtreg_my_para"]
    assert (info.error, info.tasks) == (None, ["my-para"])
    spec = found.task("my-para").spec
    assert (spec.head.kind, spec.head.labels, spec.inputs) == (
        "classification",
        ("no", "yes"),
        ("text", "text_pair"),
    )
    assert (spec.trunk, spec.max_length, spec.weights) == ("tiny", 64, None)

    data = tmp_path / "data" / "my-para"
    data.mkdir(parents=True)
    (data / "train.csv").write_text('text,text_pair,label\n"a, b",c,yes\nd,e,no\n')
    (data / "dev.tsv").write_text('text\ttext_pair\tlabel\n"x\ty\tno\n')
    (data / "test.jsonl").write_text(json.dumps({"text": "p", "text_pair": "q", "label": "yes"}))
    monkeypatch.setenv("MTREG_DATA_DIR", str(tmp_path / "data"))
    assert spec.load_dataset("train") == [
        {"text": "a, b", "text_pair": "c", "label": "yes"},
        {"text": "d", "text_pair": "e", "label": "no"},
    ]
    assert spec.load_dataset("dev") == [{"text": '"x', "text_pair": "y", "label": "no"}]
    assert spec.load_dataset("test") == [{"text": "p", "text_pair": "q", "label": "yes"}]

    (data / "dev.csv").write_text("text,text_pair,label\nx,y,maybe\n")
    with pytest.raises(MtregError, match="several files"):
        spec.load_dataset("dev")
    (data / "dev.tsv").unlink()
    with pytest.raises(MtregError, match=r"dev\.csv:2: unknown label 'maybe'"):
        spec.load_dataset("dev")


def test_trained_weights_are_picked_up(tmp_path: Path) -> None:
    target = scaffold_plugin(plan_plugin("w", ["a", "b"]), tmp_path)
    weights = target / "src" / "mtreg_w" / "weights" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    assert discover([target / "src"]).task("w").spec.weights == weights


@pytest.mark.parametrize(
    ("kind", "labels", "pair"),
    [
        ("classification", ["neg", "pos"], False),
        ("multilabel", [f"topic_number_{i}" for i in range(12)], True),
        ("regression", [], True),
        ("regression", ["x", "y"], False),
        ("tagging", ["O", "B-loc", "I-loc"], False),
    ],
)
def test_generated_code_is_ruff_clean_for_every_kind(
    tmp_path: Path, kind: str, labels: list[str], pair: bool
) -> None:
    if not Path(RUFF).exists():
        missing("ruff is not installed: pip install -e '.[test]'")
    name = "n" * 64  # the longest name must not break the line length
    target = scaffold_plugin(plan_plugin(name, labels, kind=kind, pair=pair), tmp_path)
    for args in (["check", "--no-cache", "."], ["format", "--no-cache", "--check", "."]):
        run = subprocess.run([RUFF, *args], cwd=target, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_cli_writes_the_package_and_refuses_an_existing_one(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["new-plugin", "tags", "--labels", "O,B-x,I-x", "--kind", "tagging"]
    result = runner.invoke(cli, [*args, "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "mtreg onboard tags --data-dir" in result.output
    assert (tmp_path / "tags" / "src" / "mtreg_tags" / "__init__.py").is_file()

    again = runner.invoke(cli, [*args, "--dir", str(tmp_path)])
    assert again.exit_code == 1
    assert "already exists" in again.output and len(again.output.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["tags"]  # no staging folder left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad", "--labels", "a,b"], "invalid task name"),
        (["x", "--labels", "a"], "at least 2 labels"),
        (["x"], "needs --labels"),
        (["x", "--labels", "a,a"], "repeat"),
        (["x", "--labels", "a|b,c", "--kind", "multilabel"], "cannot contain"),
        (["x", "--labels", "O,B-a", "--kind", "tagging", "--pair"], "one text field"),
    ],
)
def test_cli_refuses_bad_settings(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["new-plugin", *args, "--dir", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_generated_package_passes_its_own_test_and_builds(tmp_path: Path) -> None:
    target = scaffold_plugin(plan_plugin("demo-x", ["a", "b", "c"], kind="multilabel"), tmp_path)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=target,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "6 passed" in tests.stdout

    site = tmp_path / "site"
    pip_args = ["--no-index", "--target", str(site), str(target)]
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            *pip_args,
        ],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0 and "setuptools" in build.stderr and "No module" in build.stderr:
        missing("setuptools is not installed in this environment: cannot build offline")
    assert build.returncode == 0, build.stdout + build.stderr
    assert (site / "mtreg_demo_x" / "__init__.py").is_file()
    (info,) = site.glob("mtreg_demo_x-0.1.0.dist-info")
    assert "demo-x = mtreg_demo_x" in (info / "entry_points.txt").read_text()


@pytest.mark.slow
def test_scaffolded_plugin_installs_and_onboards_in_a_subprocess(
    tmp_path: Path, checkpoints: Checkpoints
) -> None:
    """What the README promises a task author: generate, install, onboard."""
    target = scaffold_plugin(plan_plugin("reviews", ["neg", "pos"], trunk="tiny"), tmp_path)
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--no-index",
            "--target",
            str(site),
            str(target),
        ],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0 and "No module" in install.stderr:
        missing("setuptools is not installed in this environment: cannot build offline")
    assert install.returncode == 0, install.stderr
    data = tmp_path / "data" / "reviews"
    data.mkdir(parents=True)
    good, bad = (
        ["good great love", "excellent fun fine"],
        ["bad awful hate", "terrible boring slow"],
    )
    for split, repeat in (("train", 12), ("dev", 3)):
        rows = [f"{good[i % 2]} {i},pos" for i in range(repeat)]
        rows += [f"{bad[i % 2]} {i},neg" for i in range(repeat)]
        (data / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "MTREG_HOME": str(tmp_path / "home"),
        "MTREG_LOAD_PLUGINS": "reviews",
    }
    env.pop("MTREG_DATABASE_URL", None)

    def mtreg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mtreg", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    trunk = checkpoints.copy(tmp_path / "trunk", num_layers=2)
    assert mtreg("init").returncode == 0  # commands other than init never create a registry
    assert mtreg("trunk", "add", "tiny", str(trunk)).returncode == 0
    onboard = mtreg(
        "onboard", "reviews", "--data-dir", str(tmp_path / "data"), "--layers", "1",
        "--lr", "1e-3", "--student-lr", "1e-3", "--epochs", "2", "--json",
    )  # fmt: skip
    assert onboard.returncode == 0, onboard.stderr
    listed = json.loads(mtreg("list", "--json").stdout)
    assert [(t["name"], t["active_version"]) for t in listed] == [("reviews", "1.0.0")]
