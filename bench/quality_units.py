"""What bench/quality.py runs, and the units it caches: the tasks and their subsamples,
the search both methods share, the onboarding variants, and each unit's JSON (task × seed ×
method) with the full fine-tuning run its search chose."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results"
UNITS = RESULTS / "quality"
WORK = Path(os.environ.get("MTREG_BENCH_WORK", Path.home() / ".cache" / "mtreg-bench" / "quality"))

# Task -> subsample sizes per split (None or absent: the whole split) and max length override.
TASKS: dict[str, dict[str, Any]] = {
    "cola": {"sizes": {"train": 1500}},
    "sst2": {"sizes": {"train": 1500}},
    "mrpc": {"sizes": {"train": 600}},
    "stsb": {"sizes": {"train": 800, "dev": 600}},
    "rte": {"sizes": {"train": 500}, "max_length": 128},
    "qqp": {"sizes": {"train": 1200, "dev": 800}},
    "clinc150": {"sizes": {"train": 2000, "dev": 1000, "test": 2000}},
    "snips-intent": {"sizes": {"train": 1000}},
    "snips-slots": {"sizes": {"train": 1000}},
}
SMALL = ("rte", "mrpc", "cola", "stsb")
TEST_TASKS = ("clinc150", "snips-intent", "snips-slots")
# 6e-4 since the 3-rate grid (up to 2e-4) put both methods' best CLINC150 and SNIPS-slots
# runs at its top rate and last epochs: the edge of the search, under-tuned.
LRS = (2e-5, 6e-5, 2e-4, 6e-4)
EPOCHS = 10
PATIENCE = 2
TEACHER_LAYERS = (2, 3)
STUDENT_LRS = (5e-4,)  # pinned, so a change of onboard's default cannot split the run
SEEDS = (0, 1, 2)
# Both methods train in mixed precision (`mtreg onboard --precision bf16`): about twice as
# fast on this machine's AMX CPU; weights, gradients and optimizer state stay fp32, and the
# bundle is scored and timed in fp32 as it is served.
PRECISION = "bf16"


@dataclass(frozen=True)
class Variant:
    """A variant of seed 0's onboarding, run into a home (and bundle) of its own."""

    name: str
    title: str
    about: str
    overrides: dict[str, Any]
    pin_teacher: bool  # keep the base's chosen teacher: only the students are chosen again
    base: str = ""  # the onboarding it starts from (its saved runs): "" is the main run

    @property
    def suffix(self) -> str:
        """The suffix of its home (``seed0-<name>``), units and bundle score."""
        return f"-{self.name}"


VARIANTS = (
    Variant(
        "strict",
        "A stricter student choice (tolerance 1.0)",
        "The same teachers; the smallest student at least as good as its teacher on dev, "
        "else the teacher itself (`mtreg onboard --tolerance 1`).",
        {"tolerance": 1.0},
        pin_teacher=True,
    ),
    Variant(
        "loose",
        "A looser student choice (tolerance 0.98)",
        "The same teachers; the smallest student within 98% of its teacher (its students are "
        "the main run's: nothing new trains; `mtreg onboard --tolerance 0.98`).",
        {"tolerance": 0.98},
        pin_teacher=True,
    ),
    Variant(
        "deep",
        "Deeper teachers (L in 2..4)",
        "Teachers also at L = 4 (fork depth 2) at the same learning rates; students and the "
        "0.99 tolerance as in the main run (`mtreg onboard --search 2..4`).",
        {"teacher_layers": (2, 3, 4)},
        pin_teacher=False,
    ),
    Variant(
        "deep-loose",
        "Deeper teachers, a looser student choice (tolerance 0.98)",
        "The deep variant's teachers; the smallest student within 98% of its teacher "
        "(its students are the deep variant's: nothing new trains).",
        {"tolerance": 0.98},
        pin_teacher=True,
        base="-deep",
    ),
)


def log(line: str) -> None:
    """Print a timestamped progress line (to the run log)."""
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def first_metric(task: str) -> str:
    """Return the metric that selects the best epoch and run for a built-in task (its
    plugin's first; unit JSON is written with sorted keys, so dict order cannot tell)."""
    from mtreg.plugins import glue, intent

    return {spec.name: spec.metrics[0] for spec in [*glue.tasks(), *intent.tasks()]}[task]


def plugin_config(tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Return the benchmark plugin's config: the subsample of each task (default: all of
    :data:`TASKS`), data seed 0."""
    return {t: {**TASKS[t], "seed": 0} for t in (TASKS if tasks is None else tasks)}


# -- cached units --------------------------------------------------------------------------


def searched_as(unit: dict[str, Any], settings: Any) -> bool:
    """Return whether an onboard unit was searched with ``settings``: the same teachers,
    learning rates and tolerance (a unit from before a change of the grid is stale)."""
    recorded = unit["settings"]
    return (
        recorded["teacher_layers"] == list(settings.teacher_layers)
        and recorded["teacher_lrs"] == list(settings.teacher_lrs)
        and recorded["student_lrs"] == list(settings.student_lrs)
        and unit["tolerance"] == settings.tolerance
    )


def link_missing(source: Path, target: Path) -> None:
    """Hard-link under ``target`` every file under ``source`` it lacks (none if ``source``
    does not exist). Links are safe copies here: saved runs and activations are replaced,
    never edited; files still being written (dot-named temporaries) are skipped."""
    for path in source.rglob("*") if source.is_dir() else ():
        dest = target / path.relative_to(source)
        if path.is_file() and not path.name.startswith(".") and not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process linked it first
                os.link(path, dest)


def unit_path(root: Path, task: str, seed: int, name: str) -> Path:
    """Return where a unit's JSON lives: ``root/<task>/seed<seed>/<name>.json``."""
    return root / task / f"seed{seed}" / f"{name}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """Return a JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a killed run never leaves half a unit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return the unit at ``path``, computing and writing it first when absent."""
    found = read_json(path)
    if found is not None:
        return found
    data = compute()
    write_json(path, data)
    return data


def full_runs(units: Path, task: str, seed: int) -> list[dict[str, Any]]:
    """Return the cached full fine-tuning runs of the seed's search: for seed 0 those at
    the :data:`LRS`, for a later seed the one at seed 0's choice (units at other lrs, from
    an earlier search, are not part of it)."""
    lrs: Sequence[float] = LRS
    if seed != 0:
        chosen = best_full(units, task, 0)
        lrs = (chosen["lr"],) if chosen is not None else ()
    found = (read_json(unit_path(units, task, seed, f"full-lr{lr:g}")) for lr in lrs)
    return [data for data in found if data is not None]


def best_full(units: Path, task: str, seed: int) -> dict[str, Any] | None:
    """Return the seed's full fine-tuning run the search chose (:func:`full_runs`: the best
    dev score, tie: lower lr), or None."""
    from finetune import better

    best, best_run = None, None
    for data in full_runs(units, task, seed):
        metric = first_metric(task)
        run = _Scored(data["lr"], data["dev_metrics"])
        if better(run, best_run, metric):  # type: ignore[arg-type]
            best, best_run = data, run
    return best


class _Scored:
    """The two fields :func:`finetune.better` compares."""

    def __init__(self, lr: float, dev_metrics: dict[str, float]) -> None:
        self.lr, self.dev_metrics = lr, dev_metrics
