"""The report of bench/quality.py (bench/results/quality.{json,md,png}), rebuilt from
whatever units exist: per task the served branch against full fine-tuning with its noise,
every metric, the constant-predictor floor, the variants, the settings and what is missing."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import quality_units as qu
from quality_serving import serving_table, without_times
from quality_units import best_full, first_metric, full_runs, read_json, unit_path, write_json
from scores import majority, paired_bootstrap_se


def reported_split(task: str) -> str:
    """Return the split a task's numbers are reported on: test for the intent sets (which
    select on dev), dev for GLUE."""
    return "test" if task in qu.TEST_TASKS else "dev"


def task_seeds(task: str, seeds: Sequence[int]) -> Sequence[int]:
    """Return the seeds a task is reported over: all of ``seeds`` for the small tasks, else
    seed 0."""
    return seeds if task in qu.SMALL else (0,)


def bundle_entry(units: Path, task: str, seed: int, variant: str = "") -> dict[str, Any] | None:
    """Return ``task``'s scores in the seed's (or variant's) bundle unit, or None."""
    return (read_json(units / f"bundle-seed{seed}{variant}.json") or {}).get("tasks", {}).get(task)


def onboarded(rows: Sequence[Any]) -> list[Any]:
    """Return the rows of tasks that have a served branch (a geometry)."""
    return [r for r in rows if r.branch_layers or r.fork_depth]


def task_row(
    units: Path, task: str, seeds: Sequence[int], variant: str = ""
) -> tuple[Any, list[str]]:
    """Return the report row of ``task`` (onboarded as ``variant``) from the cached units,
    and what is missing."""
    from mtreg.cli.reporting import TaskQuality, mean

    split = reported_split(task)
    missing: list[str] = []
    full, full_dev, served, teacher = [], [], [], []
    geometry: dict[str, Any] = {}
    metric = None
    first_pair = None
    for seed in task_seeds(task, seeds):
        best = best_full(units, task, seed)
        onboard = read_json(unit_path(units, task, seed, f"onboard{variant}"))
        entry = bundle_entry(units, task, seed, variant)
        if best is None:
            missing.append(f"{task} seed {seed} full fine-tuning")
        if onboard is None:
            missing.append(f"{task} seed {seed} onboard{variant}")
        elif entry is None:
            missing.append(f"{task} seed {seed}{variant} bundle score")
        if best is not None:
            metric = metric or first_metric(task)
            full.append(best[split]["metrics"][metric])
            full_dev.append(best["dev"]["metrics"][metric])
        if onboard is not None:
            metric = metric or onboard["metric"]
            teacher.append(onboard["teacher"]["dev_metrics"][metric])
            if seed == 0:
                geometry = {
                    "fork_depth": onboard["chosen"]["fork_depth"],
                    "branch_layers": onboard["chosen"]["layers"],
                    "teacher_layers": onboard["teacher"]["layers"],
                }
        if entry is not None and metric is not None:
            served.append(entry[split]["metrics"][metric])
            if seed == 0 and best is not None:
                first_pair = (entry[split], best[split])
    row = TaskQuality(
        task=task,
        metric=metric or "?",
        split=split,
        fork_depth=geometry.get("fork_depth", 0),
        branch_layers=geometry.get("branch_layers", 0),
        teacher_layers=geometry.get("teacher_layers"),
        served=served,
        teacher=teacher,
        full=full,
        teacher_ratio=mean(teacher) / mean(full_dev) if teacher and mean(full_dev or [0]) else None,
    )
    if len(served) > 1 and len(full) > 1:
        # Several seeds: the standard error of the difference of the two means.
        row.noise = math.sqrt(
            statistics.variance(served) / len(served) + statistics.variance(full) / len(full)
        )
    elif first_pair is not None and metric is not None:
        a, b = first_pair
        if a["references"] == b["references"]:
            row.noise = paired_bootstrap_se(
                metric, a["predictions"], b["predictions"], a["references"]
            )
    if not geometry:
        row.note = "(not onboarded yet)"
    return row, missing


def every_metric(units: Path, task: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Return every metric of ``task``'s plugin (GLUE's official pair for MRPC, QQP and
    STS-B) on the reported split: ``{"split", "metrics": {name: {"full": [...], "served":
    [...]}}}``, one value per seed that has it."""
    split = reported_split(task)
    metrics: dict[str, dict[str, list[float]]] = {}
    for seed in task_seeds(task, seeds):
        best = best_full(units, task, seed)
        entry = bundle_entry(units, task, seed)
        for method, found in (("full", best), ("served", entry)):
            for name, value in (found[split]["metrics"] if found else {}).items():
                metrics.setdefault(name, {"full": [], "served": []})[method].append(value)
    return {"split": split, "metrics": metrics}


def floor_row(units: Path, task: str) -> dict[str, Any] | None:
    """Return seed 0 of ``task`` against the constant predictor (:func:`majority`): its
    score, full fine-tuning's margin over it with the paired bootstrap SE, whether full
    fine-tuning clears it by more than 2 SE (``learned``), and the share of that margin the
    served branch keeps; None before full fine-tuning has run."""
    from mtreg.training.metrics import evaluate

    best = best_full(units, task, 0)
    if best is None:
        return None
    split = reported_split(task)
    metric = first_metric(task)
    references = best[split]["references"]
    constant = majority(references)
    floor = evaluate([metric], constant, references)[metric]
    full = best[split]["metrics"][metric]
    se = paired_bootstrap_se(metric, best[split]["predictions"], constant, references)
    row: dict[str, Any] = {
        "metric": metric,
        "split": split,
        "majority": floor,
        "full": full,
        "se": se,
        "learned": full - floor > 2 * se,
        "served": None,
        "gain_kept": None,
    }
    entry = bundle_entry(units, task, 0)
    if entry is not None:
        row["served"] = entry[split]["metrics"][metric]
        if full > floor:
            row["gain_kept"] = (row["served"] - floor) / (full - floor)
    return row


def build_report(units: Path, tasks: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Return the whole report (rows, overall, serving, baseline, missing) from the units."""
    from mtreg.cli.reporting import summary

    rows, missing = [], []
    for task in tasks:
        row, gaps = task_row(units, task, seeds)
        rows.append(row)
        missing += gaps
    overall = summary(onboarded(rows), 6)
    overall["tasks_planned"] = len(rows)
    serving = read_json(units / "serving.json")
    baseline = {}
    for task in tasks:
        metric = first_metric(task)
        values = [
            b["dev"]["metrics"][metric]
            for seed in task_seeds(task, seeds)
            if (b := best_full(units, task, seed)) is not None
        ]
        if values:
            baseline[task] = {"metric": metric, "split": "dev", "full": values}
    if serving is None:
        missing.append("serving cost")
    variants = {}
    for variant in qu.VARIANTS:  # run only when asked: missing once started (per seed)
        started = [0] + [
            seed
            for seed in seeds
            if seed != 0
            and any(unit_path(units, t, seed, f"onboard{variant.suffix}").exists() for t in tasks)
        ]
        found, gaps = [], []
        for task in tasks:
            row, task_gaps = task_row(units, task, started, variant.suffix)
            found.append(row)
            gaps += [m for m in task_gaps if variant.suffix in m]
        if onboarded(found):
            missing += gaps
        variants[variant.name] = {
            "title": variant.title,
            "about": variant.about,
            "seeds": started,
            "serving": without_times(read_json(units / f"serving{variant.suffix}.json")),
            "rows": [r.to_dict() for r in found],
            "overall": summary(onboarded(found), 6),
        }
    default0 = [task_row(units, task, (0,))[0] for task in tasks]
    floors = {task: row for task in tasks if (row := floor_row(units, task)) is not None}
    learned = [
        r.ratio for r in rows if r.ratio is not None and floors.get(r.task, {}).get("learned")
    ]
    overall["mean_ratio_learned"] = statistics.fmean(learned) if learned else None
    overall["tasks_learned"] = len(learned)
    return {
        "rows": [r.to_dict() for r in rows],
        "overall": overall,
        "serving": without_times(serving),
        "baseline": baseline,
        "floor": floors,
        "variants": variants,
        "default_seed0": summary(onboarded(default0), 6),
        "every_metric": {task: every_metric(units, task, seeds) for task in tasks},
        "missing": missing,
        "settings": {
            "tasks": qu.TASKS,
            "lrs": list(qu.LRS),
            "epochs": qu.EPOCHS,
            "patience": qu.PATIENCE,
            "teacher_layers": list(qu.TEACHER_LAYERS),
            "student_lrs": list(qu.STUDENT_LRS),
            "seeds_small_tasks": list(seeds),
            "small_tasks": list(qu.SMALL),
            "precision": qu.PRECISION,
        },
        "compute_hours": compute_hours(units, tasks, seeds),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def compute_hours(units: Path, tasks: Sequence[str], seeds: Sequence[int]) -> dict[str, float]:
    """Return the training time of the main run's units in process-hours, as if run from
    scratch: seed 0's full fine-tuning search, seed 0's onboarding, the extra seeds, and
    their total. An onboarding counts every run of its search at the time it took when it
    trained (a resumed run too: onboarding again after a change of the grid resumes the
    runs it shares), plus its own invocation's overhead (caching, scoring)."""
    hours = {"full_search_seed0": 0.0, "onboard_search_seed0": 0.0, "extra_seeds": 0.0}
    for task in tasks:
        for seed in task_seeds(task, seeds):
            seconds = {
                "full": sum(data["seconds"] for data in full_runs(units, task, seed)),
                "onboard": 0.0,
            }
            if onboard := read_json(unit_path(units, task, seed, "onboard")):
                overhead = onboard["wall_s"] - onboard["budget"]["train_seconds"]
                seconds["onboard"] = sum(r["seconds"] for r in onboard["runs"]) + overhead
            for method, value in seconds.items():
                phase = "extra_seeds" if seed else f"{method}_search_seed0"
                hours[phase] += value / 3600
    hours["total"] = sum(hours.values())
    return hours


def report_markdown(report: dict[str, Any]) -> str:
    """Return the markdown of a report."""
    from mtreg.cli.reporting import TaskQuality, markdown

    rows = [TaskQuality.from_dict(r) for r in report["rows"]]
    overall = report["overall"]
    lines = [
        "# Quality and serving cost against full fine-tuning (bench/quality.py)",
        "",
        f"Trunk all-MiniLM-L6-v2 (6 layers). Written {report['written']} on "
        f"{report['machine']}. Scores in % (×100); `mean ± std (seeds)` for the small tasks. "
        "Full FT: the whole model fine-tuned, best of the lr search. Teacher: best partial "
        "run (dev, training-time). Served: the branch `mtreg onboard` chose, scored through "
        "`mtreg.load_bundle` on the merged bundle of all tasks; k = fork depth, l = branch "
        "layers. Noise: SE of served − full (seed spread where there are seeds, else a paired "
        "bootstrap over examples); within noise = |Δ| ≤ 2 SE.",
        "",
        markdown(rows, overall),
    ]
    if report.get("serving"):
        lines += ["## Serving cost (measured)", "", *serving_table(report["serving"])]
    lines += every_metric_markdown(report) + floor_markdown(report) + variants_markdown(report)
    s = report["settings"]
    lines += [
        "## Settings",
        "",
        f"Same search for both methods: lr {', '.join(f'{x:g}' for x in s['lrs'])}; up to "
        f"{s['epochs']} epochs, early stop after {s['patience']} without a better dev score; "
        f"teachers L in {s['teacher_layers']}, students l = 1..min(3, L-1) at lr "
        f"{', '.join(f'{x:g}' for x in s['student_lrs'])} for twice the epochs; "
        f"small tasks {', '.join(s['small_tasks'])} over seeds {s['seeds_small_tasks']} "
        "(seed 0 searches; later seeds rerun each method's chosen configuration). "
        f"Training in {s['precision']} (mixed precision; scoring and timing in fp32).",
        "",
        "Training time of the main run, in process-hours (one thread each): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in report["compute_hours"].items())
        + ".",
        "",
        "| task | train | dev | test | max length |",
        "|---|---:|---:|---:|---|",
    ]
    for task, cfg in s["tasks"].items():
        sizes = cfg.get("sizes", {})
        lines.append(
            f"| {task} | {sizes.get('train', 'all')} | {sizes.get('dev', 'all')} "
            f"| {sizes.get('test', 'all' if task in qu.TEST_TASKS else '–')} "
            f"| {cfg.get('max_length', 'plugin default')} |"
        )
    if report["missing"]:
        lines += ["", "## Missing (run not finished)", ""] + [f"* {m}" for m in report["missing"]]
    return "\n".join(lines) + "\n"


def every_metric_markdown(report: dict[str, Any]) -> list[str]:
    """Return the lines of the section listing every metric of every task."""
    from mtreg.cli.reporting import fmt

    lines = [
        "## Every metric",
        "",
        "| task | split | metric | full FT | served |",
        "|---|---|---|---:|---:|",
    ]
    for task, found in report.get("every_metric", {}).items():
        for name, values in found["metrics"].items():
            lines.append(
                f"| {task} | {found['split']} | {name} | {fmt(values['full'])} "
                f"| {fmt(values['served'])} |"
            )
    return [*lines, ""] if len(lines) > 4 else []


def variants_markdown(report: dict[str, Any]) -> list[str]:
    """Return the lines of one section per variant (:data:`VARIANTS`) that has onboarded
    tasks, each ending with the main run over the same seeds for comparison."""
    from mtreg.cli.reporting import TaskQuality, markdown

    lines: list[str] = []
    for variant in report.get("variants", {}).values():
        if not variant["overall"]["tasks"]:
            continue
        rows = [TaskQuality.from_dict(r) for r in variant["rows"]]
        seeds = variant.get("seeds", [0])
        if len(seeds) > 1:
            which = f"seeds {', '.join(map(str, seeds))} for the small tasks"
            main, main_which = report["overall"], "same seeds"
        else:
            which, main, main_which = "seed 0", report["default_seed0"], "seed 0 only"
        shown = "–" if main["mean_ratio"] is None else f"{100 * main['mean_ratio']:.1f}%"
        lines += [
            f"## {variant['title']}, {which}",
            "",
            f"{variant['about']} A bundle of its own, scored through `mtreg.load_bundle`.",
            "",
            markdown(rows, variant["overall"]),
            f"The main run, {main_which}: **{shown}** at {main['bundle_layers']} of "
            f"{main['full_layers']} layers ({100 * (main['layer_ratio'] or 0):.0f}%).",
            "",
        ]
        if variant.get("serving"):
            lines += ["Its serving cost, measured:", "", *serving_table(variant["serving"])]
    return lines


def floor_markdown(report: dict[str, Any]) -> list[str]:
    """Return the lines of the section that sets each comparison against the constant
    predictor (seed 0)."""
    floors = report.get("floor") or {}
    if not floors:
        return []
    pct = lambda value: "–" if value is None else f"{100 * value:.1f}"  # noqa: E731
    lines = [
        "## Above a constant predictor? (seed 0)",
        "",
        "Majority: always the split's most frequent label (per word for tagging; a constant "
        "has correlation 0). A ratio to full fine-tuning only means something where full "
        "fine-tuning clears this floor; gain kept = (served − majority) / (full − majority).",
        "",
        "| task | metric (split) | majority | full FT | full − majority (SE) | served "
        "| gain kept |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, f in floors.items():
        margin = f"{pct(f['full'] - f['majority'])} ({pct(f['se'])})"
        if not f["learned"]:
            margin += ", not above"
        kept = "–" if f["gain_kept"] is None else f"{100 * f['gain_kept']:.0f}%"
        lines.append(
            f"| {task} | {f['metric']} ({f['split']}) | {pct(f['majority'])} | {pct(f['full'])} "
            f"| {margin} | {pct(f['served'])} | {kept} |"
        )
    overall = report["overall"]
    flat = [task for task, f in floors.items() if not f["learned"]]
    lines.append("")
    if flat:
        lines.append(
            f"Full fine-tuning is not more than 2 SE above the constant predictor on "
            f"{', '.join(flat)}: there the ratio compares two models that learned little."
        )
    if overall.get("mean_ratio_learned") is not None:
        lines.append(
            f"Mean quality ratio over the {overall['tasks_learned']} tasks where it is: "
            f"**{100 * overall['mean_ratio_learned']:.1f}%**."
        )
    return [*lines, ""]


def write_report(units: Path, out: Path, tasks: Sequence[str], seeds: Sequence[int]) -> dict:
    """Write quality.json, quality.md and quality.png under ``out``; return the report."""
    from mtreg.cli.reporting import TaskQuality, figure

    report = build_report(units, tasks, seeds)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quality.json", report)
    (out / "quality.md").write_text(report_markdown(report))
    rows = onboarded([TaskQuality.from_dict(r) for r in report["rows"]])
    serving = report.get("serving") or {}
    title = "MiniLM-L6: mtreg bundle vs full fine-tuning"
    if serving:
        title += f" (measured throughput {serving['throughput_ratio']:.1f}× one model per task)"
    complete = [
        (name, v["overall"])  # the variants whose bundle has every task
        for name, v in report["variants"].items()
        if v["overall"]["tasks"] == report["overall"]["tasks_planned"]
    ]
    figure(rows, report["overall"], out / "quality.png", title, complete)
    return report
