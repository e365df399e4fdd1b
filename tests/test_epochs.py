"""The epoch rule (issue #22): every run, teachers, students and the full fine-tuning bench/
compares against, trains up to one cap and stops after ``patience`` epochs without a better
dev score; and a search goes on past a candidate that diverges."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import finetune as ft
import pytest
import torch
from toy import FAST, OpenRegistry

from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.training.job import prepare
from mtreg.training.loop import Recipe, batch_order, train_loop
from mtreg.training.onboard import onboard
from mtreg.training.settings import MAX_EPOCHS, PATIENCE, Settings, epoch_cap

# Dev accuracy per epoch (out of 10 examples): best at epoch 3, a dip, a tie, a lower peak.
CURVE = (5, 6, 8, 7, 8, 6, 9, 10, 10, 10)


def _run_curve(patience: int | None, epochs: int = len(CURVE)) -> tuple[int, int]:
    """Train a throwaway module while dev accuracy follows CURVE; return (best epoch, epochs
    run)."""
    module = torch.nn.Linear(1, 2)
    labels = [0] * 10
    epoch = iter(CURVE)

    def predict() -> list[torch.Tensor]:
        right = next(epoch)  # one call per epoch
        return [torch.tensor([1.0, 0.0])] * right + [torch.tensor([0.0, 1.0])] * (10 - right)

    _, best, _, history, _ = train_loop(
        module,
        HeadSpec("classification", ("a", "b")),
        [1] * 4,
        labels,
        ["accuracy"],
        Recipe(epochs=epochs, batch_size=2, patience=patience),
        loss_for=lambda _: module.weight.sum() * 0 + module.bias.pow(2).sum(),
        predict=predict,
    )
    return best, len(history)


def test_early_stopping_stops_patience_epochs_after_the_best() -> None:
    # Epoch 3 is best; 4 (lower) and 5 (a tie is no improvement) and 6 do not beat it.
    assert _run_curve(patience=3) == (3, 6)
    assert _run_curve(patience=2) == (3, 5)
    assert _run_curve(patience=5) == (8, 10)  # epoch 7 beats 3 before patience runs out
    assert _run_curve(patience=None) == (8, 10)  # every epoch; a later tie keeps epoch 8
    assert _run_curve(patience=3, epochs=4) == (3, 4)  # the cap ends it first


def test_one_cap_for_teachers_and_full_finetuning_students_twice_it() -> None:
    default = Settings()
    assert default.epochs is None and default.patience == PATIENCE
    assert epoch_cap(default, "teacher") == epoch_cap(default, "full") == MAX_EPOCHS
    assert epoch_cap(default, "student") == 2 * MAX_EPOCHS
    capped = Settings(epochs=7)
    assert (epoch_cap(capped, "teacher"), epoch_cap(capped, "full")) == (7, 7)
    assert epoch_cap(capped, "student") == 14
    assert epoch_cap(Settings(epochs=7, student_epochs=4), "student") == 4


def test_length_buckets_batch_similar_lengths_and_keep_every_example() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = batch_order(lengths, 10, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b.tolist()) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    plain = batch_order(lengths, 10, torch.Generator().manual_seed(0), bucketed=False)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    assert spread < plain_spread / 5
    again = batch_order(lengths, 10, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # seeded
    # Fewer than two chunks of 50 batches: plain random batches, as without buckets.
    small = batch_order(lengths[:999], 10, torch.Generator().manual_seed(0))
    plain = batch_order(lengths[:999], 10, torch.Generator().manual_seed(0), bucketed=False)
    assert all(torch.equal(a, b) for a, b in zip(small, plain, strict=True))


@pytest.mark.slow
def test_full_finetuning_and_teachers_follow_the_same_rule(
    toy_registry: OpenRegistry, tmp_path: Path
) -> None:
    settings = replace(FAST, epochs=None, patience=2, student_layers=(1,))
    with toy_registry(tmp_path) as registry:
        job = prepare(registry, "toy", settings)
        full = ft.finetune(job, 3e-3)
        report = onboard(registry, "toy", settings, register=False)
    runs = [("full", full.epochs, full.best_epoch, full.epochs_run)]
    runs += [(r.stage, r.epochs, r.best_epoch, r.epochs_run) for r in report.runs]
    assert [stage for stage, *_ in runs] == ["full", "teacher", "student"]
    for stage, cap, best, ran in runs:
        assert cap == (2 if stage == "student" else 1) * MAX_EPOCHS
        assert ran == min(cap, best + 2)  # stopped two epochs after its best, or at the cap


@pytest.mark.slow
def test_a_diverging_candidate_is_recorded_and_the_search_goes_on(
    toy_registry: OpenRegistry, tmp_path: Path
) -> None:
    settings = replace(FAST, epochs=3, teacher_lrs=(1e30, 3e-3), student_lrs=(1e30, 3e-3))
    with toy_registry(tmp_path) as registry:
        report = onboard(registry, "toy", settings, register=False)
    assert [r.name for r in report.runs] == ["teacher-L2-lr0.003", "student-k1-l1-lr0.003"]
    (teacher,) = report.settings["diverged_teachers"]
    assert teacher.startswith("teacher-L2-lr1e+30: training diverged in epoch 1")
    (student,) = report.settings["diverged_students"]
    assert student.startswith("student-k1-l1-lr1e+30: training diverged in epoch 1")
    assert report.chosen.name in {"teacher-L2-lr0.003", "student-k1-l1-lr0.003"}


@pytest.mark.slow
def test_when_every_candidate_diverges_onboarding_fails_and_writes_nothing(
    toy_registry: OpenRegistry, tmp_path: Path
) -> None:
    settings = replace(FAST, epochs=2, teacher_layers=(1, 2), teacher_lrs=(1e30,))
    with toy_registry(tmp_path) as registry:
        stage_dir = registry.home.onboarding("toy", "1.0.0")
        with pytest.raises(MtregError) as error:
            onboard(registry, "toy", settings)
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith("task 'toy', all 2 teacher runs diverged; run teacher-L1-lr")
        assert "--lr" in message
        saved = sorted(p.name for p in stage_dir.rglob("*")) if stage_dir.exists() else []
        assert saved == []
        assert registry.tasks() == []  # nothing registered
