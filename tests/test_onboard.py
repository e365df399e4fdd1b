"""``mtreg train``/``distill``/``onboard`` end to end on a tiny random BERT: registration and
bundle, resuming after a kill, and the one-line errors a user can cause."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from toy import FAST, FLAGS, OpenRegistry

from mtreg.artifacts.branch_file import read_branch
from mtreg.artifacts.config import TrunkConfig
from mtreg.cli.main import cli
from mtreg.errors import MtregError, NotFound
from mtreg.registry.api import Registry
from mtreg.training import stages
from mtreg.training.onboard import distill_task, onboard
from mtreg.training.settings import Settings, default_teacher_layers, parse_range
from mtreg.training.stages import threshold


@pytest.mark.slow
def test_onboard_through_the_cli_registers_the_task_and_builds_a_bundle(
    toy_registry: OpenRegistry, tmp_path: Path, db_url: str
) -> None:
    registry = toy_registry(tmp_path, db_url)
    registry.close()
    base = ["--db", db_url, "--home", str(tmp_path / "home")]
    base += ["--plugins-dir", str(tmp_path / "plugins")]
    result = CliRunner().invoke(cli, [*base, "onboard", "toy", *FLAGS, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["stage"] for r in report["runs"]] == ["teacher", "student"]
    assert report["changes"]["tasks"][0]["change"] == "added"
    assert report["chosen"]["layers"] in (1, 2) and report["budget"]["runs"] == 2
    weights = Path(report["weights"])
    assert weights == tmp_path / "home" / "trained" / "toy" / "1.0.0.safetensors"
    with Registry(db_url, tmp_path / "home", [tmp_path / "plugins"]) as reg:
        meta, _ = read_branch(weights, TrunkConfig(**reg.trunk("tiny").config))
        assert meta.fork_depth == 1 and meta.training["teacher_layers"] == 2
        assert meta.training["dev_metrics"] == report["chosen"]["dev_metrics"]
        assert reg.task("toy").active_version == "1.0.0"
        assert reg.bundle("latest").members == {"toy": "1.0.0"}
    # The table form, run again: every run resumes and registration is unchanged.
    again = CliRunner().invoke(cli, [*base, "onboard", "toy", *FLAGS])
    assert again.exit_code == 0, again.output
    assert "resumed" in again.output and "toy 1.0.0: unchanged" in again.output
    assert "chosen:" in again.output and "budget:" in again.output


@pytest.mark.slow
def test_a_killed_onboarding_resumes_at_the_run_it_reached(
    toy_registry: OpenRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = toy_registry(tmp_path)
    settings = Settings(**{**FAST.__dict__, "teacher_layers": (2, 3), "epochs": 3})

    def killed(line: str) -> None:
        if line.startswith("student"):
            raise KeyboardInterrupt  # as if the process died during distillation

    with pytest.raises(KeyboardInterrupt):
        onboard(registry, "toy", settings, progress=killed)
    assert registry.tasks() == []
    calls = []
    real_fit = stages.fit
    monkeypatch.setattr(stages, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    report = onboard(registry, "toy", settings)
    teachers = [r for r in report.runs if r.stage == "teacher"]
    assert len(teachers) == 2 and all(r.resumed for r in teachers)
    assert len(calls) == len(report.runs) - 2  # only the students trained this time
    assert registry.task("toy").active_version == "1.0.0"
    registry.close()


@pytest.mark.slow
def test_train_then_distill_through_the_cli(toy_registry: OpenRegistry, tmp_path: Path) -> None:
    toy_registry(tmp_path).close()
    base = ["--db", f"sqlite:///{tmp_path / 'registry.db'}", "--home", str(tmp_path / "home")]
    base += ["--plugins-dir", str(tmp_path / "plugins")]
    runner = CliRunner()
    early = runner.invoke(cli, [*base, "distill", "toy"])
    assert early.exit_code == 1 and "no teacher yet" in early.output
    bf16 = ["--precision", "bf16"]
    trained = runner.invoke(cli, [*base, "train", "toy", "--layers", "2", "--lr", "3e-3", *bf16])
    assert trained.exit_code == 0, trained.output
    assert "best teacher: teacher-L2" in trained.output
    out = tmp_path / "student.safetensors"
    distilled = runner.invoke(
        cli, [*base, "distill", "toy", "--layers", "1", "--out", str(out), *bf16]
    )
    assert distilled.exit_code == 0, distilled.output
    assert out.is_file() and "wrote" in distilled.output
    with Registry(base[1], tmp_path / "home", [tmp_path / "plugins"]) as reg:
        meta, _ = read_branch(out, TrunkConfig(**reg.trunk("tiny").config))
    assert meta.training["recipe"]["precision"] == "bf16"
    bad = runner.invoke(cli, [*base, "train", "toy", "--precision", "fp8"])
    assert bad.exit_code == 2 and "'fp8' is not one of 'fp32', 'bf16'" in bad.output


@pytest.mark.parametrize(
    ("task", "error", "message"),
    [
        ("unknown", NotFound, "no plugin offers task 'unknown'"),
        ("nodata", MtregError, "has no dataset loader"),
        ("ghost", NotFound, "trunk 'missing' is not registered"),
        ("empty", MtregError, "its dev split is empty"),
        ("badlabel", MtregError, "label 'neutral' is not in the head's labels"),
    ],
)
def test_user_errors_are_one_line_mtreg_errors(
    toy_registry: OpenRegistry, tmp_path: Path, task: str, error: type, message: str
) -> None:
    with toy_registry(tmp_path) as registry, pytest.raises(error, match=message) as info:
        onboard(registry, task, FAST)
    assert "\n" not in str(info.value)


def test_cli_errors_exit_1_with_one_line(toy_registry: OpenRegistry, tmp_path: Path) -> None:
    toy_registry(tmp_path).close()
    base = ["--db", f"sqlite:///{tmp_path / 'registry.db'}", "--home", str(tmp_path / "home")]
    base += ["--plugins-dir", str(tmp_path / "plugins")]
    result = CliRunner().invoke(cli, [*base, "onboard", "empty"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "dev split is empty" in result.output
    bad = CliRunner().invoke(cli, [*base, "train", "toy", "--search", "3..1"])
    assert bad.exit_code == 1 and "invalid range" in bad.output


def test_a_home_without_the_trunk_objects_is_a_one_line_error(
    toy_registry: OpenRegistry, tmp_path: Path
) -> None:
    toy_registry(tmp_path).close()
    base = ["--db", f"sqlite:///{tmp_path / 'registry.db'}", "--plugins-dir"]
    base += [str(tmp_path / "plugins")]
    # The database's home is tmp_path/home; pointing at another one loses every object.
    result = CliRunner().invoke(cli, [*base, "--home", str(tmp_path / "other"), "onboard", "toy"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().count("\n") == 0
    assert "trunk 'tiny', tokenizer" in result.output and "missing from the store" in result.output
    assert "MTREG_HOME" in result.output


def test_settings_helpers() -> None:
    assert parse_range("1..3") == (1, 2, 3) and parse_range("2") == (2,)
    assert default_teacher_layers(6) == (2, 3) and default_teacher_layers(12) == (4, 5, 6)
    assert threshold(0.9, 0.99) == pytest.approx(0.891)
    assert threshold(-0.5, 0.99) == pytest.approx(-0.505)
    with pytest.raises(MtregError, match="tolerance"):
        Settings(tolerance=1.5).check()


@pytest.mark.slow
def test_onboard_trains_no_student_larger_than_the_first_good_enough_one(
    toy_registry: OpenRegistry, tmp_path: Path
) -> None:
    wide = replace(FAST, teacher_layers=(3,), student_layers=(1, 2), tolerance=0.5)
    with toy_registry(tmp_path) as registry:
        report = onboard(registry, "toy", wide, register=False)
        students = [r for r in report.runs if r.stage == "student"]
        # l=1 reaches half the teacher's score (the toy task is easy): l=2 is never trained.
        assert [r.layers for r in students] == [1]
        assert report.chosen.layers == 1
        floor = threshold(report.teacher.dev_metrics["accuracy"], 0.5)
        assert students[0].dev_metrics["accuracy"] >= floor
        # `mtreg distill` follows the same rule: whatever the scores, it stops exactly at
        # the first l that reaches the floor, and trains every l before it.
        strict = replace(wide, tolerance=1.0, student_lrs=(1e-5,))
        result, _, _ = distill_task(registry, "toy", strict)
        floor = threshold(report.teacher.dev_metrics["accuracy"], 1.0)
        trained = sorted({r.layers for r in result.runs})
        assert trained == [1, 2][: len(trained)]

        def good(layers: int) -> bool:
            return any(
                r.dev_metrics["accuracy"] >= floor for r in result.runs if r.layers == layers
            )

        assert not any(good(layers) for layers in trained[:-1])  # went on: it fell short
        assert trained[-1] == 2 or good(trained[-1])  # stopped early: it was good enough
