"""The suite's own rules for what it cannot run here: a part that is missing
(helpers.missing) skips with the reason on a workstation and fails under CI, so that CI never
passes over a test silently; the tests that need a GPU run only when ``--gpu`` asks for them
(tests/conftest.py), and then fail where there is none."""

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


def pytest_in_repo(*args: str) -> str:
    """Run pytest on ``args`` from the repository root; return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *args],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.stdout


def test_the_gpu_tests_are_left_out_unless_asked_for() -> None:
    device_tests = "tests/test_serving_device.py"
    default = pytest_in_repo("--collect-only", device_tests)
    assert "gpu tests: left out; `scripts/dev test --gpu` runs them" in default
    assert "3 deselected" in default and "skipped" not in default
    assert "test_the_gpu_answers_as_the_cpu_does" not in default
    assert "test_an_unknown_device_is_refused" in default
    asked = pytest_in_repo("--collect-only", "--gpu", device_tests)
    assert "gpu tests: included (--gpu)" in asked and "deselected" not in asked
    assert "test_the_gpu_answers_as_the_cpu_does[torch]" in asked
    assert "test_the_onnx_graph_on_the_cuda_provider_answers_as_on_the_cpu" in asked


@pytest.mark.slow
def test_a_gpu_test_asked_for_where_there_is_no_gpu_fails_with_the_reason() -> None:
    import torch

    ran = pytest_in_repo(
        "-rf", "--gpu", "-k", "gpu_answers and torch", "tests/test_serving_device.py"
    )
    if torch.cuda.is_available():
        assert "1 passed" in ran, ran
    else:
        assert "1 failed" in ran and "skipped" not in ran, ran
        assert "no CUDA GPU here (torch.cuda.is_available() is False)" in ran
