"""Students' learning rate on the choosing tasks (issue #22): a diagnosis, then the
protocol's rule applied to the students' rate as a second stage of its choice.

The protocol (bench/protocol.py) fixed the student rate at onboarding's default (5e-4)
before choosing, and never searched it. On its judging tasks no 1- or 2-layer student of
SST-2's 3-layer teacher came within 99% of it, so the teacher was served and the bundle
kept 36% of the layers. This script asks the same question on the choosing tasks only
(CoLA, MRPC, STS-B), where a choice may look.

*Diagnosis.* The protocol's chosen teacher (3 layers at 2e-4, the product's defaults
otherwise), then its students of 1 and 2 layers at each rate of ``STUDENT_LRS``, every run
scored on dev: each student as a share of its teacher, and per rate how many come within
the 0.99 tolerance.

*Second stage.* The same for every teacher depth the protocol chose (2 and 3), so
that each student rate set (each non-empty subset of ``STUDENT_LRS``) composes into the
branch ``mtreg onboard`` would serve, with the protocol's choice otherwise; its ratio to
full fine-tuning and layers per request are computed as the protocol's own table
(:func:`protocol_choice.config_row`), and its rule picks among the sets that fit the
onboarding budget (:func:`protocol.within_budget`). Every teacher and every 5e-4 student
here retrains a run of the protocol's units; the report checks they score the same.

    python bench/students.py --run [--seeds 0 1] [--until HH:MM]   # resumable units
    python bench/students.py --report

Units are kept under bench/results/students/TASK/ as they finish (runners side by side
take different units, as in bench/protocol.py); the report is bench/results/students.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import protocol  # noqa: E402  (bench/ is not a package)
import protocol_choice  # noqa: E402

ROOT = HERE / "results" / "students"
WORK = protocol.WORK.parent / "students"
STUDENT_LRS = (1e-4, 2e-4, 5e-4)
TEACHER_LR = 2e-4
TEACHER_LAYERS = 3
TOLERANCE = 0.99


class StudentRunner(protocol.Runner):
    """The protocol's runner, with every student trained at each of :data:`STUDENT_LRS`."""

    def settings(self, unit: protocol.Unit) -> Any:
        """Return the protocol's settings of ``unit`` with the students' rates searched."""
        return replace(super().settings(unit), student_lrs=STUDENT_LRS)


def units(
    seeds: tuple[int, ...], search: tuple[int, ...] = (TEACHER_LAYERS,)
) -> list[protocol.Unit]:
    """Return one unit per choosing task, seed and teacher depth of ``search`` (default:
    the diagnosis's teacher): the teacher and its students."""
    return [
        protocol.Unit(task, "branch", TEACHER_LR, seed, layers)
        for layers in search
        for seed in seeds
        for task in protocol.CHOOSING
    ]


def rows(root: Path = ROOT) -> list[dict[str, Any]]:
    """Return a row per student of the diagnosis's finished units (teacher of
    :data:`TEACHER_LAYERS`): task, seed, l, rate, dev score, epochs (best/run) and the
    student's share of its teacher's dev score."""
    out = []
    for unit in protocol_choice.load(root).values():
        if unit["unit"]["layers"] != TEACHER_LAYERS:
            continue
        metric = unit["metric"]
        teacher = next(r for r in unit["runs"] if r["stage"] == "teacher")
        base = teacher["reported"]["metrics"][metric]
        for run in unit["runs"]:
            if run["stage"] != "student":
                continue
            score = run["reported"]["metrics"][metric]
            out.append(
                {
                    "task": unit["unit"]["task"],
                    "seed": unit["unit"]["seed"],
                    "teacher": base,
                    "layers": run["layers"],
                    "lr": run["lr"],
                    "score": score,
                    "epochs": f"{run['best_epoch']}/{run['epochs_run']}",
                    "share": score / base if base else None,
                }
            )
    return out


def summary(found: list[dict[str, Any]], group: str = "layers") -> list[dict[str, Any]]:
    """Return per (``group``, rate), ``group`` a key of the rows (the students' layers
    here, the loss in bench/hidden_distill.py): the mean share of the teacher over units
    and how many units' students come within :data:`TOLERANCE` of their teacher; then per
    ``group`` the same for the best of the rates in each unit (``lr`` None), as onboarding
    searching every rate would keep it (the best student on dev)."""
    out = []
    for value, lr in sorted({(r[group], r["lr"]) for r in found}):
        shares = [r["share"] for r in found if (r[group], r["lr"]) == (value, lr)]
        out.append(_shares_row(group, value, lr, shares))
    for value in sorted({r[group] for r in found}):
        best: dict[tuple[str, int], float] = {}
        for r in found:
            if r[group] == value and r["share"] is not None:
                unit = (r["task"], r["seed"])
                best[unit] = max(best.get(unit, r["share"]), r["share"])
        out.append(_shares_row(group, value, None, list(best.values())))
    return out


def _shares_row(group: str, value: Any, lr: float | None, shares: list[Any]) -> dict[str, Any]:
    known = [s for s in shares if s is not None]
    return {
        group: value,
        "lr": lr,
        "mean_share": statistics.fmean(known) if known else None,
        "within": sum(s >= TOLERANCE for s in known),
        "units": len(known),
    }


def rate(lr: float | None) -> str:
    """Return a summary row's rate as the reports print it."""
    return "best of the rates" if lr is None else f"{lr:g}"


def rate_sets() -> list[tuple[float, ...]]:
    """Return every non-empty subset of :data:`STUDENT_LRS`, fewest rates first."""
    sizes = range(1, len(STUDENT_LRS) + 1)
    return [c for n in sizes for c in itertools.combinations(STUDENT_LRS, n)]


def composed(root: Path = ROOT, protocol_root: Path = protocol.UNITS) -> dict[str, Any]:
    """Return the second stage: per student rate set, the protocol's table row
    (:func:`protocol_choice.config_row` over the choosing tasks, with the protocol's chosen
    full fine-tuning rate, teacher depths, teacher rate and tolerance; branch units from
    ``root``, full ones from ``protocol_root``) and whether it fits the onboarding budget;
    ``chosen``: the rate set the protocol's rule picks among those that fit, and among all
    (None while a unit is missing)."""
    choice = protocol_choice.choose(protocol_root)
    full = {
        k: u for k, u in protocol_choice.load(protocol_root).items() if k[1].startswith("full-")
    }
    units = full | protocol_choice.load(root)  # every branch unit retrained here
    config = (tuple(choice["search"]), choice["teacher_lr"], choice["tolerance"])
    full_lr = {task: choice["full_lr"] for task in protocol.CHOOSING}
    table = []
    for lrs in rate_sets():
        row = protocol_choice.config_row(units, protocol.CHOOSING, config, full_lr, lrs)
        row |= {"student_lrs": list(lrs), "budget": protocol.within_budget(config[0], len(lrs))}
        table.append(row)
    cells = len(protocol.CHOOSING) * len(protocol.SEEDS)
    every = table if all(r["cells"] == cells for r in table) else []  # no choice before
    fits = [r for r in every if r["budget"]]
    return {
        "config": {"search": list(config[0]), "teacher_lr": config[1], "tolerance": config[2]},
        "full_lr": choice["full_lr"],
        "rows": table,
        "chosen": (protocol_choice.pick(fits) or {}).get("student_lrs"),
        "chosen_ignoring_budget": (protocol_choice.pick(every) or {}).get("student_lrs"),
    }


def unreproduced(root: Path = ROOT, protocol_root: Path = protocol.UNITS) -> list[str]:
    """Return "<task> <unit>: <run>" for each run of a protocol unit whose retrained copy
    here (same stage, depth, size and rate) scores otherwise on dev, or is missing; where
    the two units trained at different precisions, it says which (a difference is expected
    there)."""
    ours, theirs = protocol_choice.load(root), protocol_choice.load(protocol_root)
    out = []
    for (task, name), unit in ours.items():
        kept = {_run_id(r): r["dev_metrics"] for r in unit["runs"]}
        other = theirs.get((task, name), {})
        precisions = other.get("precision"), unit.get("precision")
        why = "" if precisions[0] == precisions[1] else " ({} there, {} here)".format(*precisions)
        for run in other.get("runs", []):
            if kept.get(_run_id(run)) != run["dev_metrics"]:
                stage, depth, layers, lr = _run_id(run)
                out.append(f"{task} {name}: {stage} k{depth} l{layers} lr{lr:g}{why}")
    return out


def _run_id(run: dict[str, Any]) -> tuple[str, int, int, float]:
    return run["stage"], run["fork_depth"], run["layers"], run["lr"]


def report(root: Path = ROOT) -> str:
    """Write bench/results/students.{md,json} from the finished units; return the markdown."""
    found = rows(root)
    summed = summary(found)
    lines = ["# Students' learning rate on the choosing tasks (bench/students.py)", ""]
    lines += [
        f"The diagnosis. Teacher: {TEACHER_LAYERS} layers at {TEACHER_LR:g} (fork depth 3 of "
        f"MiniLM-L6), the protocol's settings otherwise; students of 1 and 2 layers at each "
        f"rate; dev scores (x100). The protocol's own students trained at 5e-4 only. The "
        f"second stage, at the end, adds the 2-layer teacher's students and chooses.",
        "",
    ]
    lines += tables(found, summed, "layers", "l", "---:")
    stage = composed(root)
    lines += ["", *stage_lines(stage, unreproduced(root))]
    data = {"summary": summed, "rows": found, "student_lrs": list(STUDENT_LRS)}
    data |= {"second_stage": stage}
    return write_report(HERE / "results" / "students", lines, data)


def stage_lines(stage: dict[str, Any], differ: list[str]) -> list[str]:
    """Return the second stage's markdown: its table, the rule's pick, the reproduction."""
    config = stage["config"]
    lines = [
        "## Second stage: the students' rate set, by the protocol's rule",
        "",
        f"The protocol's choice otherwise: teachers L in {config['search']} at "
        f"{config['teacher_lr']:g}, tolerance {config['tolerance']}, against full fine-tuning "
        f"at {stage['full_lr']:g}; choosing tasks, mean over seeds then tasks. Budget: "
        f"layers trained per epoch at most {protocol.ONBOARD_BUDGET:g}× one full "
        "fine-tuning's (bench/protocol.py, `within_budget`).",
        "",
        "| student lrs | fits the budget | % of full | layers/request | cells |",
        "|---|---|---:|---:|---:|",
    ]
    for r in stage["rows"]:
        ratio = "–" if r["ratio"] is None else f"{100 * r['ratio']:.1f}%"
        layers = "–" if r["layers"] is None else f"{r['layers']:.2f}"
        fits = "yes" if r["budget"] else "no"
        rates = ", ".join(f"{lr:g}" for lr in r["student_lrs"])
        lines.append(f"| {rates} | {fits} | {ratio} | {layers} | {r['cells']} |")

    def named(rates: list[float] | None) -> str:
        return "– (units missing)" if rates is None else ", ".join(f"{lr:g}" for lr in rates)

    lines += [
        "",
        f"- The rule picks, among the sets that fit the budget: **{named(stage['chosen'])}**.",
        f"- Among every set, budget aside: {named(stage['chosen_ignoring_budget'])}.",
        "- The protocol's runs retrained here score the same on dev: "
        + ("yes, every one." if not differ else f"**no**: {'; '.join(differ)}."),
    ]
    return lines


def tables(
    found: list[dict[str, Any]], summed: list[dict[str, Any]], group: str, header: str, align: str
) -> list[str]:
    """Return a diagnosis report's two markdown tables: the :func:`summary` rows, then one
    row per run; the ``group`` column is headed ``header`` and aligned by ``align``."""
    lines = [
        f"| {header} | student lr | mean % of teacher | within {TOLERANCE} | units |",
        f"|{align}|---:|---:|---:|---:|",
    ]
    for s in summed:
        mean = "–" if s["mean_share"] is None else f"{100 * s['mean_share']:.1f}%"
        lines.append(f"| {s[group]} | {rate(s['lr'])} | {mean} | {s['within']} | {s['units']} |")
    lines += ["", f"| task | seed | teacher | {header} | lr | student | epochs | % of teacher |"]
    lines += [f"|---|---:|---:|{align}|---:|---:|---|---:|"]
    for r in found:
        share = "–" if r["share"] is None else f"{100 * r['share']:.1f}%"
        lines.append(
            f"| {r['task']} | {r['seed']} | {100 * r['teacher']:.1f} | {r[group]} | "
            f"{r['lr']:g} | {100 * r['score']:.1f} | {r['epochs']} | {share} |"
        )
    return lines


def write_report(stem: Path, lines: list[str], data: dict[str, Any]) -> str:
    """Write ``lines`` to ``stem``.md and ``data`` to ``stem``.json; return the markdown."""
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return text


def command(
    doc: str,
    run: Callable[[tuple[int, ...], float | None], object],
    report: Callable[[], str],
    argv: list[str] | None = None,
) -> None:
    """The command line of a diagnosis (this one, bench/hidden_distill.py): ``--run``
    calls ``run(seeds, until)`` (``until`` in epoch seconds or None) on ``--threads``
    torch threads, ``--report`` prints ``report()``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the unfinished units")
    parser.add_argument("--report", action="store_true", help="write the report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds [0]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument(
        "--until",
        type=protocol.until_seconds,
        help="HH:MM (UTC): start no unit expected to end later",
    )
    args = parser.parse_args(argv)
    if args.run:
        import torch

        torch.set_num_threads(args.threads)
        run(tuple(args.seeds), args.until)
    if args.report:
        print(report())
    if not (args.run or args.report):
        parser.error("give --run or --report")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line; run units and/or write the report."""

    def run(seeds: tuple[int, ...], until: float | None) -> None:
        search = tuple(protocol_choice.choose(protocol.UNITS)["search"])  # both stages
        protocol.run_units(units(seeds, search), StudentRunner(WORK), ROOT, until)

    command(__doc__, run, report, argv)


if __name__ == "__main__":
    main()
