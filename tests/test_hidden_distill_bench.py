"""bench/hidden_distill.py: a unit waits for bench/students.py's unit of its task and seed,
and the report sets each loss's students against their teacher, per rate."""

from __future__ import annotations

from pathlib import Path

import hidden_distill as hd
import protocol as p
import pytest
import students as st


def test_a_unit_is_ready_only_once_the_students_unit_of_its_task_and_seed_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(st, "ROOT", tmp_path)
    assert hd.units((0, 1)) == []
    done = p.Unit("stsb", "branch", st.TEACHER_LR, 1, st.TEACHER_LAYERS)
    p.write_unit(done.path(tmp_path), {"runs": []})
    assert hd.units((0, 1)) == [done]


def test_the_report_sets_each_loss_against_the_teacher_per_rate(tmp_path: Path) -> None:
    for seed, teacher, states_share in ((0, 0.80, 1.0), (1, 0.90, 0.95)):
        runs = [hd._row("soft", 5e-4, teacher * 0.9, 2, 5, 60.0)]
        runs.append(hd._row("soft+states", 5e-4, teacher * states_share, 3, 6, 70.0))
        unit = p.Unit("mrpc", "branch", 2e-4, seed, 3)
        data = {"metric": "f1", "teacher": teacher, "runs": runs, "unit": unit.__dict__}
        p.write_unit(unit.path(tmp_path / "units"), data)
    rows = hd.rows(tmp_path / "units")
    assert [(r["seed"], r["loss"]) for r in rows] == [
        (0, "soft"),
        (0, "soft+states"),
        (1, "soft"),
        (1, "soft+states"),
    ]
    assert rows[1]["epochs"] == "3/6" and rows[3]["share"] == pytest.approx(0.95)
    summed = hd.summary(rows)
    assert [(s["loss"], s["lr"], s["within"], s["units"]) for s in summed] == [
        ("soft", 5e-4, 0, 2),
        ("soft+states", 5e-4, 1, 2),
        ("soft", None, 0, 2),
        ("soft+states", None, 1, 2),
    ]
    assert summed[1]["mean_share"] == pytest.approx(0.975)
    text = hd.report(tmp_path / "units", tmp_path)
    assert "| soft+states | 0.0005 | 97.5% | 1 | 2 |" in text
    assert "| soft+states | best of the rates | 97.5% | 1 | 2 |" in text
    assert (tmp_path / "hidden_distill.json").is_file()
