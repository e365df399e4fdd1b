"""The quality protocol (bench/protocol.py): choosing and judging tasks never overlap, units
resume (a finished unit is skipped, a half-written one is run again), and the choice is
composed from the units by ``mtreg onboard``'s own rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import protocol as p
import protocol_choice as pc
import protocol_report as pr
import pytest
import students

from mtreg.training.settings import MAX_EPOCHS


def test_no_task_both_chooses_and_judges_in_a_fold() -> None:
    for fold in p.FOLDS:
        assert not set(fold["choose"]) & set(fold["judge"])
        assert set(fold["choose"]) | set(fold["judge"]) <= set(p.TASKS)
    units = p.choosing_units()
    assert {u.task for u in units} == set(p.CHOOSING)
    assert not {u.task for u in p.judging_units(5e-5, 2e-4, (2, 3))} & set(p.CHOOSING)


def test_every_candidate_runs_on_every_seed_with_the_same_number_of_rates() -> None:
    units = p.choosing_units(["mrpc"])
    full = [u for u in units if u.method == "full"]
    branch = [u for u in units if u.method == "branch"]
    assert len(p.SEEDS) >= 2 and len(p.FULL_LRS) == len(p.TEACHER_LRS)
    assert len(full) == len(p.FULL_LRS) * len(p.SEEDS)
    assert len(branch) == len(p.TEACHER_LRS) * len(p.SEEDS) * 2  # L in 2..3
    assert len({u.path() for u in units}) == len(units)  # one file each


def test_every_searched_depth_fits_the_onboarding_budget_at_equal_epochs() -> None:
    assert p.search_layers((2, 3)) == 2 + 1 + 3 + (1 + 2)  # teachers and their students
    assert p.search_layers((2, 3), student_rates=2) == 2 + 2 * 1 + 3 + 2 * (1 + 2)
    assert all(p.within_budget(s) for s in p.TEACHER_SEARCHES)
    assert not p.within_budget((2, 3, 4))  # why L=4 is not searched
    assert not p.within_budget((2, 3), student_rates=2)  # nor a second student rate
    assert p.within_budget((2,), student_rates=2)


def _compute(calls: list[str]):
    def compute(unit: p.Unit) -> dict[str, Any]:
        calls.append(unit.name)
        return {"metric": "accuracy", "runs": []}

    return compute


def test_a_finished_unit_is_skipped_and_a_half_written_one_runs_again(tmp_path: Path) -> None:
    units = [p.Unit("mrpc", "full", lr, 0) for lr in p.FULL_LRS]
    calls: list[str] = []
    assert set(p.run_units(units, _compute(calls), tmp_path)) == set(units)
    assert sorted(calls) == sorted(u.name for u in units)
    written = json.loads(units[0].path(tmp_path).read_text())
    assert written["finished"] and written["hours"] >= 0 and written["unit"]["lr"] == units[0].lr

    calls.clear()
    assert p.run_units(units, _compute(calls), tmp_path) == [] and calls == []

    text = units[1].path(tmp_path).read_text()
    units[1].path(tmp_path).write_text(text[: len(text) // 2])  # killed mid-write
    units[2].path(tmp_path).write_text(json.dumps({"runs": []}))  # no "finished" mark
    assert p.read_unit(units[1].path(tmp_path)) is None
    assert set(p.run_units(units, _compute(calls), tmp_path)) == {units[1], units[2]}
    assert sorted(calls) == sorted([units[1].name, units[2].name])
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporaries left behind


def test_a_unit_claimed_by_a_live_runner_is_left_to_it_and_a_dead_ones_claim_is_taken(
    tmp_path: Path,
) -> None:
    units = [p.Unit("mrpc", "full", lr, 0) for lr in p.FULL_LRS]
    held = p.claim(units[0], tmp_path)
    assert held is not None and held.read_text() == str(os.getpid())
    assert p.claim(units[0], tmp_path) is None  # this live process holds it
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, check=True)
    stale = tmp_path / p.CLAIMS / f"mrpc-{units[1].name}.pid"
    stale.write_text(dead.stdout.strip())
    calls: list[str] = []
    assert set(p.run_units(units, _compute(calls), tmp_path)) == set(units[1:])
    assert sorted(calls) == sorted(u.name for u in units[1:])
    assert p.read_unit(units[0].path(tmp_path)) is None
    assert list((tmp_path / p.CLAIMS).iterdir()) == [held]  # the runner released its claims


def test_judging_runs_every_task_on_the_first_seed_before_any_on_the_second() -> None:
    order = p.run_order(p.judging_units(5e-5, 2e-4, (2, 3)) + p.choosing_units(["mrpc"]))
    seeds = [u.seed for u in order if u.task in p.JUDGING]
    assert seeds == sorted(seeds) and set(seeds) == set(p.SEEDS)
    assert {(u.task, u.method) for u in order if u.task in p.JUDGING and u.seed == 0} == {
        (task, method) for task in p.JUDGING for method in ("full", "branch")
    }
    choosing = [u for u in order if u.task in p.CHOOSING]
    assert choosing == sorted(choosing, key=lambda u: (u.estimate(), u.name))  # cheapest first


def test_units_stop_before_the_stop_time(tmp_path: Path) -> None:
    calls: list[str] = []
    units = [p.Unit("cola", "full", 2e-5, 0)]
    assert p.run_units(units, _compute(calls), tmp_path, until=0.0) == [] and calls == []
    assert units[0].estimate() > 0 and MAX_EPOCHS >= 1


def test_the_stop_time_scales_estimates_by_how_long_finished_units_of_the_method_took(
    tmp_path: Path,
) -> None:
    finished, pending = p.Unit("cola", "full", 2e-5, 0), p.Unit("cola", "full", 5e-5, 0)
    half = finished.estimate() / 2 / 3600
    p.write_unit(finished.path(tmp_path), {"metric": "mcc", "runs": [], "hours": half})
    shares = p.realized_shares([finished, pending], tmp_path)
    assert shares == {"full": 0.5, ("cola", "full"): 0.5}
    # Another task's full unit takes the method's share; cola's the task's own.
    other = p.Unit("mrpc", "full", 2e-5, 0)
    assert p.expected_seconds(other, {"full": 0.5}) == other.estimate() / 2
    assert p.expected_seconds(pending, shares | {"full": 0.9}) == pending.estimate() / 2
    calls: list[str] = []
    # Time for 60% of the estimate: too little at the epoch cap, enough at the rate seen.
    until = time.time() + 0.6 * pending.estimate()
    assert p.run_units([finished, pending], _compute(calls), tmp_path, until=until) == [pending]
    assert calls == [pending.name]
    branch = p.Unit("cola", "branch", 2e-4, 0, 2)  # no branch unit finished: not scaled
    until = time.time() + 0.6 * branch.estimate()
    assert p.run_units([finished, branch], _compute(calls), tmp_path, until=until) == []


def _branch_unit(root: Path, task: str, seed: int, layers: int, rows: list[dict]) -> None:
    unit = p.Unit(task, "branch", 2e-4, seed, layers)
    p.write_unit(unit.path(root), {"metric": "accuracy", "runs": rows, "hours": 0.1})


def _row(stage: str, layers: int, depth: int, dev: float, reported: float) -> dict[str, Any]:
    return {
        "stage": stage,
        "layers": layers,
        "fork_depth": depth,
        "lr": 2e-4 if stage == "teacher" else 5e-4,
        "epochs": 10,
        "best_epoch": 3,
        "dev_metrics": {"accuracy": dev},
        "seconds": 1.0,
        "reported": {"metrics": {"accuracy": reported}},
        "layers_per_request": depth + layers,
    }


def test_the_served_branch_follows_onboards_choice(tmp_path: Path) -> None:
    # L=2 teacher (k=4) 0.80; L=3 teacher (k=3) 0.90 is best; its students l=1 0.88, l=2 0.895
    _branch_unit(
        tmp_path,
        "mrpc",
        0,
        2,
        [_row("teacher", 2, 4, 0.80, 0.79), _row("student", 1, 4, 0.80, 0.8)],
    )
    rows = [_row("teacher", 3, 3, 0.90, 0.91), _row("student", 1, 3, 0.88, 0.87)]
    rows.append(_row("student", 2, 3, 0.895, 0.9))
    _branch_unit(tmp_path, "mrpc", 0, 3, rows)
    units = pc.load(tmp_path)
    loose = pc.served(units, "mrpc", 0, (2, 3), 2e-4, 0.97)
    strict = pc.served(units, "mrpc", 0, (2, 3), 2e-4, 0.99)
    assert (loose["stage"], loose["layers"]) == ("student", 1)  # 0.88 >= 0.873
    assert (strict["stage"], strict["layers"]) == ("student", 2)  # 0.895 >= 0.891
    # A 1-layer student at another rate qualifies: served unless the rates leave it out.
    rows.append(_row("student", 1, 3, 0.893, 0.89) | {"lr": 2e-4})
    _branch_unit(tmp_path, "mrpc", 0, 3, rows)
    units = pc.load(tmp_path)
    both = pc.served(units, "mrpc", 0, (2, 3), 2e-4, 0.99)
    assert (both["layers"], both["lr"]) == (1, 2e-4)
    assert pc.served(units, "mrpc", 0, (2, 3), 2e-4, 0.99, student_lrs=(5e-4,)) == strict
    assert pc.served(units, "mrpc", 0, (2, 3, 4), 2e-4, 0.99) is None  # L=4 unit missing
    assert pc.served(units, "mrpc", 1, (2, 3), 2e-4, 0.99) is None  # seed 1 not run
    _branch_unit(tmp_path, "cola", 0, 2, [])  # every teacher diverged
    _branch_unit(tmp_path, "cola", 0, 3, [])
    assert pc.served(pc.load(tmp_path), "cola", 0, (2, 3), 2e-4, 0.99) == {"collapsed": True}


def test_the_plan_scales_what_is_pending_by_what_finished_units_took(tmp_path: Path) -> None:
    units = p.choosing_units()
    branch = [u for u in units if u.method == "branch"]
    for unit in branch[:2]:  # each took a quarter of its estimate
        p.write_unit(unit.path(tmp_path), {"hours": unit.estimate() / 3600 / 4, "runs": []})
    lines = pr.plan(tmp_path)
    full = sum(u.estimate() for u in units if u.method == "full") / 3600
    rest = sum(u.estimate() for u in branch[2:]) / 3600
    assert f"pending: {full + rest:.1f} CPU hours" in lines[-3]
    likely = full + rest / 4  # no full unit finished: their estimates stand
    assert lines[-2].startswith("finished units took branch units 25% of their estimates")
    assert lines[-2].endswith(f"about {likely:.1f} CPU hours")
    assert sum(" done (" in line for line in lines) == 2


REFERENCES = [1] * 120 + [0] * 80
CHOICE = {"full_lr": 5e-5, "search": [2, 3], "teacher_lr": 2e-4, "tolerance": 0.99}


def _predicted(wrong: int) -> dict[str, Any]:
    """The reported split with the first ``wrong`` examples mislabelled."""
    predictions = [1 - r if i < wrong else r for i, r in enumerate(REFERENCES)]
    accuracy = sum(a == b for a, b in zip(predictions, REFERENCES, strict=True)) / 200
    return {"metrics": {"accuracy": accuracy}, "predictions": predictions, "references": REFERENCES}


def _compared_task(root: Path, task: str, extra_wrong: int, full_wrong: int = 20) -> None:
    """Full fine-tuning wrong on ``full_wrong`` of 200 examples (90%) on both seeds;
    onboarding serves the L=3 teacher's 1-layer student (fork 3), wrong on ``extra_wrong``
    more examples."""
    for seed in p.SEEDS:
        full = {"reported": _predicted(full_wrong), "layers_per_request": 6}
        unit = p.Unit(task, "full", CHOICE["full_lr"], seed)
        p.write_unit(unit.path(root), {"metric": "accuracy", "runs": [full], "hours": 0.25})
        _branch_unit(root, task, seed, 2, [_row("teacher", 2, 4, 0.80, 0.79)])
        wrong = full_wrong + extra_wrong
        student = _row("student", 1, 3, 0.895, 0.0) | {"reported": _predicted(wrong)}
        _branch_unit(root, task, seed, 3, [_row("teacher", 3, 3, 0.90, 0.91), student])


def test_the_report_judges_each_task_and_each_fold_against_the_goal(tmp_path: Path) -> None:
    for task in p.JUDGING:
        _compared_task(tmp_path / "met", task, 0)
    rows = pr.task_rows(pc.load(tmp_path / "met"), CHOICE)
    assert [r["compared"]["ratio"] for r in rows] == [1.0] * len(p.JUDGING)
    judged = pr.verdict(rows, "judge", p.JUDGING)
    assert judged["complete"] and judged["every_task"] and judged["floors"]  # 90 > 60
    assert judged["layer_share"] == (3 + len(p.JUDGING)) / (6 * len(p.JUDGING))  # 9 of 36
    assert judged["met"] and pr.verdict_line(judged).endswith("floors cleared): met.")
    # Every task in, one seed of one task missing: open, and what holds so far.
    p.Unit("qqp", "full", CHOICE["full_lr"], 1).path(tmp_path / "met").unlink()
    partial = pr.task_rows(pc.load(tmp_path / "met"), CHOICE)
    judged = pr.verdict(partial, "judge", p.JUDGING)
    assert (judged["tasks"], judged["runs"], judged["complete"], judged["met"]) == (
        6,
        11,
        False,
        False,
    )
    assert pr.verdict_line(judged).endswith("open (11 of 12 task-seeds in); so far met.")
    assert pr.verdict(rows, "choose", p.CHOOSING) == {
        "fold": "choose",
        "tasks": 0,
        "of": 3,
        "runs": 0,
        "of_runs": 6,
        "complete": False,
    }

    _compared_task(tmp_path / "short", "rte", 5)  # 87.5 against 90: 97.2%, within noise
    _compared_task(tmp_path / "short", "sst2", 14)  # 83.0: 92.2%, clearly short
    rows = pr.task_rows(pc.load(tmp_path / "short"), CHOICE)
    rte, sst2 = (r["compared"] for r in rows)
    assert rte["ratio"] < pr.TASK_GOAL <= rte["high"] and rte["ok"]
    assert sst2["high"] < pr.TASK_GOAL and not sst2["ok"]
    assert rte["low"] < rte["ratio"] < rte["high"]
    judged = pr.verdict(rows, "judge", p.JUDGING)
    assert (judged["tasks"], judged["complete"], judged["met"]) == (2, False, False)
    assert judged["lowest"] == ["sst2", sst2["ratio"]] and not judged["every_task"]
    assert judged["cost"] == rte["cost"]
    assert judged["layer_share"] == 5 / 12  # the trunk to fork 3 and two 1-layer branches
    report = {"choice": CHOICE, "tasks": rows, "verdicts": [judged]}
    text = "\n".join(pr.comparison_markdown(report))
    assert rte["cost"] == 0.8  # two branch units of 0.1 h against a full unit of 0.25 h
    assert "| rte | judge | 90.0 | 87.5 | 97.2% [" in text
    assert "| 3+1, 3+1 | within noise | 0.80× |" in text
    assert "| sst2 | judge | 90.0 | 83.0 | 92.2% [" in text and "| 3+1, 3+1 | no | 0.80× |" in text
    assert "**judge** (2 of 6 tasks): mean 94.7% of full fine-tuning (lowest: sst2, 92.2%)" in text
    assert text.endswith("floors cleared): open (4 of 12 task-seeds in); so far not met.")


def test_a_task_below_its_floor_fails_the_goal_and_the_mean_without_it_is_shown(
    tmp_path: Path,
) -> None:
    _compared_task(tmp_path, "rte", 0, full_wrong=76)  # 62% against a majority of 60%
    _compared_task(tmp_path, "sst2", 0)
    rows = pr.task_rows(pc.load(tmp_path), CHOICE)
    assert [r["floor"]["clears"] for r in rows] == [False, True]
    judged = pr.verdict(rows, "judge", p.JUDGING)
    assert not judged["floors"] and not judged["met"]
    assert judged["below_floor"] == ["rte"] and judged["mean_above_floor"] == 1.0
    assert "floor on every task: no (not on rte; mean without it: 100.0%);" in pr.verdict_line(
        judged
    )
    _compared_task(tmp_path / "all", "sst2", 0)
    cleared = pr.verdict(pr.task_rows(pc.load(tmp_path / "all"), CHOICE), "judge", p.JUDGING)
    assert cleared["below_floor"] == [] and cleared["mean_above_floor"] is None
    assert "floor on every task: yes;" in pr.verdict_line(cleared)


def test_the_majority_floor_is_judged_over_every_seed_that_finished(tmp_path: Path) -> None:
    def full(seed: int, wrong: range) -> dict[str, Any] | None:
        """Write seed's full unit, wrong on the examples in ``wrong``; return the floor."""
        predictions = [1 - r if i in wrong else r for i, r in enumerate(REFERENCES)]
        reported = {"predictions": predictions, "references": REFERENCES}
        unit = p.Unit("rte", "full", CHOICE["full_lr"], seed)
        runs = [{"reported": reported}]
        p.write_unit(unit.path(tmp_path), {"metric": "accuracy", "runs": runs, "hours": 0.2})
        return pr.floor(pc.load(tmp_path), "rte", CHOICE["full_lr"])

    assert pr.floor(pc.load(tmp_path), "rte", CHOICE["full_lr"]) is None
    one = full(0, range(20))  # 90% against the majority's 60%
    assert one["seeds"] == 1 and one["majority"] == 0.6 and abs(one["diff"] - 0.30) < 1e-9
    width = one["high"] - one["low"]
    # A second seed wrong on the same examples adds no evidence: the interval stays.
    same = full(1, range(20))
    assert same["seeds"] == 2 and abs(same["high"] - same["low"] - width) < 1e-9
    # Wrong on other examples (85%): the mean moves and the interval narrows, but less than
    # pooling the two seeds' errors as if independent would (by the square root of two).
    other = full(1, range(100, 130))
    assert abs(other["full"] - 0.875) < 1e-9 and abs(other["diff"] - 0.275) < 1e-9
    assert width / 2**0.5 < other["high"] - other["low"] < width and other["clears"]
    full(1, range(20))
    unit = p.Unit("rte", "full", CHOICE["full_lr"], 1)
    written = json.loads(unit.path(tmp_path).read_text())
    written["runs"][0]["reported"]["references"] = REFERENCES[::-1]  # another split's order
    p.write_unit(unit.path(tmp_path), written)
    with pytest.raises(ValueError, match="seeds were scored on different examples; rerun"):
        pr.floor(pc.load(tmp_path), "rte", CHOICE["full_lr"])


def test_the_product_defaults_are_what_the_protocol_chose() -> None:
    # Issue #22: `mtreg onboard TASK` with no options is the configuration the report
    # judges. Until the choosing units are complete, the defaults must be a candidate.
    from mtreg.training.settings import Settings, default_teacher_layers

    report = json.loads((p.HERE / "results" / f"{pr.STEM}.json").read_text())
    defaults = Settings()
    search = default_teacher_layers(6)  # the MiniLM trunk the protocol runs on
    if report["complete"]:
        choice = report["choice"]
        assert tuple(choice["search"]) == search
        assert (choice["teacher_lr"],) == defaults.teacher_lrs
        assert choice["tolerance"] == defaults.tolerance
        # The students' rate: the second stage's choice (bench/students.py) on the same tasks.
        stage = json.loads((p.HERE / "results" / "students.json").read_text())["second_stage"]
        given = stage["config"]
        assert tuple(given["search"]) == search
        assert (given["teacher_lr"], given["tolerance"]) == (
            choice["teacher_lr"],
            choice["tolerance"],
        )
        assert tuple(stage["chosen"]) == defaults.student_lrs
    else:
        assert search in p.TEACHER_SEARCHES
        assert defaults.teacher_lrs[0] in p.TEACHER_LRS and len(defaults.teacher_lrs) == 1
        assert defaults.tolerance in p.TOLERANCES


def test_the_report_says_which_units_ran_at_another_precision(tmp_path: Path) -> None:
    ran = [("mrpc", "full", 1e-4, "fp32"), ("mrpc", "full", 2e-5, "bf16")]
    ran += [("rte", "full", 1e-4, "bf16"), ("rte", "branch", 2e-4, "bf16")]
    for task, method, lr, precision in ran:
        unit = p.Unit(task, method, lr, 0, 3 if method == "branch" else 0)
        p.write_unit(unit.path(tmp_path), {"precision": precision, "hours": 0.1})
    found = pr.precisions(pc.load(tmp_path))
    assert found == {
        "bf16": {"mrpc full": 1, "rte branch": 1, "rte full": 1},
        "fp32": {"mrpc full": 1},
    }
    assert pr.precision_line(found).endswith(": bf16 3; fp32 1 (mrpc full 1)")
    assert pr.precision_line({}) == "Units by precision: no unit has finished"


@pytest.mark.parametrize("text", ["25:00", "12:60", "noon", "12", "7:5x"])
def test_a_stop_time_that_is_not_hh_mm_is_a_usage_error_before_anything_runs(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for main in (p.main, students.main):
        with pytest.raises(SystemExit) as exit_:
            main(["--run", "--until", text])
        assert exit_.value.code == 2
        assert f"{text!r} is not a time of day: give HH:MM (UTC)" in capsys.readouterr().err
    ahead = p.until_seconds(time.strftime("%H:%M", time.gmtime(time.time() + 3600)))
    assert 3500 < (ahead - time.time()) % 86400 < 3700  # the same hour tomorrow past midnight


def test_the_rule_takes_the_fewest_layers_at_the_goal_else_the_highest_ratio() -> None:
    def row(ratio: float | None, layers: float) -> dict[str, Any]:
        return {"ratio": ratio, "layers": layers}

    at_goal = [row(0.999, 5.0), row(0.997, 4.5), row(1.01, 4.5), row(0.99, 3.0)]
    assert pc.pick(at_goal) == row(1.01, 4.5)  # fewest layers at the goal, then the ratio
    below = [row(0.98, 5.0), row(0.985, 5.5), row(None, 3.0)]
    assert pc.pick(below) == row(0.985, 5.5)  # none at the goal: the highest ratio
    assert pc.pick([row(None, 3.0)]) is None
