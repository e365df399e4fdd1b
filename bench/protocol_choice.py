"""The protocol's evidence and choice (bench/protocol.py): finished units read back, the
branch ``mtreg onboard`` would serve for each configuration, full fine-tuning's mean per
rate, and the configuration the choosing tasks select (:func:`choose`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import protocol as p


def load(root: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Return every finished unit under ``root`` by (task, unit name)."""
    found = {}
    for path in sorted(root.glob("*/*.json")):
        data = p.read_unit(path)
        if data is not None:
            found[(path.parent.name, path.stem)] = data
    return found


def _run(data: dict[str, Any]) -> Any:
    """Return a unit's run row as onboarding's Run; units leave out its checkpoint key,
    which choosing never reads."""
    from mtreg.training.stages import Run

    return Run(**{"key": "", **{k: data[k] for k in Run.__dataclass_fields__ if k in data}})


def served(
    units: dict,
    task: str,
    seed: int,
    search: Sequence[int],
    lr: float,
    tolerance: float,
    student_lrs: Sequence[float] | None = None,
) -> dict[str, Any] | None:
    """Return the branch ``mtreg onboard`` would keep for a configuration (teachers of
    ``search`` at ``lr``, ``tolerance``, students at ``student_lrs``: None takes every
    student the units hold, the protocol's at onboarding's default rate) from the branch
    units of (task, seed); ``{"collapsed": True}`` when every teacher diverged; None while a
    unit is missing."""
    from mtreg.training.onboard import choose

    parts = [units.get((task, p.Unit(task, "branch", lr, seed, d).name)) for d in search]
    if any(part is None for part in parts):
        return None
    rows = [row for part in parts for row in part["runs"]]  # type: ignore[index]
    teachers = [r for r in rows if r["stage"] == "teacher"]
    if not teachers:
        return {"collapsed": True}
    metric = parts[0]["metric"]  # type: ignore[index]
    best = max(teachers, key=lambda r: (r["dev_metrics"][metric], -r["layers"]))
    # onboard's choice sees every teacher and the students of the best one
    depth = best["fork_depth"]
    same_fork = [
        r
        for r in rows
        if r["stage"] == "student"
        and r["fork_depth"] == depth
        and (student_lrs is None or r["lr"] in student_lrs)
    ]
    candidates = teachers + same_fork
    picked = choose([_run(r) for r in candidates], _run(best), metric, tolerance)
    return next(r for r in candidates if _run(r) == picked)


def score(row: dict[str, Any] | None, metric: str) -> float | None:
    """Return a served row's score on the reported split: 0 when it collapsed, None when
    it is missing."""
    if row is None:
        return None
    return 0.0 if row.get("collapsed") else row["reported"]["metrics"][metric]


def full_mean(units: dict, task: str, lr: float) -> tuple[float | None, int]:
    """Return full fine-tuning's mean reported score at ``lr`` over the finished seeds, and
    how many seeds that is."""
    scores = []
    for seed in p.SEEDS:
        unit = units.get((task, p.Unit(task, "full", lr, seed).name))
        if unit is not None:
            scores.append(unit["runs"][0]["reported"]["metrics"][unit["metric"]])
    return (statistics.fmean(scores) if scores else None), len(scores)


def configs() -> list[tuple[tuple[int, ...], float, float]]:
    """Return every onboarding configuration: (teacher depths, teacher rate, tolerance)."""
    return [(s, lr, t) for s in p.TEACHER_SEARCHES for lr in p.TEACHER_LRS for t in p.TOLERANCES]


def config_row(
    units: dict,
    tasks: Sequence[str],
    config: tuple,
    full_lr: dict,
    student_lrs: Sequence[float] | None = None,
) -> dict:
    """Return a configuration's mean ratio to full fine-tuning and mean layers per request
    over ``tasks`` (mean over seeds, then tasks), with how many (task, seed) cells it has;
    ``student_lrs`` as in :func:`served`."""
    search, lr, tolerance = config
    ratios, layers, cells = [], [], 0
    for task in tasks:
        full, _ = full_mean(units, task, full_lr.get(task, p.FULL_LRS[0]))
        per_seed = []
        for seed in p.SEEDS:
            row = served(units, task, seed, search, lr, tolerance, student_lrs)
            metric = metric_of(units, task)
            if row is None or full is None or metric is None:
                continue
            cells += 1
            per_seed.append((score(row, metric) / full, row.get("layers_per_request", 6)))
        if per_seed:
            ratios.append(statistics.fmean(r for r, _ in per_seed))
            layers.append(statistics.fmean(n for _, n in per_seed))
    return {
        "search": list(search),
        "teacher_lr": lr,
        "tolerance": tolerance,
        "ratio": statistics.fmean(ratios) if ratios else None,
        "layers": statistics.fmean(layers) if layers else None,
        "cells": cells,
    }


def metric_of(units: dict, task: str) -> str | None:
    """Return the metric ``task``'s units select on (None before any finished)."""
    return next((u["metric"] for (t, _), u in units.items() if t == task), None)


def choose(root: Path) -> dict[str, Any]:
    """Return the protocol's choice from the choosing tasks' units (see bench/protocol.py):
    the full fine-tuning rate, and the onboarding configuration, with their tables."""
    units = load(root)
    full = []
    for lr in p.FULL_LRS:
        means = [full_mean(units, t, lr)[0] for t in p.CHOOSING]
        done = [m for m in means if m is not None]
        full.append(
            {"lr": lr, "mean": statistics.fmean(done) if done else None, "tasks": len(done)}
        )
    scored = [f for f in full if f["mean"] is not None]
    full_lr = max(scored, key=lambda f: (f["mean"], -f["lr"]))["lr"] if scored else None
    rates = {t: full_lr for t in p.CHOOSING} if full_lr else {}
    rows = [config_row(units, p.CHOOSING, c, rates) for c in configs()]
    best = pick(rows)
    return {
        "full_lr": full_lr,
        "full": full,
        "configs": rows,
        "teacher_lr": best and best["teacher_lr"],
        "search": best and best["search"],
        "tolerance": best and best["tolerance"],
    }


def pick(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the row the protocol's rule selects among :func:`config_row` rows: among
    those whose mean ratio reaches :data:`protocol.GOAL`, the fewest layers per request
    (a tie: the higher ratio); if none does, the highest ratio (a tie: the first). None
    when no row has a ratio."""
    rated = [r for r in rows if r["ratio"] is not None]
    good = [r for r in rated if r["ratio"] >= p.GOAL]
    if good:
        return min(good, key=lambda r: (r["layers"], -r["ratio"]))
    return max(rated, key=lambda r: r["ratio"], default=None)
