"""Full fine-tuning: the baseline a user would otherwise deploy, one whole model per task.

Everything trains: the embeddings, all N trunk layers, a pooler and a fresh head, on the live
network (nothing is cached; the trunk runs on every step). The model is a
:class:`~mtreg.nn.network.Standalone` made of a depth-0 trunk (the embeddings, trainable)
and a branch of all N layers copied from the trunk, i.e. a teacher with L = N built by
:func:`mtreg.training.stages.teacher_branch`. Initialisation (trunk pooler, seeded fresh head),
dropout, recipe (:meth:`mtreg.training.job.Job.recipe`: AdamW without decay on LayerNorm and
biases, clip 1.0, warm-up over 10% of one epoch then linear decay), epochs (up to
:func:`~mtreg.training.settings.epoch_cap`, early stopping), the shuffling order, the selection rule
(best epoch by the first dev metric, a tie is not an improvement, stop after ``patience``
epochs without one) and the learning-rate choice (highest score, a tie goes to the lower
rate) are therefore exactly those of the partial runs of ``mtreg onboard``.

One difference from Hugging Face's fine-tuning: mtreg's embedding module has no dropout (HF
applies ``hidden_dropout_prob`` there in training); the layers, pooler and head have the same
dropout as a teacher's.

The same loop (:func:`fit_live`) trains a *partial* teacher uncached: the frozen trunk up to
its fork runs under ``no_grad`` every step and only the branch learns. With the same seed it
sees the same batches in the same order as the cached run of :func:`mtreg.training.loop.fit`,
which is what ``bench/onboarding.py`` times against it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtreg import heads
from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.nn.network import Standalone, Trunk
from mtreg.training.data import Encoded, collate
from mtreg.training.job import Job, prepare
from mtreg.training.loop import Recipe, train_loop
from mtreg.training.progress import Progress, prefixed
from mtreg.training.settings import Settings, epoch_cap, with_overrides
from mtreg.training.stages import teacher_branch

if TYPE_CHECKING:
    from mtreg.registry.api import Registry

# The learning rates full fine-tuning tries by default: the teachers' own grid (bench/onboarding.py:
# partial runs like 2e-4, full ones 1e-4 on this trunk) widened down to BERT's usual 2e-5.
FULL_LRS = (2e-5, 5e-5, 1e-4, 2e-4)


@dataclass
class FinetuneResult:
    """One live (uncached) training run and its best epoch.

    Attributes:
        model: the best epoch's weights, on the CPU, in eval mode.
        lr, epochs: the recipe's learning rate and epoch budget.
        best_epoch, dev_metrics: the selected epoch (1-based) and its dev scores.
        history: one dict per epoch run (``epoch``, ``train_loss``, dev metrics).
        seconds: wall time of the run, evaluation included.
    """

    model: Standalone
    lr: float
    epochs: int
    best_epoch: int
    dev_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        """Epochs actually trained (fewer than ``epochs`` after an early stop)."""
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of everything but the model."""
        return {
            "lr": self.lr,
            "epochs": self.epochs,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "dev_metrics": dict(self.dev_metrics),
            "history": list(self.history),
            "seconds": self.seconds,
        }


# -- models --------------------------------------------------------------------------------


def full_model(job: Job, seed: int | None = None, *, train_embeddings: bool = True) -> Standalone:
    """Return a fresh full model for ``job``'s task: trainable embeddings (unless
    ``train_embeddings`` is False), copies of all N trunk layers, the trunk's pooler and a
    fresh head seeded by ``seed`` (default: the job's seed). Shares no tensor with the trunk
    held by the job."""
    seed = job.settings.seed if seed is None else seed
    trunk = Trunk.from_tensors(
        job.config, job.component(job.trunk.objects["embeddings"]), []
    )  # load_state_dict copies: the job's cached components never change
    trunk.requires_grad_(train_embeddings)
    branch = teacher_branch(job, job.config.num_hidden_layers, seed)
    return Standalone(trunk, 0, branch)


def teacher_model(job: Job, layers: int, seed: int | None = None) -> Standalone:
    """Return a fresh *uncached* teacher: the frozen trunk up to k = N - ``layers`` (no
    gradients) and the same branch :func:`mtreg.training.stages.teacher_branch` builds.

    Raises:
        MtregError: ``layers`` outside 1..N.
    """
    seed = job.settings.seed if seed is None else seed
    branch = teacher_branch(job, layers, seed)
    depth = job.config.num_hidden_layers - layers
    return Standalone(job.trunk_module(depth), depth, branch)


def _trunk_frozen(model: Standalone) -> bool:
    return not any(p.requires_grad for p in model.trunk.parameters())


def _forward(model: Standalone, batch: dict[str, torch.Tensor], frozen: bool) -> torch.Tensor:
    """Return the model's logits; a frozen trunk runs without building a graph."""
    depth = model.fork_depth
    guard = torch.no_grad() if frozen else contextlib.nullcontext()
    with guard:
        hidden = model.trunk(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], (depth,)
        )[depth]
    return model.branch(hidden, batch["attention_mask"])


def live_batch_loss(
    model: Standalone,
    head: HeadSpec,
    encoded: Encoded,
    indices: Sequence[int],
    pad_id: int,
    device: str = "cpu",
) -> torch.Tensor:
    """Return the hard loss of ``model`` on the examples at ``indices``, run through the
    live trunk (dynamically padded to the batch's longest example)."""
    batch = {k: v.to(device) for k, v in collate(encoded, indices, pad_id).items()}
    assert encoded.labels is not None
    kind = heads.get(head.kind)
    labels = kind.stack([encoded.labels[i] for i in indices], batch["input_ids"].shape[1])
    logits = _forward(model, batch, _trunk_frozen(model)).float()
    return kind.loss(logits, labels.to(device))


@torch.no_grad()
def predict_live(
    model: Standalone, encoded: Encoded, pad_id: int, batch_size: int = 64, device: str = "cpu"
) -> list[torch.Tensor]:
    """Return per-example logits of ``model`` (eval mode) on the CPU, in input order
    (per-token heads: [len, labels] per example, padding removed). Batches group similar
    lengths."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    out: list[torch.Tensor | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(encoded, indices, pad_id).items()}
        logits = _forward(model, batch, True).float().cpu()
        for row, i in enumerate(indices):
            n = len(encoded.input_ids[i])
            out[i] = logits[row, :n] if logits.ndim == 3 else logits[row]
    return out  # type: ignore[return-value]


# -- training ------------------------------------------------------------------------------


def fit_live(
    model: Standalone,
    head: HeadSpec,
    train: Encoded,
    dev: Encoded,
    metrics: Sequence[str],
    recipe: Recipe,
    *,
    pad_id: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``model``'s trainable parameters on live batches; keep the best dev epoch.

    The loop is :func:`mtreg.training.loop.train_loop`, the one the branches train with: the
    same seeding, optimizer, schedule, clipping, selection and early stopping; only the
    inputs differ (tokens through the trunk instead of cached hidden states).

    Returns:
        The best epoch's model (a CPU copy in eval mode), its epoch and dev metrics, the
        history and the seconds taken.

    Raises:
        MtregError: the train or dev split is empty, or has no labels.
    """
    if not len(train) or not len(dev) or train.labels is None or dev.labels is None:
        raise MtregError("cannot train on an empty split: the train and dev splits need examples")
    frozen = _trunk_frozen(model)

    def train_mode() -> None:
        model.train()
        if frozen:
            model.trunk.eval()  # no dropout below the fork, as on the cached path

    best, epoch, dev_metrics, history, seconds = train_loop(
        model,
        head,
        [len(ids) for ids in train.input_ids],
        dev.labels,
        metrics,
        recipe,
        loss_for=lambda indices: live_batch_loss(model, head, train, indices, pad_id, device),
        predict=lambda: predict_live(model, dev, pad_id, device=device),
        device=device,
        progress=progress,
        train_mode=train_mode,
    )
    return FinetuneResult(best, recipe.lr, recipe.epochs, epoch, dev_metrics, history, seconds)


def job_epochs(job: Job, epochs: int | None = None) -> int:
    """Return the most epochs a full fine-tuning of ``job`` trains: ``epochs``, else the
    cap of :func:`~mtreg.training.settings.epoch_cap`, the teachers' own (early stopping on
    dev after ``patience`` decides how many it trains, as for the teachers)."""
    return epochs or epoch_cap(job.settings, "full")


def pad_id(job: Job) -> int:
    """Return the tokenizer's padding id (0 when it names none)."""
    return job.tokenizer.pad_token_id or 0


def finetune(
    job: Job,
    lr: float,
    epochs: int | None = None,
    *,
    train_embeddings: bool = True,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fully fine-tune ``job``'s task at ``lr`` with the teachers' recipe and epochs.

    Raises:
        MtregError: see :func:`fit_live`.
    """
    model = full_model(job, train_embeddings=train_embeddings)
    return _fit_job(job, model, lr, epochs, progress)


def train_uncached_teacher(
    job: Job,
    layers: int,
    lr: float,
    epochs: int | None = None,
    *,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train one teacher of ``layers`` layers without the activation cache (the trunk below
    the fork runs every step): the reference :func:`mtreg.training.stages.train_teachers`'
    cached path is measured against.

    Raises:
        MtregError: ``layers`` outside 1..N; see :func:`fit_live`.
    """
    return _fit_job(job, teacher_model(job, layers), lr, epochs, progress)


def _fit_job(
    job: Job, model: torch.nn.Module, lr: float, epochs: int | None, progress: Progress | None
) -> FinetuneResult:
    """Train ``model`` on the job's tokenised splits with the job's recipe at ``lr``."""
    return fit_live(
        model,
        job.spec.head,
        job.train,
        job.dev,
        job.metrics,
        job.recipe(lr, job_epochs(job, epochs)),
        pad_id=pad_id(job),
        device=job.device,
        progress=progress,
    )


def better(result: FinetuneResult, other: FinetuneResult | None, metric: str) -> bool:
    """The learning-rate choice of the teacher search: higher dev score wins, a tie goes to
    the lower learning rate."""
    if other is None:
        return True
    a, b = result.dev_metrics[metric], other.dev_metrics[metric]
    return (a, -result.lr) > (b, -other.lr)


def search(
    job: Job,
    lrs: Sequence[float] = FULL_LRS,
    epochs: int | None = None,
    *,
    keep_models: bool = False,
    progress: Progress | None = None,
) -> tuple[list[FinetuneResult], FinetuneResult]:
    """Fully fine-tune at every learning rate of ``lrs``; return every run and the best.

    Only the best run keeps its model unless ``keep_models`` (each is a full model).

    Raises:
        MtregError: no learning rate, or see :func:`fit_live`.
    """
    if not lrs:
        raise MtregError("full fine-tuning needs at least one learning rate")
    runs: list[FinetuneResult] = []
    best: FinetuneResult | None = None
    for lr in lrs:
        run = finetune(job, lr, epochs, progress=prefixed(progress, f"full-lr{lr:g}"))
        if better(run, best, job.metrics[0]):
            if best is not None and not keep_models:
                best.model = None  # type: ignore[assignment]
            best = run
        elif not keep_models:
            run.model = None  # type: ignore[assignment]
        runs.append(run)
    assert best is not None
    return runs, best


def finetune_task(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    lrs: Sequence[float] = FULL_LRS,
    data_dir: str | Path | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> tuple[list[FinetuneResult], FinetuneResult]:
    """Prepare ``task`` as ``mtreg onboard`` would (same data, trunk, max length, settings)
    and fully fine-tune it over ``lrs``. Keyword ``overrides`` set Settings fields.

    Returns:
        Every run and the best (with its model).

    Raises:
        MtregError: see :func:`mtreg.training.job.prepare` and :func:`search`.
    """
    settings = with_overrides(settings, overrides)
    job = prepare(registry, task, settings, data_dir=data_dir, progress=progress)
    return search(job, lrs, progress=progress)
