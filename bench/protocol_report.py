"""The protocol's plan and report (bench/protocol.py): what is left to run and what it
costs, the choice (:mod:`protocol_choice`), and how the chosen configuration does against
full fine-tuning on every task with finished units, with each fold's verdict on the goal.

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
import scores
from protocol_choice import choose, full_mean, load, metric_of, score, served

Z95 = 1.96
STEM = "quality-protocol"
# Issue #22's goal beside the mean (protocol.GOAL): every task at least TASK_GOAL of full
# fine-tuning (or within noise of it), the bundle at most LAYER_GOAL of the layers of one
# model per task.
TASK_GOAL = 0.98
LAYER_GOAL = 0.30


def plan(root: Path = p.UNITS) -> list[str]:
    """Return the plan's lines: every unit, done or not, with its estimated cost."""
    units = p.planned_units(root)
    scaled = p.realized_shares(units, root)
    lines, total, likely = [], 0.0, 0.0
    for u in p.run_order(units):
        found = p.read_unit(u.path(root))
        state = f"done ({found['hours']:.2f} h)" if found else f"~{u.estimate() / 3600:.2f} h"
        if not found:
            total += u.estimate() / 3600
            likely += p.expected_seconds(u, scaled) / 3600
        fold = "choose" if u.task in p.CHOOSING else "judge"
        lines.append(f"{fold:6} {u.task:13} {u.name:28} {state}")
    lines.append(f"pending: {total:.1f} CPU hours (estimate at the epoch cap)")
    if scaled:
        shares = ", ".join(f"{m} units {r:.0%}" for m, r in scaled.items() if isinstance(m, str))
        lines.append(
            f"finished units took {shares} of their estimates (per task where it has finished "
            f"units of the method); at those rates the pending units take about {likely:.1f} "
            "CPU hours"
        )
    if not any(u.task in p.JUDGING for u in units):
        lines.append("judging units: planned once the choosing units are complete")
    return lines


def references_of(runs: Sequence[dict[str, Any]]) -> list[Any]:
    """Return the reported split's references, which every seed's run must share.

    Raises:
        ValueError: the runs were scored on different examples.
    """
    refs = runs[0]["reported"]["references"]
    if any(r["reported"]["references"] != refs for r in runs[1:]):
        raise ValueError("seeds were scored on different examples; rerun their units")
    return refs


def floor(units: dict, task: str, lr: float) -> dict[str, Any] | None:
    """Return full fine-tuning against the majority floor on the reported split, mean over
    the seeds that finished: the difference and its 95% interval (paired bootstrap over
    examples, the seeds resampled together). None when no seed finished."""
    from mtreg.training.metrics import evaluate

    names = [p.Unit(task, "full", lr, seed).name for seed in p.SEEDS]
    found = [units[(task, name)] for name in names if (task, name) in units]
    if not found:
        return None
    runs = [u["runs"][0] for u in found]
    metric, refs = found[0]["metric"], references_of(runs)
    const = scores.majority(refs)
    full = statistics.fmean(
        evaluate([metric], r["reported"]["predictions"], refs)[metric] for r in runs
    )
    base = evaluate([metric], const, refs)[metric]
    pairs = [(r["reported"]["predictions"], const) for r in runs]
    half = Z95 * scores.mean_difference_se(metric, pairs, refs)
    diff = full - base
    return {
        "majority": base,
        "full": full,
        "diff": diff,
        "low": diff - half,
        "high": diff + half,
        "clears": diff - half > 0,
        "seeds": len(runs),
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
            row["compared"] = compared(units, task, choice, lr)
        rows.append(row)
    return rows


def compared(
    units: dict, task: str, choice: dict[str, Any], full_lr: float
) -> dict[str, Any] | None:
    """Return the chosen onboarding configuration against full fine-tuning at ``full_lr``
    on ``task``'s reported split, over the seeds where both finished (None: no such seed):
    mean scores, the ratio with its 95% interval (paired bootstrap over examples, the seeds
    resampled together), whether it meets :data:`TASK_GOAL` or is within noise of it, each
    seed's branch, and the cost: the search's units' wall hours over the full unit's (an
    upper bound on onboarding's: the units distil students of every teacher, onboarding only
    the best's)."""
    metric = metric_of(units, task)
    config = (tuple(choice["search"]), choice["teacher_lr"], choice["tolerance"])
    seeds, pairs, runs = [], [], []
    for seed in p.SEEDS:
        full = units.get((task, p.Unit(task, "full", full_lr, seed).name))
        row = served(units, task, seed, *config)
        if full is None or row is None or metric is None:
            continue
        ref = full["runs"][0]
        searched = [p.Unit(task, "branch", choice["teacher_lr"], seed, d) for d in config[0]]
        branch_hours = sum(units[(task, u.name)]["hours"] for u in searched)
        # A collapsed branch predicted nothing; it scores 0.
        predictions = None if row.get("collapsed") else row["reported"]["predictions"]
        pairs.append((predictions, ref["reported"]["predictions"]))
        runs.append(ref)
        seeds.append(
            {
                "seed": seed,
                "full": ref["reported"]["metrics"][metric],
                "served": score(row, metric),
                "fork": row.get("fork_depth"),
                "layers": row.get("layers", 0),
                "trunk_layers": ref["layers_per_request"],
                "cost": branch_hours / full["hours"],
            }
        )
    if not seeds:
        return None
    full, mean = (statistics.fmean(s[k] for s in seeds) for k in ("full", "served"))
    half = Z95 * scores.mean_difference_se(metric, pairs, references_of(runs))
    out = {"seeds": seeds, "full": full, "served": mean, "ratio": mean / full}
    out["cost"] = statistics.fmean(s["cost"] for s in seeds)
    out |= {"low": (mean - half) / full, "high": (mean + half) / full}
    out["ok"] = out["ratio"] >= TASK_GOAL or out["high"] >= TASK_GOAL
    return out


def verdict(rows: Sequence[dict[str, Any]], fold: str, tasks: Sequence[str]) -> dict[str, Any]:
    """Return a fold's verdict on the goal from its task rows (:func:`task_rows`): mean and
    lowest ratio, every task at :data:`TASK_GOAL` or within noise, the bundle's layers per
    request over one model per task (mean over the seeds every task has), full fine-tuning
    clear of the majority floor on every task; ``complete`` when every task is in on every
    seed (``runs`` of ``of_runs`` task-seeds compared)."""
    done = [r for r in rows if r["fold"] == fold and r.get("compared")]
    out: dict[str, Any] = {"fold": fold, "tasks": len(done), "of": len(tasks)}
    out["runs"] = sum(len(r["compared"]["seeds"]) for r in done)
    out["of_runs"] = len(tasks) * len(p.SEEDS)
    out["complete"] = out["runs"] == out["of_runs"]
    if not done:
        return out
    ratios = {r["task"]: r["compared"]["ratio"] for r in done}
    lowest = min(ratios, key=ratios.__getitem__)
    out |= {"mean": statistics.fmean(ratios.values()), "lowest": [lowest, ratios[lowest]]}
    out["every_task"] = all(r["compared"]["ok"] for r in done)
    out["cost"] = statistics.fmean(r["compared"]["cost"] for r in done)
    below = [r["task"] for r in done if r["floor"] is None or not r["floor"]["clears"]]
    out["floors"] = not below
    # A ratio to a full fine-tuning that does not clear its floor says little: the mean
    # without those tasks is shown beside the mean (the goal still counts them).
    above = [ratios[t] for t in ratios if t not in below]
    out["below_floor"] = below
    out["mean_above_floor"] = statistics.fmean(above) if below and above else None
    shares = []
    for seed in p.SEEDS:
        parts = [s for r in done for s in r["compared"]["seeds"] if s["seed"] == seed]
        if len(parts) == len(done):  # a bundle of every task: trunk to the deepest fork
            layers = max(s["fork"] or 0 for s in parts) + sum(s["layers"] for s in parts)
            shares.append(layers / sum(s["trunk_layers"] for s in parts))
    out["layer_share"] = statistics.fmean(shares) if shares else None
    out["meets_so_far"] = bool(
        out["mean"] >= p.GOAL
        and out["every_task"]
        and out["floors"]
        and shares
        and out["layer_share"] <= LAYER_GOAL
    )
    out["met"] = out["complete"] and out["meets_so_far"]
    return out


def hours(units: dict) -> dict[str, float]:
    """Return the hours of finished units by fold and method."""
    out: dict[str, float] = {}
    for (task, name), unit in units.items():
        fold = "choose" if task in p.CHOOSING else "judge"
        key = f"{fold}/{name.split('-')[0]}"
        out[key] = out.get(key, 0.0) + unit["hours"]
    return out


def precisions(units: dict) -> dict[str, dict[str, int]]:
    """Return, per precision the finished units trained at, how many units of each task and
    method ("mrpc full"): it follows the machine a unit ran on (:func:`protocol.precision`)."""
    out: dict[str, dict[str, int]] = {}
    for (task, name), unit in sorted(units.items()):
        kind = f"{task} {name.split('-')[0]}"
        counts = out.setdefault(unit["precision"], {})
        counts[kind] = counts.get(kind, 0) + 1
    return out


def precision_line(found: dict[str, dict[str, int]]) -> str:
    """Return the report's line on precisions: each one's unit count, and which units ran at
    any but the most common one."""
    if not found:
        return "Units by precision: no unit has finished"
    totals = {k: sum(v.values()) for k, v in found.items()}
    common = max(totals, key=totals.__getitem__)
    parts = []
    for name in sorted(found, key=lambda k: -totals[k]):
        detail = ", ".join(f"{kind} {n}" for kind, n in found[name].items())
        parts.append(f"{name} {totals[name]}" + ("" if name == common else f" ({detail})"))
    return "Units by precision (the machine's: bf16 where the CPU has it): " + "; ".join(parts)


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
        precision_line(report["precisions"]) + ".",
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
    lines += comparison_markdown(report)
    return "\n".join([*lines, *units_markdown(report["units"])]) + "\n"


def comparison_markdown(report: dict[str, Any]) -> list[str]:
    """Return the chosen configuration against full fine-tuning per task, and each fold's
    verdict on the goal (nothing before the choice is made)."""
    choice = report["choice"]
    if choice["search"] is None:
        return []
    depths = ",".join(map(str, choice["search"]))
    lines = ["", "## The choice against full fine-tuning", ""]
    lines.append(
        f"Full fine-tuning at lr {choice['full_lr']:g}; onboarding with teachers L in {depths} "
        f"at lr {choice['teacher_lr']:g}, tolerance {choice['tolerance']} (students at "
        "onboarding's default rate). Scores on the reported split, mean over seeds; 95% "
        "intervals from a paired bootstrap over its examples, every seed on the same resample. "
        "Branch: fork depth + branch layers, per seed. Cost: the search's units' wall hours "
        "over the full unit's, mean over seeds (an upper bound: the units distil students of "
        "every teacher, `mtreg onboard` only of the best one; bench/onboarding.py measures "
        "onboarding)."
    )
    lines += ["", "| task | fold | full FT | onboarded | % of full [95%] | branch | ≥ 98% | cost |"]
    lines += ["|---|---|---:|---:|---:|---|---|---:|"]
    for r in report["tasks"]:
        c = r.get("compared")
        if not c:
            continue
        branch = ", ".join(
            "collapsed" if s["fork"] is None else f"{s['fork']}+{s['layers']}" for s in c["seeds"]
        )
        ok = "yes" if c["ratio"] >= TASK_GOAL else "within noise" if c["ok"] else "no"
        lines.append(
            f"| {r['task']} | {r['fold']} | {100 * c['full']:.1f} | {100 * c['served']:.1f} | "
            f"{100 * c['ratio']:.1f}% [{100 * c['low']:.1f}, {100 * c['high']:.1f}] | "
            f"{branch} | {ok} | {c['cost']:.2f}× |"
        )
    return [*lines, "", *(f"- {verdict_line(v)}" for v in report["verdicts"])]


def verdict_line(v: dict[str, Any]) -> str:
    """Return a fold's verdict (:func:`verdict`) as one sentence."""
    head = f"**{v['fold']}** ({v['tasks']} of {v['of']} tasks)"
    if not v["tasks"]:
        return f"{head}: no task compared yet."
    share = "–" if v["layer_share"] is None else f"{100 * v['layer_share']:.0f}%"
    state = "met" if v["meets_so_far"] else "not met"
    if not v["complete"]:
        state = f"open ({v['runs']} of {v['of_runs']} task-seeds in); so far {state}"
    task, lowest = v["lowest"]
    return (
        f"{head}: mean {100 * v['mean']:.1f}% of full fine-tuning (lowest: {task}, "
        f"{100 * lowest:.1f}%); every task ≥ 98% or within noise: "
        f"{'yes' if v['every_task'] else 'no'}; bundle layers per request over one model per "
        f"task: {share}; full fine-tuning clears the majority floor on every task: "
        f"{'yes' if v['floors'] else 'no'}{without(v)}; the search's units took "
        f"{v['cost']:.2f}× the full units' wall time. Goal (mean ≥ {100 * p.GOAL:.1f}%, every task "
        f"≥ {100 * TASK_GOAL:.0f}%, ≤ {100 * LAYER_GOAL:.0f}% of the layers, floors "
        f"cleared): {state}."
    )


def without(v: dict[str, Any]) -> str:
    """Return the clause naming the tasks below their floor and the mean without them."""
    if not v.get("below_floor"):
        return ""
    named = ", ".join(v["below_floor"])
    if v.get("mean_above_floor") is None:
        return f" (not on {named})"
    them = "them" if len(v["below_floor"]) > 1 else "it"
    return f" (not on {named}; mean without {them}: {100 * v['mean_above_floor']:.1f}%)"


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
        "precisions": precisions(units),
        "tasks": task_rows(units, choice),
        "units": unit_rows(units),
    }
    report["verdicts"] = [
        verdict(report["tasks"], "choose", p.CHOOSING),
        verdict(report["tasks"], "judge", p.JUDGING),
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{STEM}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (out / f"{STEM}.md").write_text(markdown(report))
    if any(r["floor"] for r in report["tasks"]):
        figure(report, out / f"{STEM}.png")
    return report
