"""bench/rte_length.py: RTE's full fine-tuning at its own max length, reported beside the
protocol's 128-token units against the same majority floor."""

from __future__ import annotations

from pathlib import Path

import protocol as p
import protocol_choice
import pytest
import rte_length as rl

REFERENCES = [1] * 110 + [0] * 90  # majority: 55%


def _full_unit(root: Path, seed: int, right: int, max_length: int | None) -> None:
    """A finished full fine-tuning unit of RTE at 1e-4, right on ``right`` examples spread
    over both classes."""
    predictions = [r if (7 * i) % 200 < right else 1 - r for i, r in enumerate(REFERENCES)]
    reported = {
        "metrics": {"accuracy": right / len(REFERENCES)},
        "predictions": predictions,
        "references": REFERENCES,
    }
    data = {"metric": "accuracy", "runs": [{"reported": reported}]}
    if max_length is not None:
        data["max_length"] = max_length
    p.write_unit(p.Unit("rte", "full", 1e-4, seed).path(root), data)


def test_both_lengths_are_judged_against_the_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol_choice, "choose", lambda _root: {"full_lr": 1e-4})
    ours, theirs = tmp_path / "ours", tmp_path / "protocol"
    for seed in p.SEEDS:
        _full_unit(theirs, seed, 115, None)  # 57.5%: the protocol's units have no length
    _full_unit(ours, 0, 150, 256)  # 75%: only one seed finished here
    short, own = rl.compare(ours, theirs)
    assert (short["max_length"], own["max_length"]) == (128, 256)
    assert short["scores"] == [0.575] * len(p.SEEDS) and own["scores"] == [0.75]
    assert short["floor"]["majority"] == own["floor"]["majority"] == pytest.approx(0.55)
    assert short["floor"]["diff"] == pytest.approx(0.025) and not short["floor"]["clears"]
    assert own["floor"]["diff"] == pytest.approx(0.20) and own["floor"]["clears"]
    assert own["floor"]["seeds"] == 1
    _, none = rl.compare(tmp_path / "empty", theirs)
    assert none["floor"] is None and none["scores"] == [] and none["max_length"] is None


def test_the_units_run_rte_at_its_own_length_with_the_protocols_settings(
    tmp_path: Path,
) -> None:
    from mtreg.plugins import glue

    own = next(spec for spec in glue.tasks() if spec.name == "rte").max_length
    assert own == 256 and p.TASKS["rte"]["max_length"] == 128
    runner = p.Runner(tmp_path, rl.TASKS)
    assert "max_length" not in runner.tasks["rte"]  # no override: the task's own
    unit = rl.units((0, 1), 1e-4)[1]
    assert (unit.task, unit.method, unit.lr, unit.seed) == ("rte", "full", 1e-4, 1)
    assert runner.settings(unit) == p.Runner().settings(unit)
