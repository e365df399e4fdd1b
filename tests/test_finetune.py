"""Full fine-tuning (finetune) on a tiny random BERT: it learns, trains every
weight (or keeps the embeddings when asked), never touches the registry's trunk, is seeded,
and selects its epoch by exactly the rule of the cached teacher runs."""

from __future__ import annotations

from pathlib import Path

import finetune as ft
import pytest
import torch
from toy import FAST, OpenRegistry

from mtreg.errors import MtregError
from mtreg.registry.api import Registry
from mtreg.training import loop as tr
from mtreg.training.job import Job, compute_hidden, prepare
from mtreg.training.loop import Recipe, Split
from mtreg.training.settings import Settings
from mtreg.training.stages import teacher_branch

SETTINGS = Settings(**{**FAST.__dict__, "epochs": 8, "patience": 3})


@pytest.fixture
def job(toy_registry: OpenRegistry, tmp_path: Path):
    with toy_registry(tmp_path) as registry:
        yield prepare(registry, "toy", SETTINGS)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_full_finetuning_learns_the_toy_task_and_trains_every_weight(job: Job) -> None:
    before = ft.full_model(job)
    start = _state(before)
    result = ft.finetune(job, 3e-3)
    assert result.dev_metrics["accuracy"] > 0.9
    assert 1 <= result.best_epoch <= result.epochs_run <= result.epochs == 8
    after = result.model.state_dict()
    n = job.config.num_hidden_layers
    assert result.model.fork_depth == 0 and len(result.model.branch.layers) == n
    for prefix in (
        "trunk.embeddings.word_embeddings",
        "branch.layers.0.",
        f"branch.layers.{n - 1}.",
    ):
        names = [k for k in after if k.startswith(prefix)]
        assert names and any(not torch.equal(after[k], start[k]) for k in names), prefix
    # The registry's trunk objects stay as they were: the model trained copies.
    emb = job.component(job.trunk.objects["embeddings"])["word_embeddings.weight"]
    assert torch.equal(emb, start["trunk.embeddings.word_embeddings.weight"])


@pytest.mark.slow
def test_frozen_embeddings_stay_bit_for_bit(job: Job) -> None:
    start = _state(ft.full_model(job))
    result = ft.finetune(job, 3e-3, 2, train_embeddings=False)
    after = result.model.state_dict()
    for name, value in start.items():
        if name.startswith("trunk."):
            assert torch.equal(after[name], value), name


def test_runs_are_seeded_and_reproducible(job: Job) -> None:
    a, b = ft.finetune(job, 3e-3, 2), ft.finetune(job, 3e-3, 2)
    assert a.dev_metrics == b.dev_metrics and a.history == b.history
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name


def test_uncached_teacher_matches_the_cached_one_and_keeps_the_trunk_frozen(job: Job) -> None:
    model = ft.teacher_model(job, 2)
    trunk_before = _state(model.trunk)
    uncached = ft.train_uncached_teacher(job, 2, 3e-3, 4)
    assert all(
        torch.equal(v, trunk_before[k]) for k, v in uncached.model.trunk.state_dict().items()
    )
    # The cached path: fp32 hidden states (the disk cache stores fp16), same seed and batches.
    k = job.config.num_hidden_layers - 2
    hidden = compute_hidden(job, job.train, [k])[k]
    dev = compute_hidden(job, job.dev, [k])[k]
    cached = tr.fit(
        teacher_branch(job, 2, job.settings.seed),
        job.spec.head,
        Split(hidden, job.train.labels),
        Split(dev, job.dev.labels),
        job.metrics,
        job.recipe(3e-3, 4),
    )
    assert cached.best_epoch == uncached.best_epoch
    assert cached.dev_metrics == pytest.approx(uncached.dev_metrics)
    for h_cached, h_live in zip(cached.history, uncached.history, strict=True):
        assert h_cached["train_loss"] == pytest.approx(h_live["train_loss"], rel=1e-3)


@pytest.mark.parametrize(
    ("scores", "patience", "best", "ran"),
    [
        ([0.5, 0.7, 0.7, 0.6, 0.65, 0.9], 3, 2, 5),  # a tie is no improvement; stop at 2 + 3
        ([0.5, 0.7, 0.7, 0.6, 0.65, 0.9], None, 6, 6),  # no patience: every epoch runs
        ([0.9, 0.8, 0.95, 0.1], 1, 1, 2),
    ],
)
def test_selection_rule_is_the_teacher_runs_rule(
    job: Job,
    monkeypatch: pytest.MonkeyPatch,
    scores: list[float],
    patience: int | None,
    best: int,
    ran: int,
) -> None:
    """Full fine-tuning and a cached teacher see the same scripted dev scores and must keep
    the same epoch."""

    def scripted(module) -> object:
        queue = iter(scores)
        return lambda head, logits, labels, metrics: {metrics[0]: next(queue)}

    recipe = Recipe(epochs=len(scores), lr=1e-3, batch_size=64, patience=patience)
    monkeypatch.setattr(tr, "score", scripted(tr))
    live = ft.fit_live(ft.full_model(job), job.spec.head, job.train, job.dev, job.metrics, recipe)
    monkeypatch.setattr(tr, "score", scripted(tr))
    k = job.config.num_hidden_layers - 2
    hidden = compute_hidden(job, job.train, [k])[k]
    dev = compute_hidden(job, job.dev, [k])[k]
    cached = tr.fit(
        teacher_branch(job, 2, 0),
        job.spec.head,
        Split(hidden, job.train.labels),
        Split(dev, job.dev.labels),
        job.metrics,
        recipe,
    )
    assert (live.best_epoch, live.epochs_run) == (cached.best_epoch, len(cached.history))
    assert (live.best_epoch, live.epochs_run) == (best, ran)
    assert live.dev_metrics == cached.dev_metrics == {"accuracy": scores[best - 1]}


def test_search_picks_the_best_rate_and_a_tie_goes_to_the_lower(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = {1e-3: 0.8, 2e-3: 0.9, 3e-3: 0.9}

    def fake(job, lr, epochs=None, **_) -> ft.FinetuneResult:
        return ft.FinetuneResult(ft.full_model(job), lr, 1, 1, {"accuracy": fixed[lr]})

    monkeypatch.setattr(ft, "finetune", fake)
    runs, best = ft.search(job, (1e-3, 3e-3, 2e-3))
    assert [r.lr for r in runs] == [1e-3, 3e-3, 2e-3] and best.lr == 2e-3
    assert best.model is not None and all(r.model is None for r in runs if r is not best)
    with pytest.raises(MtregError, match="at least one learning rate"):
        ft.search(job, ())


def test_finetune_task_prepares_like_onboard(toy_registry: OpenRegistry, tmp_path: Path) -> None:
    with toy_registry(tmp_path) as registry:
        assert isinstance(registry, Registry)
        runs, best = ft.finetune_task(registry, "toy", SETTINGS, lrs=(3e-3,), epochs=3)
    assert len(runs) == 1 and best.epochs == 3 and best.model is not None
    assert best.to_dict()["epochs_run"] == len(best.history)
    with pytest.raises(TypeError, match="unknown onboarding settings"):
        ft.finetune_task(registry, "toy", bogus=1)
