"""The suite's own rule for what it cannot run here (helpers.missing): a workstation skips
with the reason, CI fails, so that CI never passes over a test silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROBE = """
from helpers import missing, require_namespaces

def test_without_the_tool():
    missing("frobnicator is not installed: pip install frobnicator")

def test_without_namespaces():
    require_namespaces(probe="exit 3")
"""


@pytest.mark.parametrize(
    ("ci", "outcome"), [(None, "2 skipped"), ("", "2 skipped"), ("true", "2 failed")]
)
def test_a_missing_part_skips_with_its_reason_and_fails_under_ci(
    tmp_path: Path, ci: str | None, outcome: str
) -> None:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-rsf", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in done.stdout, done.stdout
    assert "frobnicator is not installed: pip install frobnicator" in done.stdout
    assert "cannot make private namespaces (--mount)" in done.stdout
