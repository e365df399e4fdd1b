"""Students' learning rate on the choosing tasks: a diagnosis for the quality protocol's
next round (issue #22), not a choice.

The protocol (bench/protocol.py) fixed the student rate at onboarding's default (5e-4)
before choosing, and never searched it. On its judging tasks no 1- or 2-layer student of
SST-2's 3-layer teacher came within 99% of it, so the teacher was served and the bundle
kept 36% of the layers. This script asks the same question on the choosing tasks only
(CoLA, MRPC, STS-B), where a choice may look: the protocol's chosen teacher (3 layers at
2e-4, the product's defaults otherwise), then its students of 1 and 2 layers at each rate
of ``STUDENT_LRS``, every run scored on dev. Reported: each student as a share of its
teacher, and per rate how many come within the 0.99 tolerance.

    python bench/students.py --run [--seeds 0 1] [--until HH:MM]   # resumable units
    python bench/students.py --report

Units are kept under bench/results/students/TASK/ as they finish (runners side by side
take different units, as in bench/protocol.py); the report is bench/results/students.{md,json}.
"""

from __future__ import annotations

import argparse
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


def units(seeds: tuple[int, ...]) -> list[protocol.Unit]:
    """Return one unit per choosing task and seed: the chosen teacher and its students."""
    return [
        protocol.Unit(task, "branch", TEACHER_LR, seed, TEACHER_LAYERS)
        for seed in seeds
        for task in protocol.CHOOSING
    ]


def rows(root: Path = ROOT) -> list[dict[str, Any]]:
    """Return a row per finished unit and student: task, seed, l, rate, dev score, epochs
    (best/run) and the student's share of its teacher's dev score."""
    out = []
    for unit in protocol_choice.load(root).values():
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


def report(root: Path = ROOT) -> str:
    """Write bench/results/students.{md,json} from the finished units; return the markdown."""
    found = rows(root)
    summed = summary(found)
    lines = ["# Students' learning rate on the choosing tasks (bench/students.py)", ""]
    lines += [
        f"Teacher: {TEACHER_LAYERS} layers at {TEACHER_LR:g} (fork depth 3 of MiniLM-L6), the "
        f"protocol's settings otherwise; students of 1 and 2 layers at each rate; dev scores "
        f"(x100). A diagnosis for the protocol's next round: the protocol's own students "
        f"trained at 5e-4 only.",
        "",
    ]
    lines += tables(found, summed, "layers", "l", "---:")
    data = {"summary": summed, "rows": found, "student_lrs": list(STUDENT_LRS)}
    return write_report(HERE / "results" / "students", lines, data)


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
        protocol.run_units(units(seeds), StudentRunner(WORK), ROOT, until)

    command(__doc__, run, report, argv)


if __name__ == "__main__":
    main()
