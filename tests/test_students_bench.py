"""bench/students.py: the students' rate diagnosis keeps the protocol's settings but for the
students' rates, and reports each student as a share of its teacher."""

from __future__ import annotations

from pathlib import Path

import protocol as p
import pytest
import students as st


def test_the_runner_searches_the_student_rates_and_keeps_the_protocols_other_settings() -> None:
    unit = st.units((0,))[0]
    assert (unit.task, unit.method, unit.lr, unit.layers) == ("mrpc", "branch", 2e-4, 3)
    ours, theirs = st.StudentRunner().settings(unit), p.Runner().settings(unit)
    assert ours.student_lrs == st.STUDENT_LRS and ours.student_lrs != theirs.student_lrs
    assert ours.teacher_layers == theirs.teacher_layers == (3,)
    assert ours.teacher_lrs == theirs.teacher_lrs and ours.seed == theirs.seed


def _run(stage: str, layers: int, lr: float, score: float) -> dict:
    reported = {"metrics": {"f1": score}}
    return {"stage": stage, "layers": layers, "lr": lr, "reported": reported}


def test_each_student_is_reported_as_a_share_of_its_teacher(tmp_path: Path) -> None:
    # Each seed's best student is at another rate.
    for seed, teacher, shares in ((0, 0.80, (1.0, 0.9)), (1, 0.90, (0.95, 0.99))):
        runs = [_run("teacher", 3, 2e-4, teacher)]
        runs += [
            _run("student", 1, lr, teacher * share)
            for lr, share in zip((1e-4, 5e-4), shares, strict=True)
        ]
        for r in runs:
            r |= {"best_epoch": 2, "epochs_run": 5}
        unit = p.Unit("mrpc", "branch", 2e-4, seed, 3)
        p.write_unit(unit.path(tmp_path), {"metric": "f1", "runs": runs, "unit": unit.__dict__})
    rows = st.rows(tmp_path)
    assert [(r["seed"], r["lr"]) for r in rows] == [(0, 1e-4), (0, 5e-4), (1, 1e-4), (1, 5e-4)]
    assert rows[1]["teacher"] == 0.80 and rows[1]["epochs"] == "2/5"
    summed = st.summary(rows)
    assert [(s["layers"], s["lr"], s["within"], s["units"]) for s in summed] == [
        (1, 1e-4, 1, 2),
        (1, 5e-4, 1, 2),
        (1, None, 2, 2),  # the best of the rates in each unit
    ]
    assert [s["mean_share"] for s in summed] == pytest.approx([0.975, 0.945, 0.995])


def _branch_row(stage: str, layers: int, depth: int, lr: float, dev: float) -> dict:
    """A run of a branch unit, scored ``dev`` on dev and 0.90 on the reported split."""
    return {
        "stage": stage,
        "layers": layers,
        "fork_depth": depth,
        "lr": lr,
        "epochs": 10,
        "best_epoch": 3,
        "epochs_run": 6,
        "dev_metrics": {"f1": dev},
        "seconds": 1.0,
        "reported": {"metrics": {"f1": 0.90}},
        "layers_per_request": depth + layers,
    }


def _second_stage_units(students: Path, protocol_root: Path) -> None:
    """MRPC, 2 seeds, full fine-tuning 0.90. The L=3 teacher (0.90 on dev) beats L=2; its
    1-layer student reaches 0.99 of it at 2e-4 on seed 0 and at 5e-4 on seed 1 only."""
    for seed in (0, 1):
        full = p.Unit("mrpc", "full", 1e-4, seed)
        runs = [{"reported": {"metrics": {"f1": 0.90}}, "layers_per_request": 6}]
        p.write_unit(full.path(protocol_root), {"metric": "f1", "runs": runs})
        shallow = p.Unit("mrpc", "branch", 2e-4, seed, 2)
        runs = [_branch_row("teacher", 2, 4, 2e-4, 0.80)]
        p.write_unit(shallow.path(students), {"metric": "f1", "runs": runs})
        good = {0: 2e-4, 1: 5e-4}[seed]
        runs = [_branch_row("teacher", 3, 3, 2e-4, 0.90)]
        runs += [
            _branch_row("student", 1, 3, lr, 0.895 if lr == good else 0.85) for lr in (2e-4, 5e-4)
        ]
        runs += [_branch_row("student", 2, 3, lr, 0.90) for lr in (2e-4, 5e-4)]
        if seed == 0:  # the 2e-4 student that qualifies also scores higher where reported
            runs[1]["reported"] = {"metrics": {"f1": 0.91}}
        deep = p.Unit("mrpc", "branch", 2e-4, seed, 3)
        p.write_unit(deep.path(students), {"metric": "f1", "runs": runs, "unit": deep.__dict__})


@pytest.fixture
def one_task_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    import protocol_choice

    choice = {"full_lr": 1e-4, "search": [2, 3], "teacher_lr": 2e-4, "tolerance": 0.99}
    monkeypatch.setattr(protocol_choice, "choose", lambda _root: choice)
    monkeypatch.setattr(p, "CHOOSING", ("mrpc",))
    monkeypatch.setattr(p, "SEEDS", (0, 1))
    monkeypatch.setattr(st, "STUDENT_LRS", (2e-4, 5e-4))


def test_the_rate_sets_compose_as_onboard_serves_and_the_budget_rules_out_two_rates(
    tmp_path: Path, one_task_protocol: None
) -> None:
    students, protocol_root = tmp_path / "students", tmp_path / "protocol"
    _second_stage_units(students, protocol_root)
    stage = st.composed(students, protocol_root)
    table = {tuple(r["student_lrs"]): r for r in stage["rows"]}
    assert list(table) == [(2e-4,), (5e-4,), (2e-4, 5e-4)]
    # One rate: a 1-layer student on one seed, 2 layers on the other; both rates: 1 on both.
    assert [table[k]["layers"] for k in table] == [4.5, 4.5, 4.0]
    assert table[(2e-4,)]["ratio"] == pytest.approx((0.91 / 0.90 + 1.0) / 2)
    assert table[(5e-4,)]["ratio"] == pytest.approx(1.0)
    assert [table[k]["budget"] for k in table] == [True, True, False]
    assert all(r["cells"] == 2 for r in stage["rows"])
    # Every set reaches the goal's ratio: the fewest layers wins, among those that fit.
    assert stage["chosen"] == [2e-4]
    assert stage["chosen_ignoring_budget"] == [2e-4, 5e-4]


def test_a_rate_set_is_not_chosen_while_a_unit_is_missing(
    tmp_path: Path, one_task_protocol: None
) -> None:
    students, protocol_root = tmp_path / "students", tmp_path / "protocol"
    _second_stage_units(students, protocol_root)
    # The protocol's own L=2 unit does not stand in for the one retrained here.
    p.Unit("mrpc", "branch", 2e-4, 1, 2).path(students).rename(
        p.Unit("mrpc", "branch", 2e-4, 1, 2).path(protocol_root)
    )
    stage = st.composed(students, protocol_root)
    assert all(r["cells"] == 1 for r in stage["rows"])
    assert stage["chosen"] is None and stage["chosen_ignoring_budget"] is None


def test_a_protocol_run_that_scores_otherwise_when_retrained_is_named(tmp_path: Path) -> None:
    students, protocol_root = tmp_path / "students", tmp_path / "protocol"
    unit = p.Unit("mrpc", "branch", 2e-4, 0, 3)
    ours = [_branch_row("teacher", 3, 3, 2e-4, 0.90), _branch_row("student", 1, 3, 5e-4, 0.85)]
    ours.append(_branch_row("student", 1, 3, 2e-4, 0.88))  # not in the protocol's unit
    p.write_unit(unit.path(students), {"metric": "f1", "runs": ours})
    theirs = [_branch_row("teacher", 3, 3, 2e-4, 0.90), _branch_row("student", 1, 3, 5e-4, 0.86)]
    p.write_unit(unit.path(protocol_root), {"metric": "f1", "runs": theirs})
    assert st.unreproduced(students, protocol_root) == [
        "mrpc branch-L3-lr0.0002-seed0: student k3 l1 lr0.0005"
    ]
    theirs[1]["dev_metrics"] = {"f1": 0.85}
    p.write_unit(unit.path(protocol_root), {"metric": "f1", "runs": theirs})
    assert st.unreproduced(students, protocol_root) == []
    # Trained at another precision: still named, with the precisions.
    theirs[1]["dev_metrics"] = {"f1": 0.86}
    written = {"metric": "f1", "runs": theirs, "precision": "fp32"}
    p.write_unit(unit.path(protocol_root), written)
    p.write_unit(unit.path(students), {"metric": "f1", "runs": ours, "precision": "bf16"})
    assert st.unreproduced(students, protocol_root) == [
        "mrpc branch-L3-lr0.0002-seed0: student k3 l1 lr0.0005 (fp32 there, bf16 here)"
    ]
