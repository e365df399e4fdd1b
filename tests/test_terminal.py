"""What a person at a terminal sees: tables cut to the terminal's width (whole in pipes and
``--json``), timestamps with their time zone, ``report`` as a table on a terminal and as
markdown in a file, ``show``'s labels as a list, and training that is never silent in a
log (a timestamped line per stage and per epoch from a real ``mtreg onboard``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import Checkpoints, make_branch_file
from helpers import STAMP, on_terminal, write_plugin
from toy import FLAGS, OpenRegistry

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.cli.main import cli
from mtreg.cli.output import ELLIPSIS, fit_widths, stamp, table_lines
from mtreg.core.spec import HeadSpec
from mtreg.registry.api import Registry

DESCRIPTION = "Product reviews from the spring survey, " * 4  # wider than any terminal
LABELS = ("negative", "neutral, mixed", "positive")  # one label holds a comma


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints
) -> Iterator[dict[str, str]]:
    """A registry (SQLite) holding task ``sentiment``, its branch scored as if trained, and
    a baseline file for ``report``; returns the environment that points mtreg at it."""
    root = tmp_path_factory.mktemp("terminal")
    trunk = checkpoints.copy(root / "trunk", num_layers=3, seed=0)
    weights = make_branch_file(
        root / "sentiment.safetensors",
        read_checkpoint(trunk),
        "sentiment",
        "1.0.0",
        2,
        1,
        HeadSpec("classification", LABELS),
        training={
            "dev_metrics": {"accuracy": 0.9},
            "teacher_dev_metrics": {"accuracy": 0.92},
            "teacher_layers": 1,
        },
    )
    spec = {"name": "sentiment", "version": "1.0.0", "head": ("classification", LABELS)}
    spec |= {"trunk": "tiny", "weights": str(weights), "description": DESCRIPTION}
    write_plugin(root / "plugins", "sentiment", [spec])
    env = {
        "MTREG_HOME": str(root / "home"),
        "MTREG_DATABASE_URL": f"sqlite:///{root / 'registry.db'}",
        "MTREG_PLUGINS_PATH": str(root / "plugins"),
    }
    with Registry(env["MTREG_DATABASE_URL"], root / "home", [root / "plugins"]) as registry:
        registry.add_trunk("tiny", trunk)
        registry.register(["sentiment"])
    baseline = root / "baseline.json"
    baseline.write_text(json.dumps({"sentiment": {"metric": "accuracy", "full": [0.93]}}))
    yield {**env, "BASELINE": str(baseline)}


def _cli(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


# -- tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [40, 60, 100])
def test_a_table_fits_the_width_cutting_the_widest_column(width: int) -> None:
    rows = [["sentiment", "1.0.0", DESCRIPTION], ["intent", "2.1.0", "short"]]
    lines = table_lines(rows, ["TASK", "VERSION", "DESCRIPTION"], width)
    assert all(len(line) <= width for line in lines)
    assert lines[2].startswith("sentiment  1.0.0") and lines[2].endswith(ELLIPSIS)
    assert lines[3].split() == ["intent", "2.1.0", "short"]
    kept = lines[2].split(maxsplit=2)[2][:-1]
    assert DESCRIPTION.startswith(kept) and len(kept) == width - len("sentiment  1.0.0    ") - 1


def test_without_a_width_nothing_is_cut_and_floors_hold() -> None:
    lines = table_lines([["a", DESCRIPTION]], ["X", "DESCRIPTION"])
    assert lines[2] == f"a  {DESCRIPTION}".rstrip()
    # No column is cut below its floor, even when the row then exceeds the limit.
    assert fit_widths([20, 30], [10, 12], 10) == [10, 12]
    assert fit_widths([5, 30], [8, 12], 100) == [5, 30]


def test_list_on_a_narrow_terminal_is_cut_and_json_and_pipes_keep_everything(
    world: dict[str, str],
) -> None:
    code, shown = on_terminal(["list"], world, columns=60)
    assert code == 0, shown
    lines = shown.splitlines()
    assert lines[0].split() == ["TASK", "ACTIVE", "LATEST", "TRUNK", "STATUS", "DESCRIPTION"]
    assert all(len(line) <= 60 for line in lines) and lines[2].endswith(ELLIPSIS)
    code, shown = on_terminal(["list", "--json"], world, columns=60)
    assert code == 0 and json.loads(shown)[0]["description"] == DESCRIPTION
    piped = subprocess.run(
        [sys.executable, "-m", "mtreg", "list"],
        env={**os.environ, **world, "COLUMNS": "60"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert DESCRIPTION.strip() in piped.stdout


# -- timestamps and show -----------------------------------------------------------------------


def test_stamp_gives_every_time_its_zone() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    assert stamp(datetime(2026, 1, 2, 3, 4, 5, 999)) == "2026-01-02T03:04:05+00:00"  # naive: UTC
    plus2 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert stamp(plus2) == "2026-01-02T03:04:05+02:00"
    assert re.fullmatch(STAMP, stamp()) and stamp(datetime.now(UTC)).endswith("+00:00")


def test_show_lists_labels_one_per_row_and_times_with_their_zone(world: dict[str, str]) -> None:
    out = _cli(world, "show", "sentiment")
    assert "[" not in out and "'" not in out  # no Python repr of the list
    rows = out.splitlines()
    first = next(i for i, row in enumerate(rows) if row.strip().startswith("labels"))
    values = [row.strip().removeprefix("labels").strip() for row in rows[first : first + 3]]
    assert values == list(LABELS)
    assert "classification, 3 label(s)" in out
    assert re.search(rf"registered\s+{STAMP}$", out, re.MULTILINE)
    assert re.search(rf"\s{STAMP}$", _cli(world, "versions", "sentiment"), re.MULTILINE)


# -- report ------------------------------------------------------------------------------------


def test_report_is_a_table_on_a_terminal_and_markdown_in_a_file(
    world: dict[str, str], tmp_path: Path
) -> None:
    code, shown = on_terminal(["report", "--baseline", world["BASELINE"]], world, columns=120)
    assert code == 0, shown
    lines = shown.splitlines()
    assert lines[0].split()[:3] == ["TASK", "METRIC", "(SPLIT)"] and "|" not in shown
    row = next(line for line in lines if line.startswith("sentiment "))
    assert "accuracy (dev)" in row and "k=2, l=1: 90.0" in row and "96.8%" in row
    assert "Mean quality ratio: 96.8% of full" in shown and "**" not in shown
    assert all(len(line) <= 120 for line in lines if line and not line.startswith("Mean"))
    out = tmp_path / "report.txt"
    with out.open("w") as handle:
        subprocess.run(
            [sys.executable, "-m", "mtreg", "report", "--baseline", world["BASELINE"]],
            env={**os.environ, **world},
            stdout=handle,
            check=True,
        )
    text = out.read_text()
    assert text.startswith("| task | metric (split) | full FT |")
    assert "| sentiment | accuracy (dev) | 93.0 | L=1: 92.0 | k=2, l=1: 90.0 | 96.8% |" in text
    assert "Mean quality ratio: **96.8%**" in text


# -- training in a log -------------------------------------------------------------------------


@pytest.mark.slow
def test_onboard_into_a_log_writes_a_timestamped_line_per_stage_and_epoch(
    toy_registry: OpenRegistry, tmp_path: Path
) -> None:
    toy_registry(tmp_path).close()
    env = {
        **os.environ,
        "MTREG_HOME": str(tmp_path / "home"),
        "MTREG_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "MTREG_PLUGINS_PATH": str(tmp_path / "plugins"),
    }
    flags = [*FLAGS, "--epochs", "2", "--student-search", "1..1", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "mtreg", "onboard", "toy", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["chosen"]["stage"] in ("teacher", "student")
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    assert all(re.match(f"{STAMP} ", line) for line in lines), lines
    texts = [line.split(" ", 1)[1] for line in lines]
    for run in ("teacher-L2-lr0.003", "student-k1-l1-lr0.003"):
        epochs = [t.split(":")[0] for t in texts if t.startswith(f"{run} epoch")]
        budget = len(epochs)  # students train twice the teacher's epochs
        assert budget >= 2 and epochs == [f"{run} epoch {e}/{budget}" for e in range(1, budget + 1)]
    assert any(t.startswith("cached train activations") for t in texts)
    assert any(t.startswith("chose ") for t in texts)
