"""Training a branch on a frozen trunk: learning, frozen weights, distillation loss, student
initialisation, cached against uncached gradients, and the activation cache.

Everything runs on a tiny random 3-layer BERT (tests/factories.py) and a toy sentiment
task whose label is decided by one word, written as a path plugin (tests/toy.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from toy import FAST, OpenRegistry

from mtreg import heads
from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.registry.api import Registry
from mtreg.training.cache import ActivationCache, cache_key
from mtreg.training.job import compute_hidden, hidden_states, prepare, uncached_batch_loss
from mtreg.training.loop import (
    TEMPERATURE,
    Split,
    autocast,
    batch_loss,
    fit,
    predict_logits,
    predict_states,
)
from mtreg.training.settings import Settings
from mtreg.training.stages import load_run, student_branch, teacher_branch, train_teachers


@pytest.fixture
def registry(toy_registry: OpenRegistry, tmp_path: Path) -> Iterator[Registry]:
    with toy_registry(tmp_path) as reg:
        yield reg


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.slow
def test_teacher_learns_a_separable_task(registry: Registry, precision: str) -> None:
    job = prepare(registry, "toy", replace(FAST, precision=precision))
    result = train_teachers(job)
    assert result.best.dev_metrics["accuracy"] > 0.9
    assert result.best.fork_depth == 1 and result.best.layers == 2
    _, branch = load_run(job, result.best.name, result.best.key, 2)
    # Mixed precision: the weights a bf16 run keeps (and writes) are fp32 all the same.
    assert {t.dtype for t in branch.state_dict().values()} == {torch.float32}


def test_bf16_autocast_computes_a_close_loss_and_a_new_run_key(registry: Registry) -> None:
    job = prepare(registry, "toy", FAST)
    train = Split(hidden_states(job, "train", [1])[1], job.train.labels)
    branch = teacher_branch(job, 2, seed=0).eval()
    indices = list(range(16))
    exact = batch_loss(branch, job.spec.head, train, indices)
    with autocast("bf16", "cpu"):
        mixed = batch_loss(branch, job.spec.head, train, indices)
    assert mixed.dtype == torch.float32 and mixed.item() != exact.item()
    assert mixed.item() == pytest.approx(exact.item(), rel=2e-2)
    # A bf16 run must never resume from an fp32 run's saved state.
    recipe = job.recipe(1e-3, 2)
    assert cache_key(recipe=recipe) != cache_key(recipe=replace(recipe, precision="bf16"))
    with pytest.raises(MtregError, match="unknown precision 'fp8': use fp32 or bf16"):
        Settings(precision="fp8").check()


@pytest.mark.slow
def test_frozen_trunk_is_bit_for_bit_unchanged(registry: Registry) -> None:
    trunk = registry.trunk("tiny")
    objects = [trunk.objects["embeddings"], *trunk.objects["layers"]]
    files = {sha: registry.objects.path(sha).read_bytes() for sha in objects}
    job = prepare(registry, "toy", FAST)
    before = {sha: {k: v.clone() for k, v in job.component(sha).items()} for sha in objects}
    train_teachers(job)
    for sha in objects:
        assert files[sha] == registry.objects.path(sha).read_bytes()
        for name, tensor in job.component(sha).items():
            assert torch.equal(tensor, before[sha][name]), name  # the teacher copied them


def test_distillation_loss_matches_a_hand_computation() -> None:
    head = HeadSpec("classification", ("a", "b", "c"))
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    t = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        tz = [math.exp(v / t) for v in t_row]
        sz = [math.exp(v / t) for v in s_row]
        p = [v / sum(tz) for v in tz]
        log_q = [math.log(v / sum(sz)) for v in sz]
        expected += -sum(pi * qi for pi, qi in zip(p, log_q, strict=True))
    expected = t * t * expected / 2
    got = heads.get(head.kind).distill(student, teacher, torch.tensor([0, 2]), TEMPERATURE)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # Regression distils by MSE to the teacher's output.
    reg = HeadSpec("regression")
    distill = heads.get(reg.kind).distill
    value = distill(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]), None, TEMPERATURE)
    assert float(value) == pytest.approx((1 + 4) / 2)


def test_student_starts_from_the_teachers_bottom_layers_and_head(registry: Registry) -> None:
    job = prepare(registry, "toy", FAST)
    teacher = teacher_branch(job, 3, seed=0)
    # The teacher starts from the trunk's own top layers.
    for j in range(3):
        for name, tensor in job.trunk_layer(j).items():
            assert torch.equal(teacher.layers[j].state_dict()[name], tensor)
    student = student_branch(job, teacher, 2)
    for j in range(2):
        for name, tensor in teacher.layers[j].state_dict().items():
            assert torch.equal(student.layers[j].state_dict()[name], tensor)
    for part in ("head", "pooler"):
        for name, tensor in getattr(teacher, part).state_dict().items():
            assert torch.equal(getattr(student, part).state_dict()[name], tensor)
    with pytest.raises(MtregError, match=r"student needs 1\.\.2"):
        student_branch(job, teacher, 3)


def test_hidden_state_loss_adds_the_masked_mse_to_the_teachers_states(
    registry: Registry,
) -> None:
    job = prepare(registry, "toy", FAST)
    # Rows cut to different lengths: padding must not count.
    hidden = [h[: 3 + i % 4] for i, h in enumerate(hidden_states(job, "train", [0])[0])]
    teacher = teacher_branch(job, 3, seed=0).eval()
    student = student_branch(job, teacher, 1).eval()
    split = Split(hidden, job.train.labels)
    states = predict_states(teacher, split)
    assert [s.shape for s in states] == [h.shape for h in hidden]
    indices = [0, 5, 10]
    own = predict_states(student, split)
    torch.manual_seed(0)
    targets = [torch.randn_like(s) for s in own]
    with torch.no_grad():
        plain = float(batch_loss(student, job.spec.head, split, indices))
        targeted = replace(split, teacher_states=targets)
        with_states = float(batch_loss(student, job.spec.head, targeted, indices))
        # Matching states of its own: nothing is added.
        same = replace(split, teacher_states=own)
        unchanged = float(batch_loss(student, job.spec.head, same, indices))
    squared = sum(float(((own[i] - targets[i]) ** 2).sum()) for i in indices)
    count = sum(own[i].numel() for i in indices)
    assert with_states - plain == pytest.approx(squared / count, rel=1e-4)
    assert unchanged == pytest.approx(plain, abs=1e-6)


@pytest.mark.slow
def test_a_student_trained_with_the_hidden_state_loss_moves_toward_the_teachers_states(
    registry: Registry,
) -> None:
    job = prepare(registry, "toy", FAST)
    train_hidden = hidden_states(job, "train", [0])[0]
    dev = Split(hidden_states(job, "dev", [0])[0], job.dev.labels)
    teacher = teacher_branch(job, 3, seed=0).eval()
    split = Split(train_hidden, job.train.labels)
    logits, states = predict_logits(teacher, split), predict_states(teacher, split)

    def distance(student: torch.nn.Module) -> float:
        own = predict_states(student, split)
        return sum(float(((a - b) ** 2).mean()) for a, b in zip(own, states, strict=True))

    recipe = job.recipe(1e-3, 3)
    runs = {}
    for name, targets in (("soft", None), ("soft+states", states)):
        train = Split(train_hidden, job.train.labels, logits, targets)
        student = student_branch(job, teacher, 1)
        runs[name] = fit(student, job.spec.head, train, dev, job.metrics, recipe).branch
    assert distance(runs["soft+states"]) < 0.5 * distance(runs["soft"])


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_cached_and_uncached_training_give_the_same_first_step_gradients(
    registry: Registry,
) -> None:
    job = prepare(registry, "toy", FAST)
    depth, indices = 1, list(range(16))
    trunk = job.trunk_module(depth)

    def fresh():
        branch = teacher_branch(job, 2, seed=0)
        branch.eval()  # no dropout: both paths must see the same network
        return branch

    uncached = fresh()
    uncached_batch_loss(trunk, uncached, job, job.train, indices, depth).backward()
    exact = fresh()
    hidden32 = compute_hidden(job, job.train, [depth])[depth]
    batch_loss(exact, job.spec.head, Split(hidden32, job.train.labels), indices).backward()
    cached = fresh()
    hidden16 = hidden_states(job, "train", [depth])[depth]  # what training reads: fp16
    assert hidden16[0].dtype == torch.float16
    batch_loss(cached, job.spec.head, Split(hidden16, job.train.labels), indices).backward()
    reference = _grads(uncached)
    assert reference
    for name, grad in _grads(exact).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6)
    for name, grad in _grads(cached).items():  # fp16 storage: close, not equal
        torch.testing.assert_close(grad, reference[name], rtol=2e-2, atol=2e-3)


def test_training_is_reproducible(registry: Registry) -> None:
    settings = Settings(teacher_layers=(1,), teacher_lrs=(1e-3,), epochs=2, patience=None)
    first = train_teachers(prepare(registry, "toy", settings))
    second_job = prepare(registry, "toy", settings)
    # Force a real second run instead of a resume from the first run's saved state.
    for path in second_job.stage_dir.glob("teacher-*"):
        path.unlink()
    second = train_teachers(second_job)
    assert not second.best.resumed
    assert first.best.dev_metrics == second.best.dev_metrics
    a = load_run(second_job, first.best.name, first.best.key, 1)
    assert a is not None


def test_activation_cache_hits_misses_and_evicts_least_recently_used(tmp_path: Path) -> None:
    rows = [torch.ones(3, 4, dtype=torch.float16), torch.zeros(1, 4, dtype=torch.float16)]
    cache = ActivationCache(tmp_path, max_bytes=10**9)
    assert cache.get("a") is None and cache.misses == 1
    cache.put("a", rows)
    got = cache.get("a")
    assert cache.hits == 1 and [r.shape for r in got] == [(3, 4), (1, 4)]
    assert all(torch.equal(x, y) for x, y in zip(got, rows, strict=True))
    cache.put("empty", [])
    assert cache.get("empty") == []
    # Corrupt entries read as misses and are dropped.
    (tmp_path / "a.safetensors").write_bytes(b"garbage")
    assert cache.get("a") is None and not (tmp_path / "a.safetensors").exists()
    # A bound of about two entries: writing a third evicts the least recently used.
    small = ActivationCache(tmp_path / "small", max_bytes=1)
    small.put("x", rows)
    size = (tmp_path / "small" / "x.safetensors").stat().st_size
    small.max_bytes = 2 * size
    small.put("y", rows)
    import os

    os.utime(tmp_path / "small" / "x.safetensors", ns=(1, 1))  # x: oldest
    os.utime(tmp_path / "small" / "y.safetensors", ns=(2, 2))
    small.get("x")  # ...until it is read: now y is the least recently used
    small.put("z", rows)
    names = sorted(p.stem for p in (tmp_path / "small").glob("*.safetensors"))
    assert names == ["x", "z"]
    # The entry just written survives even a bound smaller than itself.
    small.max_bytes = 1
    small.put("w", rows)
    assert [p.stem for p in (tmp_path / "small").glob("*.safetensors")] == ["w"]


def test_the_cache_is_reused_across_runs(registry: Registry) -> None:
    job = prepare(registry, "toy", FAST)
    hidden_states(job, "train", [1, 2])
    again = prepare(registry, "toy", FAST)
    again.cache.hits = again.cache.misses = 0
    hidden_states(again, "train", [1, 2])
    assert (again.cache.hits, again.cache.misses) == (2, 0)
    digest = hashlib.sha256(b"".join(sorted(p.name.encode() for p in job.cache.root.iterdir())))
    assert digest.hexdigest()  # entries live under MTREG_HOME/cache/activations
    assert job.cache.root == registry.home.root / "cache" / "activations"
