"""The protocol's plan, choice and report (bench/protocol.py): what is left to run and
what it costs, which configuration the choosing tasks select, and how it does on every
task with finished units.

Written to bench/results/quality-protocol.md, .json and .png from whatever units exist;
what is missing is said, and no choice is made from an incomplete set of choosing units.
Not quality.json: ``mtreg report`` reads that file's format as its full fine-tuning
baseline, and the earlier subsample run (bench/quality.py) wrote it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import protocol as p
import quality

Z95 = 1.96
STEM = "quality-protocol"


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
    units: dict, task: str, seed: int, search: Sequence[int], lr: float, tolerance: float
) -> dict[str, Any] | None:
    """Return the branch ``mtreg onboard`` would keep for a configuration (teachers of
    ``search`` at ``lr``, students at its default rate, ``tolerance``) from the branch
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
    same_fork = [r for r in rows if r["stage"] == "student" and r["fork_depth"] == depth]
    candidates = teachers + same_fork
    picked = choose([_run(r) for r in candidates], _run(best), metric, tolerance)
    return next(r for r in candidates if _run(r) == picked)


def _score(row: dict[str, Any] | None, metric: str) -> float | None:
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


def plan(root: Path = p.UNITS) -> list[str]:
    """Return the plan's lines: every unit, done or not, with its estimated cost."""
    units = p.planned_units(root)
    lines, pending = [], {"full": 0.0, "branch": 0.0}
    for u in p.run_order(units):
        found = p.read_unit(u.path(root))
        state = f"done ({found['hours']:.2f} h)" if found else f"~{u.estimate() / 3600:.2f} h"
        if not found:
            pending[u.method] += u.estimate() / 3600
        fold = "choose" if u.task in p.CHOOSING else "judge"
        lines.append(f"{fold:6} {u.task:13} {u.name:28} {state}")
    total = sum(pending.values())
    lines.append(f"pending: {total:.1f} CPU hours (estimate at the epoch cap)")
    scaled = p.realized_shares(units, root)
    if scaled:
        likely = sum(h * scaled.get(m, 1.0) for m, h in pending.items())
        shares = ", ".join(f"{m} units {r:.0%}" for m, r in scaled.items())
        lines.append(
            f"finished units took {shares} of their estimates; at that rate (1.0 where none "
            f"finished) the pending units take about {likely:.1f} CPU hours"
        )
    if not any(u.task in p.JUDGING for u in units):
        lines.append("judging units: planned once the choosing units are complete")
    return lines


def configs() -> list[tuple[tuple[int, ...], float, float]]:
    """Return every onboarding configuration: (teacher depths, teacher rate, tolerance)."""
    return [(s, lr, t) for s in p.TEACHER_SEARCHES for lr in p.TEACHER_LRS for t in p.TOLERANCES]


def config_row(units: dict, tasks: Sequence[str], config: tuple, full_lr: dict) -> dict:
    """Return a configuration's mean ratio to full fine-tuning and mean layers per request
    over ``tasks`` (mean over seeds, then tasks), with how many (task, seed) cells it has."""
    search, lr, tolerance = config
    ratios, layers, cells = [], [], 0
    for task in tasks:
        full, _ = full_mean(units, task, full_lr.get(task, p.FULL_LRS[0]))
        per_seed = []
        for seed in p.SEEDS:
            row = served(units, task, seed, search, lr, tolerance)
            metric = _metric(units, task)
            if row is None or full is None or metric is None:
                continue
            cells += 1
            per_seed.append((_score(row, metric) / full, row.get("layers_per_request", 6)))
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


def _metric(units: dict, task: str) -> str | None:
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
    rated = [r for r in rows if r["ratio"] is not None]
    good = [r for r in rated if r["ratio"] >= p.GOAL]
    best = (
        min(good, key=lambda r: (r["layers"], -r["ratio"]))
        if good
        else max(rated, key=lambda r: r["ratio"], default=None)
    )
    return {
        "full_lr": full_lr,
        "full": full,
        "configs": rows,
        "teacher_lr": best and best["teacher_lr"],
        "search": best and best["search"],
        "tolerance": best and best["tolerance"],
    }


def floor(units: dict, task: str, lr: float) -> dict[str, Any] | None:
    """Return seed 0's full fine-tuning against the majority floor on the reported split:
    the difference and its 95% interval (paired bootstrap over examples)."""
    unit = units.get((task, p.Unit(task, "full", lr, 0).name))
    if unit is None:
        return None
    metric, reported = unit["metric"], unit["runs"][0]["reported"]
    refs, preds = reported["references"], reported["predictions"]
    const = quality.majority(refs)
    from mtreg.training.metrics import evaluate

    full_score = evaluate([metric], preds, refs)[metric]
    base = evaluate([metric], const, refs)[metric]
    se = quality.paired_bootstrap_se(metric, preds, const, refs)
    diff = full_score - base
    return {
        "majority": base,
        "full": full_score,
        "diff": diff,
        "low": diff - Z95 * se,
        "high": diff + Z95 * se,
        "clears": diff - Z95 * se > 0,
    }


def task_rows(units: dict, choice: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per task with finished full units: full fine-tuning (the chosen rate,
    else the task's best rate so far, said so), the floor, and the served branch."""
    rows = []
    for task in [*p.CHOOSING, *p.JUDGING]:
        means = {lr: full_mean(units, task, lr) for lr in p.FULL_LRS}
        known = {lr: m for lr, m in means.items() if m[0] is not None}
        if not known:
            continue
        lr = (
            choice["full_lr"]
            if choice["full_lr"] in known
            else max(known, key=lambda x: known[x][0])
        )
        row = {"task": task, "fold": "choose" if task in p.CHOOSING else "judge", "full_lr": lr}
        row |= {"full": known[lr][0], "seeds": known[lr][1], "floor": floor(units, task, lr)}
        row["provisional"] = choice["full_lr"] is None
        if choice["search"] is not None:
            config = (tuple(choice["search"]), choice["teacher_lr"], choice["tolerance"])
            row["served"] = config_row(units, [task], config, {task: lr})
        rows.append(row)
    return rows


def hours(units: dict) -> dict[str, float]:
    """Return the hours of finished units by fold and method."""
    out: dict[str, float] = {}
    for (task, name), unit in units.items():
        fold = "choose" if task in p.CHOOSING else "judge"
        key = f"{fold}/{name.split('-')[0]}"
        out[key] = out.get(key, 0.0) + unit["hours"]
    return out


def unit_rows(units: dict) -> list[dict[str, Any]]:
    """Return one row per finished unit: its runs' scores (dev; reported split), epochs
    (best/run), training rate (example-layers per second) and hours."""
    rows = []
    for (task, name), unit in sorted(units.items()):
        runs = []
        for r in unit["runs"]:
            layers = r.get("layers", 6)  # a full unit trains all 6 layers and embeddings
            done = unit["train_size"] * r["epochs_run"] * layers
            runs.append(
                {
                    "run": f"{r['stage'][0]}{layers}" if "stage" in r else "full",
                    "dev": r["dev_metrics"][unit["metric"]],
                    "reported": r["reported"]["metrics"][unit["metric"]],
                    "epochs": f"{r['best_epoch']}/{r['epochs_run']}",
                    "rate": done / r["seconds"] if r["seconds"] else None,
                }
            )
        diverged = len(unit.get("diverged", []))
        rows.append({"task": task, "unit": name, "runs": runs, "diverged": diverged})
        rows[-1] |= {"hours": unit["hours"], "split": unit["split"], "metric": unit["metric"]}
    return rows


def units_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Return the finished units' table (run: t = teacher, s = student, with its layers)."""
    lines = ["", "## Finished units", "", "Run: tN teacher of N layers, sN student; scores"]
    lines[-1] += " dev / reported split; rate: example-layers trained per second; hours of"
    lines[-1] += " the unit's wall time (the machine's load included)."
    lines += ["", "| task | unit | runs (score, best/run epochs, rate) | diverged | hours |"]
    lines += ["|---|---|---|---:|---:|"]
    for row in rows:
        runs = "; ".join(
            f"{r['run']}: {100 * r['dev']:.1f} / {100 * r['reported']:.1f} ({r['split_tag']}), "
            f"{r['epochs']}, {r['rate']:.0f}/s"
            if r["rate"]
            else f"{r['run']}: {100 * r['dev']:.1f}"
            for r in ({**r, "split_tag": row["split"]} for r in row["runs"])
        )
        lines.append(
            f"| {row['task']} | {row['unit']} | {runs or '–'} | {row['diverged']} | "
            f"{row['hours']:.2f} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """Return the report as Markdown."""
    choice = report["choice"]
    lines = [
        "# Quality against full fine-tuning: the protocol (bench/protocol.py)",
        "",
        f"Written {report['written']}. Choosing tasks: {', '.join(p.CHOOSING)}; judging "
        f"tasks: {', '.join(p.JUDGING)}. Units finished: {report['finished']} of "
        f"{report['planned']} choosing units. Hours (unit wall time): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(report["hours"].items())),
        "",
        "## Full fine-tuning's rate on the choosing tasks (mean over seeds, then tasks)",
        "",
        "| lr | mean dev score | tasks with units |",
        "|---:|---:|---:|",
    ]
    for f in choice["full"]:
        mean = "–" if f["mean"] is None else f"{100 * f['mean']:.1f}"
        lines.append(f"| {f['lr']:g} | {mean} | {f['tasks']} of {len(p.CHOOSING)} |")
    lines += ["", "## Onboarding configurations on the choosing tasks", ""]
    lines += ["| teachers L | lr | tolerance | % of full | layers/request | cells |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for c in choice["configs"]:
        ratio = "–" if c["ratio"] is None else f"{100 * c['ratio']:.1f}%"
        layers = "–" if c["layers"] is None else f"{c['layers']:.1f}"
        depth = ",".join(map(str, c["search"]))
        lines.append(
            f"| {depth} | {c['teacher_lr']:g} | {c['tolerance']} | {ratio} | {layers} | "
            f"{c['cells']} of {len(p.CHOOSING) * len(p.SEEDS)} |"
        )
    state = "complete" if report["complete"] else "INCOMPLETE: no choice is made yet"
    lines += ["", f"Choosing units: {state}.", "", "## Per task", ""]
    lines += ["| task | fold | full FT (lr, seeds) | majority | full − majority [95%] | clears |"]
    lines += ["|---|---|---:|---:|---:|---|"]
    for r in report["tasks"]:
        f = r["floor"]
        gap = majority = clears = "–"
        if f is not None:
            gap = f"{100 * f['diff']:.1f} [{100 * f['low']:.1f}, {100 * f['high']:.1f}]"
            majority, clears = f"{100 * f['majority']:.1f}", "yes" if f["clears"] else "no"
        tag = " (best so far, not chosen)" if r["provisional"] else ""
        lines.append(
            f"| {r['task']} | {r['fold']} | {100 * r['full']:.1f} ({r['full_lr']:g}, "
            f"{r['seeds']}){tag} | {majority} | {gap} | {clears} |"
        )
    return "\n".join([*lines, *units_markdown(report["units"])]) + "\n"


def figure(report: dict[str, Any], path: Path) -> None:
    """Draw full fine-tuning above the majority floor per task, one bar each (task names on
    their own ticks, rotated, so labels cannot overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["tasks"] if r["floor"] is not None]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows) + 2), 3.5))
    xs = range(len(rows))
    diffs = [100 * r["floor"]["diff"] for r in rows]
    errs = [100 * (r["floor"]["high"] - r["floor"]["diff"]) for r in rows]
    ax.bar(
        xs,
        diffs,
        yerr=errs,
        capsize=3,
        color=["#4c72b0" if r["fold"] == "choose" else "#dd8452" for r in rows],
    )
    ax.set_xticks(list(xs), [f"{r['task']}\n({r['fold']})" for r in rows], rotation=30, ha="right")
    ax.set_ylabel("full FT − majority (points, 95%)")
    ax.axhline(0, color="black", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(root: Path, out: Path) -> dict[str, Any]:
    """Write quality-protocol.{md,json,png} under ``out`` from the units under ``root``;
    return the report."""
    units = load(root)
    choosing = p.choosing_units()
    finished = sum((u.task, u.name) in units for u in choosing)
    complete = finished == len(choosing)
    choice = choose(root)
    if not complete:  # no choice from partial evidence: the tables only
        choice |= {"full_lr": None, "teacher_lr": None, "search": None, "tolerance": None}
    report = {
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "choice": choice,
        "complete": complete,
        "finished": finished,
        "planned": len(choosing),
        "hours": hours(units),
        "tasks": task_rows(units, choice),
        "units": unit_rows(units),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{STEM}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (out / f"{STEM}.md").write_text(markdown(report))
    if any(r["floor"] for r in report["tasks"]):
        figure(report, out / f"{STEM}.png")
    return report
