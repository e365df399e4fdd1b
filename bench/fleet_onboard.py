"""Four small tasks onboarded side by side on a two-node Ray cluster, against the same four
one after another (#18): wall time, its ratio, and whether the chosen branches are the same.

Each half runs ``mtreg onboard T1 T2 T3 T4 --json`` with the same settings, each on a fresh
registry of its own (SQLite, the packaged MiniLM as trunk ``minilm``, the tasks fixed-seed
subsamples of GLUE: :mod:`benchtasks`):

* ``sequential``: ``--engine local``, one task after another in one process, torch's
  default threads (every core of the machine);
* ``sequential_1cpu``: the same with one torch thread (``OMP_NUM_THREADS=1``): one
  after another on the CPU of one of the two nodes below. On a machine of two cores the
  first is the harder baseline (torch already spreads one task over both cores); the
  second is what the second node adds;
* ``ray``: ``--engine ray --address`` a cluster of two ``ray start`` nodes of ``--num-cpus
  1`` each, started inside private network and PID namespaces (``unshare``, as root: Ray
  rewrites 127.0.0.1 to the host's address), one CPU and one torch thread per task. The
  nodes are started, and found both alive, before the command is timed; their start time
  is reported apart.

The times are those of the whole command (Python and torch start-up, connecting to Ray,
every task's onboarding and registration). "Same choice" compares each task's chosen run
(stage, layers, learning rate) and its dev score; "same bytes" its branch file's sha256
(threads differ between the halves, so floating-point sums may differ in the last bits).

    python bench/fleet_onboard.py [--tasks sst2,mrpc,rte,cola] [--train 512] [--dev 128]
                                  [--max-length 64] [--epochs 2]

The defaults are small so that the run fits in minutes on a 2-core machine (the numbers
are of the parallelism, not of the tasks' quality), yet large enough that training, not
starting Python, torch and Ray workers, is most of the time: at 64 examples and one epoch
a task trained in about 3 s, and the Ray half's start-up (about 5 s a worker) made it the
slower one (13.8 s one after another against 18.5 s on two nodes).

writes bench/results/fleet_onboard.json and bench/results/fleet_onboard.md. ``run(args)``
(``args`` from :func:`parser`) is what ``bench/fleet.py`` calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

# bench/ is the script's folder, hence on sys.path.
from benchtasks import DATA_DIR, PLUGIN_NAME, open_registry
from raynodes import RAY_ENV

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Inside the namespaces: bench/raynodes.py's two nodes of one CPU each, both alive before
# the command is timed; then the command; then the nodes stopped. Prints one JSON line.
CLUSTER = textwrap.dedent(
    """
    import json, subprocess, sys, time

    sys.path.insert(0, sys.argv[1])
    from raynodes import two_nodes

    began = time.perf_counter()
    with two_nodes() as address:
        cluster_s = time.perf_counter() - began
        began = time.perf_counter()
        done = subprocess.run([*sys.argv[2:], "--address", address], capture_output=True,
                              text=True)
        wall_s = time.perf_counter() - began
    print(json.dumps({"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                      "wall_s": wall_s, "cluster_s": cluster_s}))
    """
)


def parser() -> argparse.ArgumentParser:
    """Return the benchmark's argument parser (``parser().parse_args([])``: the defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,mrpc,rte,cola", help="four GLUE tasks")
    p.add_argument("--train", type=int, default=512, help="training examples per task")
    p.add_argument("--dev", type=int, default=128, help="dev examples per task")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    return p


def _flags(args: argparse.Namespace) -> list[str]:
    """The onboarding settings both halves use: one teacher (L=2), one student (l=1)."""
    flags = ["--search", "2..2", "--lr", "2e-4", "--student-search", "1..1"]
    flags += ["--student-lr", "2e-4", "--epochs", str(args.epochs), "--patience", "0"]
    return [*flags, "--batch-size", "16", "--device", "cpu", "--json"]


def _sequential(
    cli: list[str], tasks: list[str], args: argparse.Namespace, env: dict[str, str]
) -> tuple[dict[str, dict[str, Any]], float]:
    """Onboard ``tasks`` one after another (``--engine local``) with ``env`` over the
    benchmark's; return each task's choice and the command's wall seconds.

    Raises:
        RuntimeError: the command failed.
    """
    began = time.perf_counter()
    done = subprocess.run(
        [*cli, "onboard", *tasks, *_flags(args)],
        env={**_env(), **env},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - began
    if done.returncode:
        raise RuntimeError(f"a sequential half failed: {done.stderr[-2000:]}")
    return _choices(json.loads(done.stdout)), seconds


def _home(work: Path, name: str, config: dict[str, Any]) -> list[str]:
    """Make a registry in ``work/name`` (MiniLM added); return the CLI's options for it."""
    home = work / name
    open_registry(home, config).close()
    plugin = home / "plugins" / f"{PLUGIN_NAME}.py"
    return [sys.executable, "-m", "mtreg", "--home", str(home), "--plugins-dir", str(plugin)]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        **RAY_ENV,
        "MTREG_LOAD_PLUGINS": PLUGIN_NAME,
        "MTREG_DATA_DIR": os.environ.get("MTREG_DATA_DIR", str(DATA_DIR)),
    }


def _choices(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Task -> its chosen run, dev score, seconds and branch file's sha256 (or its error)."""
    found = {}
    for t in payload["tasks"]:
        if not t["ok"]:
            found[t["task"]] = {"error": t["error"]}
            continue
        report = t["report"]
        chosen = report["chosen"]
        weights = Path(report["weights"]).read_bytes()
        found[t["task"]] = {
            "chosen": f"{chosen['stage']}-{chosen['layers']}-lr{chosen['lr']:g}",
            "score": chosen["dev_metrics"][report["metric"]],
            "seconds": t["seconds"],
            "threads": t["threads"],
            "sha256": hashlib.sha256(weights).hexdigest(),
        }
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three halves; return the result (also what ``bench/fleet.py`` shows).

    Raises:
        RuntimeError: a half's command failed, or the namespaces cannot be made.
    """
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sizes = {"train": args.train, "dev": args.dev}
    config = {t: {"sizes": sizes, "seed": 0, "max_length": args.max_length} for t in tasks}
    work = args.work or Path(tempfile.mkdtemp(prefix="mtreg-fleet-onboard-"))
    ray_cli = _home(work, "ray", config)
    sequential, sequential_s = _sequential(_home(work, "sequential", config), tasks, args, {})
    one_cpu = {"OMP_NUM_THREADS": "1"}  # torch's threads: one node's CPU
    alone, alone_s = _sequential(_home(work, "sequential_1cpu", config), tasks, args, one_cpu)

    command = [*ray_cli, "onboard", *tasks, *_flags(args), "--engine", "ray"]
    inside = ["bash", "-c", 'ip link set lo up && exec "$@"', "-"]
    inside += [sys.executable, "-c", CLUSTER, str(HERE), *command]
    ran = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", *inside],
        env=_env(),
        capture_output=True,
        text=True,
    )
    if ran.returncode:
        raise RuntimeError(f"the Ray half could not run: {ran.stderr[-2000:]}")
    cluster = json.loads(ran.stdout.strip().splitlines()[-1])
    if cluster["code"]:
        raise RuntimeError(f"the Ray half failed: {cluster['stderr'][-2000:]}")
    on_ray = _choices(json.loads(cluster["stdout"]))

    return {
        "benchmark": "fleet_onboard",
        "tasks": tasks,
        "settings": {"train": args.train, "dev": args.dev, "max_length": args.max_length},
        "flags": _flags(args),
        "sequential_s": round(sequential_s, 2),
        "sequential_1cpu_s": round(alone_s, 2),
        "ray_s": round(cluster["wall_s"], 2),
        "ray_cluster_start_s": round(cluster["cluster_s"], 2),
        "ratio_ray_vs_sequential": round(cluster["wall_s"] / sequential_s, 3),
        "ratio_ray_vs_sequential_1cpu": round(cluster["wall_s"] / alone_s, 3),
        "same_choices": all(
            sequential[t].get("chosen") == on_ray[t].get("chosen")
            and sequential[t].get("score") == on_ray[t].get("score")
            for t in tasks
        ),
        "same_bytes": all(sequential[t].get("sha256") == on_ray[t].get("sha256") for t in tasks),
        "per_task": {"sequential": sequential, "sequential_1cpu": alone, "ray": on_ray},
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "command": "python bench/fleet_onboard.py " + " ".join(sys.argv[1:]),
    }


def markdown(result: dict[str, Any]) -> str:
    """Return the result as a markdown table."""
    lines = [
        "# Four tasks onboarded side by side on two Ray nodes vs one after another",
        "",
        f"Tasks {', '.join(result['tasks'])}; {result['settings']}; flags "
        f"`{' '.join(result['flags'])}`; {result['machine']['cpus']} CPUs.",
        "",
        "| task | sequential: chosen, score, s | ray: chosen, score, s | same bytes |",
        "|---|---|---|---|",
    ]
    for task in result["tasks"]:
        a, b = result["per_task"]["sequential"][task], result["per_task"]["ray"][task]
        cells = [
            f"{x.get('chosen')}, {x.get('score', float('nan')):.4f}, {x.get('seconds', 0):.1f}"
            for x in (a, b)
        ]
        lines.append(f"| {task} | {cells[0]} | {cells[1]} | {a.get('sha256') == b.get('sha256')} |")
    lines += [
        "",
        f"Wall time: sequential {result['sequential_s']} s (torch on every core), Ray "
        f"{result['ray_s']} s (ratio {result['ratio_ray_vs_sequential']}; the two nodes took "
        f"{result['ray_cluster_start_s']} s to start, not counted); one after another on "
        f"one node's CPU (one torch thread) {result['sequential_1cpu_s']} s (ratio "
        f"{result['ratio_ray_vs_sequential_1cpu']}); same choices: "
        f"{result['same_choices']}; same bytes: {result['same_bytes']}.",
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON and markdown; return the result."""
    args = parser().parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_onboard.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fleet_onboard.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
