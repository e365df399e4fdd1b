"""Cold start of `mtreg list --json` against `python -c "import torch"`, side by side.

The goal (issue: core) is a listing that starts in under half the time of importing torch,
because listing never needs the network code. Both commands run alternately in fresh
processes, so machine noise hits both alike; the ratio of medians is the result.

    python bench/cli_startup.py [--runs 15]

Prints a table and writes bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mtreg.core.env import DATABASE_ENV, HOME_ENV

RESULTS = Path(__file__).parent / "results"


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, HOME_ENV: home}
        env.pop(DATABASE_ENV, None)
        commands = {
            "mtreg list --json": [sys.executable, "-m", "mtreg", "list", "--json"],
            # Imports the built-in plugins; the plugin probe's outcome is cached after the
            # unmeasured first run, as on any machine after its first command.
            "mtreg plugins --json": [sys.executable, "-m", "mtreg", "plugins", "--json"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "python -c 'pass'": [sys.executable, "-c", "pass"],
        }
        subprocess.run(
            [sys.executable, "-m", "mtreg", "init"], env=env, check=True, capture_output=True
        )
        # One unmeasured run each: warms the file cache.
        for command in commands.values():
            timed(command, env)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                samples[name].append(timed(command, env))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratio = medians["mtreg list --json"] / medians["python -c 'import torch'"]
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, values in samples.items():
        print(f"{name:<28} {medians[name]:>9.3f} {min(values):>7.3f} {max(values):>7.3f}")
    print(f"\nmtreg list / import torch = {ratio:.2f} (goal < 0.5)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cli_startup.json"
    out.write_text(
        json.dumps(
            {
                "runs": args.runs,
                "median_seconds": medians,
                "samples": samples,
                "ratio_list_to_import_torch": ratio,
                "goal": "< 0.5",
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
