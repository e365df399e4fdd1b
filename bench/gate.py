"""The quality gate (#21) on the packaged MiniLM and the 8-task benchmark bundle.

The bundle is bench/sst2tasks.py's (bench/serving.py's geometry: MiniLM as trunk, 8 tasks
forking at depth 4 with one layer each, random branch weights, seeded), each task reading
SST-2: its dev split is the first ``--dev`` sentences of SST-2 dev (gold labels), its
train split the first 64 of SST-2 train (the static quantisation calibrates on 32 of
them). ``mtreg bundle gate --json`` then scores every backend on each task against torch
fp32 and times it at batch 1 and 32, as a user runs it; this script prints its table and
the default it leads to. The registry is new for each run (never the cache of
bench/serve_load.py): what is measured is the gate's own cost.

Random branches: the metric (accuracy against SST-2's labels) is near chance for every
backend; what the gate reads is the agreement with fp32, which random heads make harder
to keep than trained ones (their logits sit closer to ties).

    python bench/gate.py [--dev 300]

writes bench/results/gate.json and bench/results/gate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import sst2tasks
import torch

HERE = Path(__file__).resolve().parent


def markdown(results: dict) -> str:
    gate, choice = results["gate"], results["choice"]
    base = gate["backends"]["torch"]["seconds"]
    lines = [
        "# Quality gate: MiniLM, 8 tasks (depth 4, one layer each), SST-2 sentences",
        "",
        f"`{results['command']}` on {results['machine']}; load before {results['load_before']},"
        f" after {results['load_after']}; the gate took {results['gate_s']:.0f} s.",
        "",
        f"Tolerance: agreement with fp32 >= {gate['tolerance']['agreement']:.0%} and a task "
        f"metric drop <= {gate['tolerance']['metric_drop']} on each task's dev split "
        f"({results['dev']} sentences); static int8 calibrated on {gate['calibration']} train "
        "sentences per task. Branch weights are random: accuracy is near chance for all.",
        "",
        "| backend | batch 1 ms | batch 32 ms | speed-up 1 | speed-up 32 | agreement "
        "(min..max over tasks) | tasks eligible | why not |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b in gate["backends"].items():
        if b["reason"] is not None:
            lines.append(f"| {name} | - | - | - | - | - | 0 | {b['reason']} |")
            continue
        s = b["seconds"]
        agree = [t["agreement"] for t in b["tasks"].values()]
        eligible = sum(t["eligible"] for t in b["tasks"].values())
        lines.append(
            f"| {name} | {s['1'] * 1e3:.1f} | {s['32'] * 1e3:.1f} | "
            f"{base['1'] / s['1']:.2f}x | {base['32'] / s['32']:.2f}x | "
            f"{min(agree):.4f}..{max(agree):.4f} | {eligible}/{len(agree)} | |"
        )
    lines += ["", "Per task (agreement / accuracy drop; * eligible):", ""]
    names = list(gate["backends"])
    lines += ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task in sorted(gate["backends"]["torch"]["tasks"]):
        cells = []
        for name in names:
            t = gate["backends"][name]["tasks"].get(task)
            mark = "" if t is None else ("*" if t["eligible"] else "")
            cells.append("-" if t is None else f"{t['agreement']:.3f} / {t['drop']:+.3f}{mark}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Default (`fastest`) for all 8 tasks: "
        + ", ".join(
            f"batch {size}: {name} ({base[size] / gate['backends'][name]['seconds'][size]:.2f}x "
            "fp32)"
            for size, name in choice.items()
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=int, default=300)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        bench = sst2tasks.build(Path(scratch), args.dev)
        started = time.perf_counter()
        data = sst2tasks.gate(bench)
        took = time.perf_counter() - started
    results = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}",
        "load_before": " ".join(f"{x:.1f}" for x in load_before),
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "dev": args.dev,
        "gate_s": took,
        "choice": data.pop("choice"),
        "gate": data,
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "gate.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (out / "gate.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
