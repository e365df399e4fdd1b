"""What per-task releases and the Open Inference Protocol cost a server, in one run.

Both halves load one ``mtreg serve`` on loopback over the bundle of ``bench/serve_load.py``
(the packaged MiniLM trunk, 8 random-weight classification tasks forking at depth 4, one
branch layer each) with a closed loop of ``--concurrency`` clients sending SST-2 dev
sentences, one sentence and one task per request, tasks round robin. Each half measures
its settings in alternating rounds (A, B, A, B, ...) so that drift of a shared machine
falls on both alike, and reports the throughput ratio B / A beside each setting's p50/p99.

* ``protocol``: the same load, the same server and bundle, as ``/v1/predict`` requests (A)
  and as ``/v2/models/{task}/infer`` requests (B). Goal: v2 within 5% of v1 (ratio ≥ 0.95).
* ``canary`` (per-task releases): a bundle holding a task's candidate beside its stable
  version, answering ``--canary-percent`` of that task's requests (B), against the same
  bundle without it (A); the candidate in shadow (running on all of them) is shown beside.
  Goal: ≤ 5% throughput cost (ratio ≥ 0.95).

    python bench/releases.py [--halves protocol,canary] [--seconds 20] [--rounds 3]
                             [--concurrency 32] [--canary-percent 50]

writes bench/results/releases.json and bench/results/releases.md. A smoke run:
``python bench/releases.py --halves protocol --seconds 2 --rounds 1 --concurrency 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

# bench/ is the script's folder, hence on sys.path: the bundle and servers of serve_load.
from serve_load import LABELS, TASKS, build_bundle, minilm_folder, percentile, sentences, servers

from mtreg.core.text import split_list

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GOAL = 0.95

# A request: (base URL, sentence, task) -> (path, JSON body).
Request = Callable[[str, str, str], tuple[str, dict[str, Any]]]


def v1_request(url: str, text: str, task: str) -> tuple[str, dict[str, Any]]:
    """One sentence for one task as ``/v1/predict`` takes it."""
    return f"{url}/v1/predict", {"inputs": [text], "tasks": [task]}


def v2_request(url: str, text: str, task: str) -> tuple[str, dict[str, Any]]:
    """The same sentence and task as an Open Inference Protocol request."""
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}
    return f"{url}/v2/models/{task}/infer", {"inputs": [tensor]}


async def closed_loop(
    url: str, request: Request, texts: list[str], seconds: float, concurrency: int
) -> dict[str, Any]:
    """Send requests from ``concurrency`` clients for ``seconds``, each client sending its
    next request when the last was answered; return counts, wall time and latencies."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker(stop_at: float) -> None:
            while time.perf_counter() < stop_at:
                index = next(counter)
                path, body = request(url, texts[index % len(texts)], TASKS[index % len(TASKS)])
                began = time.perf_counter()
                response = await client.post(path, json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    key = str(response.status_code)
                    errors[key] = errors.get(key, 0) + 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(began + seconds) for _ in range(concurrency)))
        wall = time.perf_counter() - began
    return {"answered": len(latencies), "seconds": wall, "latencies": latencies, "errors": errors}


def alternate(
    settings: dict[str, tuple[str, Request]], texts: list[str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Measure each setting (name -> (server URL, request)) in alternating rounds after one
    warm-up round each; return per setting its throughput, p50/p99 and errors."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for round_ in range(args.rounds + 1):
        for name, (url, request) in settings.items():
            result = asyncio.run(closed_loop(url, request, texts, args.seconds, args.concurrency))
            if round_ > 0:  # round 0 warms up both
                runs[name].append(result)
    summary = {}
    for name, results in runs.items():
        latencies = [x for r in results for x in r["latencies"]]
        answered, wall = sum(r["answered"] for r in results), sum(r["seconds"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for key, count in r["errors"].items():
                errors[key] = errors.get(key, 0) + count
        summary[name] = {
            "answered": answered,
            "throughput_per_s": round(answered / wall, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 2) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2) if latencies else None,
            "errors": errors,
        }
    return summary


def protocol_half(bundle: Path, work: Path, texts: list[str], args: argparse.Namespace) -> dict:
    """``/v1`` against ``/v2`` on one server: same bundle, same load, alternating rounds."""
    options = ["--max-batch-size", "32", "--max-wait-ms", "5", "--queue-size", "4096"]
    with servers([bundle], options) as (url,):
        settings = {"v1_predict": (url, v1_request), "v2_infer": (url, v2_request)}
        summary = alternate(settings, texts, args)
    ratio = summary["v2_infer"]["throughput_per_s"] / summary["v1_predict"]["throughput_per_s"]
    return {"settings": summary, "baseline": "v1_predict", "ratio": round(ratio, 3)}


def candidate_bundles(work: Path, percent: float) -> dict[str, Path]:
    """Register version 2.0.0 of the first task (1.0.0's weights, perturbed) in the registry
    ``build_bundle`` left under ``work``, keep 1.0.0 stable, and release 2.0.0 beside it:
    return the bundle of a ``percent`` canary and the bundle of a shadow release."""
    import torch

    from mtreg.artifacts.branch_file import read_branch, write_branch
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.registry.api import Registry

    task, generator = TASKS[0], torch.Generator().manual_seed(1)
    config = read_checkpoint(minilm_folder()).config
    meta, tensors = read_branch(work / "weights" / f"{task}.safetensors", config)
    moved = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    weights = write_branch(
        work / "weights" / f"{task}-2.safetensors", moved, replace(meta, task_version="2.0.0")
    )
    plugin = work / "candidate" / "bench_candidate.py"
    plugin.parent.mkdir(parents=True, exist_ok=True)
    plugin.write_text(
        "import mtreg\n\n\n@mtreg.hookimpl\ndef register_tasks(register):\n"
        f"    register(mtreg.TaskSpec(name={task!r}, version='2.0.0', trunk='minilm', "
        f"weights={str(weights)!r}, head=mtreg.HeadSpec('classification', {LABELS!r})))\n"
    )
    url, home = f"sqlite:///{work / 'registry.db'}", work / "home"
    with Registry(url=url, home=home, plugins_dirs=[plugin]) as registry:
        registry.register([task])
        registry.rollback(task, "1.0.0")
        registry.release(task, "2.0.0", canary=percent)
        canary = registry.bundle_path("latest")
        registry.release(task, "2.0.0", shadow=True)
        return {"canary": canary, "shadow": registry.bundle_path("latest")}


def canary_half(bundle: Path, work: Path, texts: list[str], args: argparse.Namespace) -> dict:
    """The bundle without a release (baseline) against the same bundle with the first
    task's candidate answering ``--canary-percent`` of its requests, and with the candidate
    in shadow (running on every one of them): one server each, alternating rounds."""
    options = ["--max-batch-size", "32", "--max-wait-ms", "5", "--queue-size", "4096"]
    released = candidate_bundles(work, args.canary_percent)
    with servers([bundle, released["canary"], released["shadow"]], options) as urls:
        names = ("no_release", "canary", "shadow")
        settings = {name: (url, v1_request) for name, url in zip(names, urls, strict=True)}
        summary = alternate(settings, texts, args)
    ratio = summary["canary"]["throughput_per_s"] / summary["no_release"]["throughput_per_s"]
    return {
        "settings": summary,
        "baseline": "no_release",
        "ratio": round(ratio, 3),
        "canary_percent": args.canary_percent,
    }


HALVES: dict[str, Callable[[Path, Path, list[str], argparse.Namespace], dict]] = {
    "protocol": protocol_half,
    "canary": canary_half,
}


def markdown(report: dict[str, Any]) -> str:
    """Return the report as one markdown table per half."""
    out = [
        "# Releases and protocols under load (loopback)",
        "",
        f"MiniLM trunk, {len(TASKS)} tasks, {report['concurrency']} concurrent clients, one "
        f"sentence per request, {report['rounds']} alternating rounds of {report['seconds']} s "
        f"per setting, {report['cpus']} CPUs. Goal: ratio ≥ {GOAL}.",
        "",
    ]
    for half, result in report["halves"].items():
        base = result["settings"][result["baseline"]]["throughput_per_s"] or 1
        out += [
            f"## {half} (ratio {result['ratio']})",
            "",
            "| setting | answered | requests/s | vs baseline | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in result["settings"].items():
            out.append(
                f"| {name} | {r['answered']} | {r['throughput_per_s']} | "
                f"{r['throughput_per_s'] / base:.3f} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['errors'] or '-'} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--halves", default=",".join(HALVES), help="which halves to run")
    parser.add_argument("--seconds", type=float, default=20, help="per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per setting")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--canary-percent", type=float, default=50, help="canary half: the candidate's share"
    )
    args = parser.parse_args()
    halves = split_list(args.halves)
    unknown = [h for h in halves if h not in HALVES]
    if unknown:
        parser.error(f"unknown half {unknown[0]!r}: choose from {', '.join(HALVES)}")
    texts = sentences()
    report: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "halves": {},
    }
    with tempfile.TemporaryDirectory(prefix="mtreg-releases-") as tmp:
        work = Path(tmp)
        bundle = build_bundle(work)
        for half in halves:
            report["halves"][half] = HALVES[half](bundle, work, texts, args)
            print(half, json.dumps(report["halves"][half]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "releases.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "releases.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
