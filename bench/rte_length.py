"""RTE's majority floor at its own max length: a diagnosis for issue #22's owner, not a
change of the protocol.

The protocol (bench/protocol.py) cut RTE from its own 256 tokens to 128 for cost, which
cuts the tail of 304 of its 2,490 training pairs. Full fine-tuning then reached 57.4 on dev
against 52.7 for the majority class, not clear of it at 95%, and the goal counts RTE. This
runs the same full fine-tuning units (the protocol's chosen rate, seeds, epoch rule and
runner) at 256 tokens, and reports both lengths against the floor. RTE stays a judging
task at 128 tokens in the protocol's report: a length chosen after seeing its result would
not be a judgment.

    python bench/rte_length.py --run [--seeds 0 1] [--until HH:MM]   # resumable units
    python bench/rte_length.py --report     # bench/results/rte_length.{md,json}
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import protocol  # noqa: E402  (bench/ is not a package)
import protocol_choice  # noqa: E402
import protocol_report  # noqa: E402
import students  # noqa: E402

ROOT = HERE / "results" / "rte_length"
WORK = protocol.WORK.parent / "rte-length"
TASK = "rte"
TASKS = {TASK: {}}  # no max_length override: the task's own (plugins/glue.py)


def full_lr(protocol_root: Path = protocol.UNITS) -> float:
    """Return the full fine-tuning rate the protocol chose."""
    return protocol_choice.choose(protocol_root)["full_lr"]


def units(seeds: tuple[int, ...], lr: float) -> list[protocol.Unit]:
    """Return RTE's full fine-tuning unit of each seed at ``lr``."""
    return [protocol.Unit(TASK, "full", lr, seed) for seed in seeds]


def compare(root: Path = ROOT, protocol_root: Path = protocol.UNITS) -> list[dict[str, Any]]:
    """Return full fine-tuning against the majority floor at each length: the protocol's
    units (128 tokens) and these (the task's own), as ``protocol_report.floor`` gives it
    (None where no seed finished), with the max length (None: unknown or mixed) and the
    seeds' dev scores."""
    lr = full_lr(protocol_root)
    out = []
    for where in (protocol_root, root):
        found = protocol_choice.load(where)
        runs = [u for u in (found.get((TASK, u.name)) for u in units(protocol.SEEDS, lr)) if u]
        scores = [u["runs"][0]["reported"]["metrics"][u["metric"]] for u in runs]
        # units from before the protocol recorded it ran at its RTE length
        lengths = {u.get("max_length", protocol.TASKS[TASK]["max_length"]) for u in runs}
        out.append(
            {
                "max_length": lengths.pop() if len(lengths) == 1 else None,
                "lr": lr,
                "scores": scores,
                "floor": protocol_report.floor(found, TASK, lr),
            }
        )
    return out


def report(root: Path = ROOT) -> str:
    """Write bench/results/rte_length.{md,json}; return the markdown."""
    rows = compare(root)
    lines = ["# RTE's majority floor at its own max length (bench/rte_length.py)", ""]
    lines += [
        f"Full fine-tuning of MiniLM-L6 on RTE's 2,490 training pairs at the protocol's rate "
        f"({rows[0]['lr']:g}), seeds and epoch rule; dev accuracy (x100), 277 pairs. A "
        "diagnosis: the protocol judges RTE at 128 tokens.",
        "",
        "| max length | dev accuracy per seed | mean | majority | full − majority [95%] | clears |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{100 * s:.1f}" for s in r["scores"]) or "–"
        length, f = r["max_length"] or "–", r["floor"]  # None: unknown or mixed
        if f is None:
            lines.append(f"| {length} | {seeds} | – | – | – | – |")
            continue
        gap = f"{100 * f['diff']:+.1f} [{100 * f['low']:.1f}, {100 * f['high']:.1f}]"
        lines.append(
            f"| {length} | {seeds} | {100 * f['full']:.1f} | {100 * f['majority']:.1f} "
            f"| {gap} | {'yes' if f['clears'] else 'no'} |"
        )
    return students.write_report(HERE / "results" / "rte_length", lines, {"rows": rows})


def main(argv: list[str] | None = None) -> None:
    """Parse the command line; run units and/or write the report."""

    def run(seeds: tuple[int, ...], until: float | None) -> None:
        runner = protocol.Runner(WORK, TASKS)
        protocol.run_units(units(seeds, full_lr()), runner, ROOT, until)

    students.command(__doc__, run, report, argv)


if __name__ == "__main__":
    main()
