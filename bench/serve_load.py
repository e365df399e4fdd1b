"""Load test of ``mtreg serve`` on loopback: one merged server against one server per task,
the request path before issue #21 against today's, and the gated default.

On the packaged MiniLM trunk with 8 random-weight tasks (fork at depth 4, one branch layer
each: the geometry of bench/serving.py; bench/sst2tasks.py builds them, with SST-2 dev and
train splits), real SST-2 dev sentences, these settings:

* ``a_merged_batched``: ``mtreg serve`` with the 8-task bundle, micro-batching on, with
  no quality gate in its home (so the default ``fastest`` serves torch fp32);
* ``b_merged_unbatched``: the same bundle with ``--max-batch-size 1``;
* ``c_process_per_task``: 8 servers, each a standalone single-task bundle
  (``export_dir(..., tasks=[t])``: trunk to depth 4 + its branch), batching on,
  ``--threads 1`` each so that 8 processes do not oversubscribe the cores;
* ``d_before_fp32``: a's server as it was before issue #21: torch fp32, each batch padded
  to its longest input and tokenised on the inference thread
  (``--backend torch --no-length-buckets --no-tokenizer-thread``);
* ``e_fp32_new``: torch fp32 with length buckets and the tokeniser thread
  (``--backend torch``): e against d is what the request path alone gives;
* ``f_gated_fastest``: a's server with the bundle's quality gate in its home, so the
  default ``fastest`` serves each batch size with the fastest backend eligible for all 8
  tasks: f against d is #21's goal (>= 2x at an equal or better p99), f against e what the
  gated backend adds to the request path.

The gate (``mtreg bundle gate``, each task's dev split: the first ``--gate-dev`` SST-2 dev
sentences) is computed once and cached under ``--cache`` by its settings, so a second run
does not gate again; the report says whether it came from the cache. The branches are
random: the gate's accuracy columns are meaningless, its agreement with fp32 is real.

Workloads (closed loop, ``--concurrency`` clients, each sending the next sentence when its
answer came back):

* ``all_tasks``: every sentence needs all 8 tasks (one request in a and b; 8 parallel
  requests, one per task server, in c; latency is the slowest of the 8);
* ``one_task``: every sentence needs one task, round robin (requests of different tasks
  share batches in a).

Bounded: at most ``--requests`` sentences and ``--seconds`` per setting and workload, after
a warm-up; the servers start before and outside the timed window. ``--repeats`` runs every
setting once per repeat, in an order rotated per repeat (bench/repeats.py), so drift hits
all settings alike: sentences/s and p50/p99 are medians over repeats, and a ratio to a
base setting is taken per repeat, then its median (min-max). The load generator runs on
the same cores as the servers, as a client would on a shared host. Throughput counts
sentences answered per second (all their tasks); p50/p99 are per sentence.

    python bench/serve_load.py [--requests 4000] [--seconds 30] [--concurrency 32]
        [--repeats 3] [--settings abcdef] [--gate-dev 300] [--cache DIR]

writes bench/results/serve_load.json and bench/results/serve_load.md (with a subset of
the settings: serve_load-<letters>.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sst2tasks
from repeats import Spread, count, ratios, rotations

from mtreg.core.text import split_list

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtreg-bench"
TASKS = list(sst2tasks.TASKS)
ALL_SETTINGS = "abcdef"
# The request path before issue #21: torch fp32, no length buckets, tokenised inline.
BEFORE = ["--backend", "torch", "--no-length-buckets", "--no-tokenizer-thread"]
# The settings throughput is compared with: one process per task, the path before #21,
# and today's path on torch fp32.
BASES = ("c_process_per_task", "d_before_fp32", "e_fp32_new")


def sentences() -> list[str]:
    """Return the SST-2 dev sentences (872)."""
    lines = (sst2tasks.SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines if line.strip()]


def free_port() -> int:
    """Return a loopback port nothing listens on (just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``url``/readyz answers 200.

    Raises:
        RuntimeError: the server exited or did not get ready in time.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextmanager
def servers(bundles: list[Path], options: list[str], env: Mapping[str, str]) -> Iterator[list[str]]:
    """Start one ``mtreg serve`` per bundle on loopback with environment ``env`` (its
    ``MTREG_HOME`` says whether a quality gate is found); yield their URLs; SIGTERM them."""
    processes, urls = [], []
    try:
        for bundle in bundles:
            port = free_port()
            command = [sys.executable, "-m", "mtreg", "serve", "--bundle", str(bundle)]
            command += ["--port", str(port), "--poll-seconds", "0", "--log-level", "warning"]
            processes.append(
                subprocess.Popen(
                    [*command, *options],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=dict(env),
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(urls, processes, strict=True):
            wait_ready(url, process)
        yield urls
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def percentile(values: list[float], q: float) -> float:
    """Return the ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def load(
    targets: dict[str, str],
    texts: list[str],
    workload: str,
    requests: int,
    seconds: float,
    concurrency: int,
    warmup: int,
) -> dict[str, Any]:
    """Drive one setting with a closed loop of ``concurrency`` clients.

    ``targets`` maps each task to the URL of the server answering it; the tasks a sentence
    needs are sent as one request per server, in parallel.
    Returns throughput, latency quantiles and error counts.
    """
    import httpx

    limits = httpx.Limits(
        max_connections=concurrency * 8, max_keepalive_connections=concurrency * 8
    )
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        counter = {"next": 0}
        latencies: list[float] = []
        errors: dict[str, int] = {}

        async def one(index: int) -> None:
            text = texts[index % len(texts)]
            tasks = TASKS if workload == "all_tasks" else [TASKS[index % len(TASKS)]]
            by_url: dict[str, list[str]] = {}
            for task in tasks:
                by_url.setdefault(targets[task], []).append(task)
            calls = [
                client.post(f"{url}/v1/predict", json={"inputs": [text], "tasks": asked})
                for url, asked in by_url.items()
            ]
            began = time.perf_counter()
            answers = await asyncio.gather(*calls, return_exceptions=True)
            elapsed = time.perf_counter() - began
            bad = [a for a in answers if isinstance(a, Exception) or a.status_code != 200]
            if bad:
                key = (
                    type(bad[0]).__name__
                    if isinstance(bad[0], Exception)
                    else str(bad[0].status_code)
                )
                errors[key] = errors.get(key, 0) + 1
            elif index >= warmup:
                latencies.append(elapsed)

        async def worker(stop_at: float, limit: int) -> None:
            while time.perf_counter() < stop_at and counter["next"] < limit:
                index = counter["next"]
                counter["next"] += 1
                await one(index)

        # Warm-up: same loop, not counted.
        await asyncio.gather(
            *(worker(time.perf_counter() + 60, warmup) for _ in range(concurrency))
        )
        began = time.perf_counter()
        stop_at = began + seconds
        await asyncio.gather(*(worker(stop_at, warmup + requests) for _ in range(concurrency)))
        wall = time.perf_counter() - began
    return {
        "sentences": len(latencies),
        "seconds": round(wall, 2),
        "throughput_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * percentile(latencies, 0.50), 1) if latencies else None,
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1) if latencies else None,
        "errors": errors,
    }


def measure(
    targets: Mapping[str, str], texts: list[str], workload: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Run :func:`load` against ``targets`` (task -> server URL) with the command line's
    sizes (requests, seconds, concurrency, warm-up); return its result."""
    return asyncio.run(
        load(
            targets,
            texts,
            workload,
            args.requests,
            args.seconds,
            args.concurrency,
            args.warmup,
        )
    )


def summarise(runs: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Return per setting, from its per-repeat ``runs``: sentences/s and p50/p99 over the
    repeats (median, min, max), and its throughput over each base setting's, repeat by
    repeat (median, min, max; absent when the base did not run)."""

    def values(name: str, key: str) -> list[float | None]:
        return [run[key] for run in runs[name]]

    summary = {}
    for name in runs:
        errors: dict[str, int] = {}
        for run in runs[name]:
            for key, n in run["errors"].items():
                errors[key] = errors.get(key, 0) + n
        entry: dict[str, Any] = {
            "sentences": sum(run["sentences"] for run in runs[name]),
            "errors": errors,
        }
        for key in ("throughput_per_s", "p50_ms", "p99_ms"):
            spread = Spread.of([v for v in values(name, key) if v is not None])
            entry[key] = spread and vars(spread)
        for base in BASES:
            if base in runs and base != name:
                spread = ratios(values(name, "throughput_per_s"), values(base, "throughput_per_s"))
                entry[f"vs_{base[0]}"] = spread and vars(spread)
        summary[name] = entry
    return summary


def _cell(spread: dict[str, float] | None, ratio: bool = False) -> str:
    """Return a summary's spread as ``median (min-max)`` (ratios as ``1.23x (...)``)."""
    if spread is None:
        return "-"
    value = Spread(**spread)
    return value.ratio_text() if ratio else value.text()


def gate_lines(report: dict[str, Any]) -> list[str]:
    """Return the markdown lines saying what gate setting f served from, and what the
    gate's columns mean on random branches."""
    if report["gate"] is None:
        return []
    gate = report["gate"]["gate"]
    base = gate["backends"]["torch"]["seconds"]
    chosen = ", ".join(
        f"batch {size}: {name} ({base[size] / gate['backends'][name]['seconds'][size]:.2f}x "
        "fp32 in the gate's timing)"
        for size, name in gate["choice"].items()
    )
    eligible = ", ".join(
        f"{name} {sum(t['eligible'] for t in b['tasks'].values())}/{len(TASKS)}"
        for name, b in gate["backends"].items()
        if name != "torch" and b["reason"] is None
    )
    source = (
        f"{'taken from the cache' if report['gate']['cached'] else 'computed in this run'}; "
        f"it took {report['gate']['gate_s']:.0f} s at load {report['gate']['load_average']}"
    )
    return [
        f"Setting f's quality gate ({source}, `{report['gate_cache']}`), on each task's dev "
        f"split (the first {report['gate_dev']} SST-2 dev sentences): default {chosen}. "
        f"Tasks eligible per backend: {eligible}.",
        "The branches are random: the gate's accuracy columns are meaningless (near chance "
        "for every backend); its agreement with fp32 is real.",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    """Return the report as a markdown table per workload."""
    bases = [b for b in BASES if any(b in s for s in report["workloads"].values())]
    out = [
        "# mtreg serve under load (loopback)",
        "",
        f"MiniLM trunk, {len(TASKS)} tasks forking at depth {sst2tasks.DEPTH} with "
        f"{sst2tasks.LAYERS} layer each, {report['concurrency']} concurrent clients, SST-2 "
        f"dev sentences, {report['cpus']} CPUs. Throughput: sentences answered per second "
        f"(all their tasks). {report['repeats']} repeats, settings interleaved (order rotated "
        "per repeat): medians over repeats (min-max); ratios taken per repeat.",
        f"Load average at the start and end of the run (1, 5, 15 min): "
        f"{report['load_average_start']}, {report['load_average']}. "
        f"Command: `{report['command']}`.",
        "",
        *gate_lines(report),
    ]
    for workload, settings in report["summary"].items():
        out += [
            f"## {workload}",
            "",
            "| setting | sentences | sentences/s | "
            + " | ".join(f"vs {b[0]}" for b in bases)
            + " | p50 ms | p99 ms | errors |",
            "|---|---:|---:|" + "---:|" * len(bases) + "---:|---:|---|",
        ]
        for name, r in settings.items():
            ratio_cells = [_cell(r.get(f"vs_{b[0]}"), ratio=True) for b in bases]
            out.append(
                f"| {name} | {r['sentences']} | {_cell(r['throughput_per_s'])} | "
                + " | ".join(ratio_cells)
                + f" | {_cell(r['p50_ms'])} | {_cell(r['p99_ms'])} | {r['errors'] or '-'} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="sentences per measurement")
    parser.add_argument("--seconds", type=float, default=30, help="time limit per measurement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--workloads", default="all_tasks,one_task")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--settings", default=ALL_SETTINGS, help="letters of the settings")
    parser.add_argument("--repeats", type=count, default=3, help="interleaved repeats")
    parser.add_argument("--gate-dev", type=int, default=300, help="dev sentences per task")
    parser.add_argument("--cache", type=Path, default=CACHE, help="the gated registry's cache")
    args = parser.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]

    from mtreg.runtime.export import export_dir

    texts = sentences()
    cpus = len(os.sched_getaffinity(0))
    batching = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms"]
    batching += [str(args.max_wait_ms), "--queue-size", "4096"]
    threads = ["--threads", str(cpus)]
    with tempfile.TemporaryDirectory(prefix="mtreg-serve-load-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        bench, gated = sst2tasks.gated(args.cache, args.gate_dev)
        bundle = bench.bundle
        singles = [export_dir(bundle, work / "single" / t, tasks=[t]) for t in TASKS]
        print(f"bundles ready in {time.perf_counter() - started:.0f} s", flush=True)
        # Every setting but f runs with an empty home: no gate, as before the gate existed.
        plain = {**bench.env, "MTREG_HOME": str(work / "no-gate-home")}
        unbatched = ["--max-batch-size", "1", "--max-wait-ms", "0", "--queue-size", "4096"]
        settings = {
            "a_merged_batched": ([bundle], [*batching, *threads], plain),
            "b_merged_unbatched": ([bundle], [*unbatched, *threads], plain),
            "c_process_per_task": (singles, [*batching, "--threads", "1"], plain),
            "d_before_fp32": ([bundle], [*batching, *threads, *BEFORE], plain),
            "e_fp32_new": ([bundle], [*batching, *threads, "--backend", "torch"], plain),
            "f_gated_fastest": ([bundle], [*batching, *threads], bench.env),
        }
        settings = {k: v for k, v in settings.items() if k[0] in args.settings}
        workloads = split_list(args.workloads)
        runs: dict[str, dict[str, list]] = {w: {name: [] for name in settings} for w in workloads}
        for repeat, order in rotations(list(settings), args.repeats):
            for name in order:
                bundles, options, env = settings[name]
                with servers(bundles, options, env) as urls:
                    for workload in workloads:
                        # One URL for every task (merged), or one per task (c).
                        targets = {t: urls[i % len(urls)] for i, t in enumerate(TASKS)}
                        result = measure(targets, texts, workload, args)
                        runs[workload][name].append(result)
                        print(f"repeat {repeat + 1}", name, workload, result, flush=True)
    report = {
        "machine": platform.platform(),
        "load_average_start": load_start,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": cpus,
        "python": platform.python_version(),
        "concurrency": args.concurrency,
        "requests_limit": args.requests,
        "seconds_limit": args.seconds,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "repeats": args.repeats,
        "command": "python " + " ".join(sys.argv),
        "tasks": len(TASKS),
        "fork_depth": sst2tasks.DEPTH,
        "branch_layers": sst2tasks.LAYERS,
        "gate_dev": args.gate_dev,
        "gate_cache": str(bench.env["MTREG_HOME"]),
        "gate": gated if "f_gated_fastest" in settings else None,
        "summary": {w: summarise(r) for w, r in runs.items()},
        "workloads": runs,
    }
    # A subset of the settings writes files of its own, so the full run's stay whole.
    name = "serve_load" if args.settings == ALL_SETTINGS else f"serve_load-{args.settings}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
