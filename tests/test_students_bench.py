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
