"""Training a branch on a frozen trunk: the teacher (partial fine-tuning) and the student
(distillation), both on cached activations.

The recipe follows the paper's reference recipe: AdamW (weight decay 0.01, none on LayerNorm
weights and biases), gradient clipping at 1.0, linear warm-up over 10% of one epoch then
linear decay, and the branch of the epoch with the best dev score (the task's first metric)
is kept. With
``precision="bf16"`` the training steps run under bfloat16 autocast (mixed precision: the
weights, gradients and optimizer state stay fp32; dev scoring stays fp32, as served), about
twice as fast on CPUs with AMX or AVX-512 BF16 and on recent GPUs.

Because the layers below the fork are frozen, the trunk's hidden state at depth k is
computed once per example (with dropout off, as at serving time) and the branch trains on
it. A teacher of L layers forks at k = N - L; its student of l layers forks at the same k.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from mtreg import heads
from mtreg.core.spec import HeadSpec
from mtreg.errors import MtregError
from mtreg.training.metrics import evaluate
from mtreg.training.progress import Progress, batch_reporter
from mtreg.training.settings import check_precision

TEMPERATURE = 2.0


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run."""

    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # of one epoch's steps
    clip: float = 1.0
    dropout: float = 0.1
    seed: int = 0
    # Stop after this many epochs without a better dev score (None: run every epoch).
    patience: int | None = None
    precision: str = "fp32"  # or "bf16": training steps under bfloat16 autocast
    # Batches of similar lengths (see :func:`batch_order`): less padding, same examples.
    length_buckets: bool = True


# Examples are sorted by length within chunks of this many batches: enough to make batches
# of similar lengths, few enough that an epoch's order stays random at a larger scale. A
# training set of fewer than two chunks is not bucketed: there a batch of one length can be
# a batch of one label (the toy multilabel task's longer texts carry more topics, and its
# branch stopped learning), and padding a small set costs little anyway.
BUCKET_BATCHES = 50


def batch_order(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, bucketed: bool = True
) -> list[torch.Tensor]:
    """Return one epoch's batches of example indices: a random permutation cut into
    batches; with ``bucketed`` (and at least two chunks of examples), each chunk of
    :data:`BUCKET_BATCHES` batches is first sorted by length and the batches are then
    shuffled, so a batch pads to similar lengths."""
    order = torch.randperm(len(lengths), generator=generator)
    if not bucketed or len(lengths) < 2 * batch_size * BUCKET_BATCHES:
        return list(order.split(batch_size))
    batches: list[torch.Tensor] = []
    for chunk in order.split(batch_size * BUCKET_BATCHES):
        by_length = sorted(chunk.tolist(), key=lambda i: lengths[i])
        batches += torch.tensor(by_length, dtype=torch.long).split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager[Any]:
    """Return the context to run forward passes in at ``precision`` on ``device``: bfloat16
    autocast for ``"bf16"``, nothing for ``"fp32"``.

    Raises:
        MtregError: an unknown precision.
    """
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@dataclass
class Split:
    """Cached inputs of one data split: per-example hidden states at the fork depth, the
    encoded labels, and (for distillation) the teacher's logits and, optionally, its top
    hidden states [len, H] for a hidden-state loss (see :func:`batch_loss`)."""

    hidden: list[torch.Tensor]
    labels: list[Any]
    teacher: list[torch.Tensor] | None = None
    teacher_states: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.hidden)


@dataclass
class TrainResult:
    """The best branch of a run and how it got there."""

    branch: nn.Module
    best_epoch: int
    dev_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def pad_hidden(
    rows: Sequence[torch.Tensor], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length [len, H] hidden states into [B, S, H] fp32 plus a 0/1 mask."""
    width = max(r.shape[0] for r in rows)
    hidden = torch.zeros(len(rows), width, rows[0].shape[-1], device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        hidden[i, : row.shape[0]] = row.to(device=device, dtype=torch.float32)
        mask[i, : row.shape[0]] = 1
    return hidden, mask


def optimizer_for(module: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: LayerNorm weights and biases are 1-D.

    The fused kernel computes the same update in one pass over each group; on the CPU it
    makes a full fine-tuning step about a third faster than the per-tensor loop."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        fused=True,
    )


def linear_schedule(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, recipe: Recipe
) -> torch.optim.lr_scheduler.LambdaLR:
    """Return transformers' linear schedule: warm-up from zero over ``warmup_fraction`` of
    one epoch's steps (at least one), then linear decay to zero at the run's last step."""
    warmup = max(1, math.ceil(steps_per_epoch * recipe.warmup_fraction))
    total = max(warmup + 1, steps_per_epoch * recipe.epochs)
    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def predict_logits(
    branch: nn.Module, split: Split, batch_size: int = 64, device: str = "cpu"
) -> list[torch.Tensor]:
    """Run ``branch`` (in eval mode) over a split; return per-example logits on the CPU
    (per-token heads: [len, labels] per example, padding removed)."""
    return _per_example(branch, branch, split, batch_size, device)


def predict_states(
    branch: nn.Module, split: Split, batch_size: int = 64, device: str = "cpu"
) -> list[torch.Tensor]:
    """Run ``branch`` (a :class:`~mtreg.nn.layers.Branch`, in eval mode) over a split;
    return per-example top hidden states [len, H] on the CPU, padding removed: the targets
    of a hidden-state loss (:attr:`Split.teacher_states`)."""
    return _per_example(branch, branch.encode, split, batch_size, device)


@torch.no_grad()
def _per_example(
    branch: nn.Module,
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    split: Split,
    batch_size: int,
    device: str,
) -> list[torch.Tensor]:
    """Return ``run(hidden, mask)`` per example of ``split`` ([B, T, ...] outputs cut to each
    example's length, [B, ...] outputs per row), ``branch`` in eval mode."""
    branch.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(split), batch_size):
        rows = split.hidden[start : start + batch_size]
        hidden, mask = pad_hidden(rows, device)
        values = run(hidden, mask).float().cpu()
        for i, row in enumerate(rows):
            out.append(values[i, : row.shape[0]] if values.ndim == 3 else values[i])
    return out


def score(
    head: HeadSpec, logits: Sequence[torch.Tensor], labels: Sequence[Any], metrics: Sequence[str]
) -> dict[str, float]:
    """Return ``{metric: value}`` of per-example logits against encoded labels."""
    return evaluate(metrics, *heads.get(head.kind).decode(head, logits, labels))


def batch_loss(
    branch: nn.Module, head: HeadSpec, split: Split, indices: Sequence[int], device: str = "cpu"
) -> torch.Tensor:
    """Return the training loss of ``branch`` on the examples at ``indices`` of ``split``:
    the hard loss, plus the soft (distillation) loss when ``split.teacher`` is set, plus
    the mean squared error between the branch's top hidden state and the teacher's over
    the real tokens when ``split.teacher_states`` is set (``branch`` is then a
    :class:`~mtreg.nn.layers.Branch`: its states come from ``encode``)."""
    kind = heads.get(head.kind)
    hidden, mask = pad_hidden([split.hidden[i] for i in indices], device)
    labels = kind.stack([split.labels[i] for i in indices], hidden.shape[1]).to(device)
    states_loss = None
    if split.teacher_states is None:
        logits = branch(hidden, mask)
    else:
        states = branch.encode(hidden, mask)
        logits = branch.classify(states, mask)
        target, _ = pad_hidden([split.teacher_states[i] for i in indices], device)
        real = mask.unsqueeze(-1).to(torch.float32)
        squared = (states.float() - target) ** 2 * real
        states_loss = squared.sum() / (real.sum() * states.shape[-1])
    logits = logits.float()  # the losses in fp32 under bf16 autocast
    loss = kind.loss(logits, labels)
    if states_loss is not None:
        loss = loss + states_loss
    if split.teacher is not None:
        rows = [split.teacher[i] for i in indices]
        if head.per_token:
            teacher, _ = pad_hidden(rows, device)
        else:
            teacher = torch.stack(rows).to(device=device, dtype=torch.float32)
        loss = loss + kind.distill(logits, teacher, labels, TEMPERATURE)
    return loss


def fit(
    branch: nn.Module,
    head: HeadSpec,
    train: Split,
    dev: Split,
    metrics: Sequence[str],
    recipe: Recipe,
    device: str = "cpu",
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``branch`` on cached activations and keep its best epoch by the first metric.

    With ``train.teacher`` set the loss is hard + soft (distillation, 1:1); otherwise the
    hard loss alone. Seeded by ``recipe.seed``: the same inputs give the same weights.
    With ``recipe.patience`` set, training stops after that many epochs without a better
    dev score (the learning-rate schedule still spans ``recipe.epochs``). ``progress`` gets
    what :func:`train_loop` reports.

    Returns:
        The best branch (a copy, in eval mode), its epoch, its dev metrics and the history.

    Raises:
        MtregError: the train or the dev split is empty.
        Diverged: the loss or the weights stopped being finite (see :func:`train_loop`).
    """
    if not len(train) or not len(dev):
        raise MtregError("cannot train on an empty split: the train and dev splits need examples")
    return TrainResult(
        *train_loop(
            branch,
            head,
            [h.shape[0] for h in train.hidden],
            dev.labels,
            metrics,
            recipe,
            loss_for=lambda indices: batch_loss(branch, head, train, indices, device),
            predict=lambda: predict_logits(branch, dev, device=device),
            device=device,
            progress=progress,
        )
    )


def train_loop(
    module: nn.Module,
    head: HeadSpec,
    lengths: Sequence[int],
    dev_labels: Sequence[Any],
    metrics: Sequence[str],
    recipe: Recipe,
    *,
    loss_for: Callable[[list[int]], torch.Tensor],
    predict: Callable[[], Sequence[torch.Tensor]],
    device: str = "cpu",
    progress: Progress | None = None,
    train_mode: Callable[[], None] | None = None,
) -> tuple[nn.Module, int, dict[str, float], list[dict[str, Any]], float]:
    """The one training loop of mtreg, for branches on cached states and whole models alike.

    ``lengths`` are the training examples' lengths in tokens (batches are cut by
    :func:`batch_order`), ``loss_for(indices)`` returns a batch's loss, ``predict()`` the
    dev logits;
    ``train_mode()`` (default ``module.train()``) prepares an epoch. AdamW without decay on
    LayerNorm and biases, gradient clipping, warm-up then linear decay, the best epoch by
    the first metric (a tie is no improvement), early stopping after ``recipe.patience``;
    losses under :func:`autocast` at ``recipe.precision``, dev scores in fp32 (as served).
    ``progress`` gets a line per epoch and, if it is a ``StepProgress``, a ``Step`` per batch.

    Returns:
        The best epoch's module (a CPU copy in eval mode), that epoch, its dev metrics, the
        history and the seconds taken.

    Raises:
        Diverged: the loss or the weights stopped being finite: the run stops there.
    """
    started = time.perf_counter()
    forward_context = autocast(recipe.precision, device)
    # The shuffling generator and the global RNG (dropout) both start from the seed, so a
    # run is reproducible on the CPU whatever ran before it in the process.
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    module.to(device)
    num_train = len(lengths)
    steps = _Steps.start(module, recipe, num_train, forward_context)
    best: tuple[float, int, dict[str, float], dict[str, torch.Tensor]] | None = None
    history = []
    for epoch in range(1, recipe.epochs + 1):
        (train_mode or module.train)()
        order = batch_order(lengths, recipe.batch_size, generator, recipe.length_buckets)
        on_batch = batch_reporter(progress, steps.batches, epoch=epoch, epochs=recipe.epochs)
        train_loss = steps.epoch(epoch, order, loss_for, on_batch) / num_train
        dev_metrics = score(head, predict(), dev_labels, metrics)
        history.append({"epoch": epoch, "train_loss": train_loss, **dev_metrics})
        _report_epoch(progress, epoch, recipe.epochs, train_loss, dev_metrics)
        key = dev_metrics[metrics[0]]
        if best is None or key > best[0]:
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            best = (key, epoch, dev_metrics, state)
        elif recipe.patience is not None and epoch - best[1] >= recipe.patience:
            break  # early stop: the best epoch is kept either way
    assert best is not None, "recipe.epochs must be at least 1"
    result = copy.deepcopy(module).cpu()
    result.load_state_dict(best[3])
    result.eval()
    return result, best[1], best[2], history, time.perf_counter() - started


class Diverged(MtregError):
    """A training run whose loss or weights stopped being finite numbers."""

    @classmethod
    def at(cls, epoch: int, what: str) -> Diverged:
        """Return the error of a run that diverged in ``epoch``, ``what`` saying how."""
        return cls(
            f"training diverged in epoch {epoch}: {what}; nothing was kept. Lower the "
            "learning rate (--lr), or check the data's targets"
        )


def nonfinite_weight(module: nn.Module) -> str | None:
    """Return the name of a parameter of ``module`` holding NaN or Inf, or None."""
    for name, parameter in module.named_parameters():
        if not torch.isfinite(parameter).all():
            return name
    return None


@dataclass
class _Steps:
    """What the training steps of one run share: the module, its optimizer and learning-rate
    schedule, and the autocast context its losses are computed under."""

    module: nn.Module
    recipe: Recipe
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    forward_context: contextlib.AbstractContextManager[Any]
    batches: int  # per epoch

    @classmethod
    def start(
        cls,
        module: nn.Module,
        recipe: Recipe,
        num_train: int,
        forward_context: contextlib.AbstractContextManager[Any],
    ) -> _Steps:
        """Return the steps of a run of ``recipe`` over ``num_train`` examples."""
        optimizer = optimizer_for(module, recipe)
        batches = math.ceil(num_train / recipe.batch_size)
        schedule = linear_schedule(optimizer, batches, recipe)
        return cls(module, recipe, optimizer, schedule, forward_context, batches)

    def epoch(
        self,
        number: int,
        order: Sequence[torch.Tensor],
        loss_for: Callable[[list[int]], torch.Tensor],
        on_batch: Callable[[int, float], None] | None,
    ) -> float:
        """Take one optimizer step per batch of example indices in ``order`` (epoch
        ``number``); tell ``on_batch`` each batch's number and the mean loss so far.

        Returns:
            The epoch's training loss summed over its examples.

        Raises:
            Diverged: a batch's loss, or a weight at the end of the epoch, is NaN or Inf.
        """
        total, seen = 0.0, 0
        for batch, indices in enumerate(order, 1):
            with self.forward_context:
                loss = loss_for(indices.tolist())
            if not torch.isfinite(loss):
                value = float(loss.detach())
                raise Diverged.at(number, f"the training loss became {value} at batch {batch}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.recipe.clip)
            self.optimizer.step()
            self.schedule.step()
            total += float(loss.detach()) * len(indices)
            seen += len(indices)
            if on_batch is not None:
                on_batch(batch, total / seen)
        bad = nonfinite_weight(self.module)
        if bad is not None:
            raise Diverged.at(number, f"weight {bad!r} holds NaN or Inf")
        return total


def _report_epoch(
    progress: Progress | None, epoch: int, epochs: int, loss: float, dev: dict[str, float]
) -> None:
    """Tell ``progress`` (if any) an epoch's training loss and dev metrics, on one line."""
    if progress:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in dev.items())
        progress(f"epoch {epoch}/{epochs}: loss {loss:.4f}, {shown}")
