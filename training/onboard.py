"""Onboarding a task: teacher search and distillation (:mod:`mtreg.training.stages`), choice
of the smallest good branch, branch file, registration. The library behind ``mtreg train``,
``mtreg distill`` and ``mtreg onboard``.

Onboarding keeps the smallest branch whose dev score is within ``tolerance`` of the best
teacher's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtreg.artifacts.branch_file import BranchMeta, write_branch
from mtreg.errors import MtregError
from mtreg.training.job import Job, prepare
from mtreg.training.progress import Progress
from mtreg.training.settings import Settings, epoch_cap, with_overrides
from mtreg.training.stages import (
    Run,
    StageResult,
    chosen_teacher,
    distill,
    load_run,
    threshold,
    train_teachers,
)
from mtreg.training.teacher import distill_from, resolve_teacher

if TYPE_CHECKING:
    from mtreg.registry.api import Registry
    from mtreg.registry.outcomes import Changes


@dataclass
class OnboardReport:
    """What :func:`onboard` tried, what it chose and what it registered."""

    task: str
    version: str
    trunk: str
    metric: str
    tolerance: float
    threshold: float
    runs: list[Run]
    teacher: Run
    chosen: Run
    weights: Path
    budget: dict[str, Any]
    settings: dict[str, Any]
    changes: Changes | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "task": self.task,
            "version": self.version,
            "trunk": self.trunk,
            "metric": self.metric,
            "tolerance": self.tolerance,
            "threshold": self.threshold,
            "runs": [r.to_dict() for r in self.runs],
            "teacher": self.teacher.to_dict(),
            "chosen": self.chosen.to_dict(),
            "weights": str(self.weights),
            "budget": self.budget,
            "settings": self.settings,
            "changes": self.changes.to_dict() if self.changes is not None else None,
            "seconds": self.seconds,
        }


# -- choosing, writing, registering -------------------------------------------------------


def choose(runs: Sequence[Run], teacher: Run, metric: str, tolerance: float) -> Run:
    """Return the smallest branch whose dev score reaches ``tolerance`` of the teacher's;
    among equally small ones, the best scoring. The teacher itself always qualifies."""
    floor = threshold(teacher.dev_metrics[metric], tolerance)
    good = [r for r in runs if r.dev_metrics[metric] >= floor] or [teacher]
    return min(good, key=lambda r: (r.layers, -r.dev_metrics[metric], r.stage != "student"))


def write_chosen(
    job: Job,
    run: Run,
    teacher: Run,
    path: Path,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run``'s branch as the task's branch file at ``path``; return the path.

    Raises:
        MtregError: the saved run is gone, or ``path`` cannot be written.
    """
    found = load_run(job, run.name, run.key, run.layers)
    if found is None:
        raise MtregError(f"the saved run {run.name} is gone: run the command again")
    _, branch = found
    meta = BranchMeta(
        task=job.spec.name,
        task_version=job.spec.version,
        fork_depth=run.fork_depth,
        num_layers=run.layers,
        head=job.spec.head,
        max_length=job.max_length,
        trunk_prefix=job.fingerprint.prefix(run.fork_depth),
        training={
            "dev_metrics": run.dev_metrics,
            "teacher_layers": teacher.layers,
            "student_layers": run.layers if run.stage == "student" else None,
            "teacher_dev_metrics": teacher.dev_metrics,
            "data_hash": job.data_hash,
            "recipe": {
                "stage": run.stage,
                "lr": run.lr,
                "epochs": run.epochs,
                "best_epoch": run.best_epoch,
                "batch_size": job.settings.batch_size,
                "seed": job.settings.seed,
                "dropout": job.settings.dropout,
                "precision": job.settings.precision,
                **(extra or {}),
            },
        },
    )
    try:
        return write_branch(path, branch.state_dict(), meta)
    except OSError as exc:
        raise MtregError(f"cannot write the branch file {path}: {exc}; pass --out") from None


def output_path(job: Job, out: str | Path | None) -> Path:
    """Return where a branch file goes: ``out``, else the plugin's weights path, else
    ``MTREG_HOME/trained/<task>/<version>.safetensors``."""
    if out is not None:
        return Path(out)
    if job.spec.weights is not None:
        return Path(job.spec.weights)
    return job.registry.home.trained(job.spec.name, job.spec.version)


# -- the commands -------------------------------------------------------------------------


def train_teacher(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> StageResult:
    """``mtreg train``: search teachers for ``task``; write the best as a branch file when
    ``out`` is given. Keyword ``overrides`` set :class:`Settings` fields.

    Raises:
        MtregError: see :func:`~mtreg.training.job.prepare` and
            :func:`~mtreg.training.stages.train_teachers`.
    """
    job = prepare(
        registry, task, with_overrides(settings, overrides), data_dir=data_dir, progress=progress
    )
    result = train_teachers(job)
    if out is not None:
        write_chosen(job, result.best, result.best, Path(out))
    return result


def distill_task(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> tuple[StageResult, Run, Path]:
    """``mtreg distill``: distil the task's trained teacher and write the best student
    (by the tolerance rule against the teacher) as the task's branch file.

    Returns:
        The distillation runs, the run written, and the file's path.

    Raises:
        MtregError: see :func:`~mtreg.training.job.prepare` and
            :func:`~mtreg.training.stages.distill`.
    """
    job = prepare(
        registry, task, with_overrides(settings, overrides), data_dir=data_dir, progress=progress
    )
    result = distill(job)
    teacher = chosen_teacher(job)[0]
    picked = choose(result.runs, teacher, job.metrics[0], job.settings.tolerance)
    return result, picked, write_chosen(job, picked, teacher, output_path(job, out))


def onboard(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    register: bool = True,
    promote: bool = False,
    progress: Progress | None = None,
    teacher: str | Path | None = None,
    **overrides: Any,
) -> OnboardReport:
    """``mtreg onboard``: teacher search, distillation, choice of the smallest branch within
    ``tolerance`` of the best teacher, branch file, registration (which rebuilds the bundle).
    With ``teacher`` (a classifier folder or Hub id) that model is the teacher and the
    search only distils it (:mod:`mtreg.training.teacher`).

    A killed onboarding run again resumes after its last finished training run.

    Returns:
        What was tried (every run, with its dev metrics and seconds), what was chosen, the
        explicit budget, and the registry's Changes (None with ``register=False``).

    Raises:
        MtregError: see :func:`~mtreg.training.job.prepare`; and whatever registration refuses.
    """
    started = time.perf_counter()
    job = prepare(
        registry, task, with_overrides(settings, overrides), data_dir=data_dir, progress=progress
    )
    runs, best, chosen, epochs, used = _search(job, teacher)
    metric = job.metrics[0]
    job.say(f"chose {chosen.name} ({metric} {chosen.dev_metrics[metric]:.4f})")
    budget = _budget(job, runs, epochs)
    # Wall-clock seconds stay out of the file: an onboarding resumed or run again must
    # write the same bytes, so that registering it again is "unchanged".
    steady = {k: v for k, v in budget.items() if k != "train_seconds"}
    path = write_chosen(job, chosen, best, output_path(job, out), {"budget": steady})
    changes = None
    if register:
        changes = registry.register([task], weights={task: path}, promote=promote)
    return OnboardReport(
        task=task,
        version=job.spec.version,
        trunk=job.trunk.name,
        metric=metric,
        tolerance=job.settings.tolerance,
        threshold=threshold(best.dev_metrics[metric], job.settings.tolerance),
        runs=runs,
        teacher=best,
        chosen=chosen,
        weights=path,
        budget=budget,
        settings={**used, "device": job.device},
        changes=changes,
        seconds=time.perf_counter() - started,
    )


def _search(
    job: Job, teacher: str | Path | None
) -> tuple[list[Run], Run, Run, int, dict[str, Any]]:
    """Search teachers and distil the best, or distil the outside ``teacher``; return the
    runs, the teacher, the run chosen, the epochs of one full fine-tuning to compare
    against, and the settings used."""
    if teacher is None:
        teachers, students = train_teachers(job), distill(job)
        runs = teachers.runs + students.runs
        chosen = choose(runs, teachers.best, job.metrics[0], job.settings.tolerance)
        used = {**teachers.settings, **students.settings}
        return runs, teachers.best, chosen, teachers.settings["epochs"], used
    students = distill_from(job, *resolve_teacher(job, teacher))
    best = Run(**{k: v for k, v in students.settings["teacher"].items() if k != "source"})
    chosen = choose(students.runs, best, job.metrics[0], job.settings.tolerance)
    if chosen is best:  # an outside teacher is no branch to keep: the best student is
        chosen = students.best
    epochs = epoch_cap(job.settings, "full")
    return students.runs, best, chosen, epochs, students.settings


def _budget(job: Job, runs: Sequence[Run], epochs: int) -> dict[str, Any]:
    """The search's cost, explicit: runs, and branch-layer epochs actually trained against
    one full fine-tuning of all N layers for ``epochs`` (the issue's ≤ 2× goal; the one
    trunk pass that fills the cache is forward-only and comes on top)."""
    n = job.config.num_hidden_layers
    layer_epochs = sum(r.layers * r.epochs_run for r in runs)
    return {
        "runs": len(runs),
        "teacher_runs": sum(r.stage == "teacher" for r in runs),
        "student_runs": sum(r.stage == "student" for r in runs),
        "layer_epochs": layer_epochs,
        "full_finetune_layer_epochs": n * epochs,
        "ratio_vs_full": round(layer_epochs / (n * epochs), 3),
        "train_seconds": round(sum(r.seconds for r in runs if not r.resumed), 3),
    }
