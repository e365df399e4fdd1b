"""bench/students.py: the students' rate diagnosis keeps the protocol's settings but for the
students' rates, and reports each student as a share of its teacher."""

from __future__ import annotations

from pathlib import Path

import protocol as p
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
    for seed, teacher in ((0, 0.80), (1, 0.90)):
        runs = [_run("teacher", 3, 2e-4, teacher)]
        runs += [
            _run("student", 1, lr, teacher * share) for lr, share in ((1e-4, 1.0), (5e-4, 0.9))
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
        (1, 1e-4, 2, 2),
        (1, 5e-4, 0, 2),
    ]
    assert abs(summed[0]["mean_share"] - 1.0) < 1e-9 and abs(summed[1]["mean_share"] - 0.9) < 1e-9
