"""Replicas on Ray Serve (#18): ``mtreg serve --engine ray`` against ``mtreg serve`` on the
same load, and two replicas on a two-node local cluster through a hot reload.

The bundle and the load are bench/serve_load.py's (imported, not copied): the packaged
MiniLM trunk with 8 random-weight tasks forking at depth 4, SST-2 dev sentences, a closed
loop of ``--concurrency`` clients. Ray rewrites 127.0.0.1 to the host's address, so the
whole benchmark re-runs itself inside private network and PID namespaces (``unshare``, as
root; loopback only), where every server below runs, one after the other:

* ``uvicorn``: ``mtreg serve --bundle DIR --threads T`` (one process);
* ``ray_1_replica``: ``mtreg serve --engine ray --replicas 1 --replica-cpus CPUS
  --threads T`` on a local Ray it starts (the default ingress, Serve's proxy); the ratio of
  the best of each over the thread counts T of ``--threads`` (default: the CPUs) is the
  goal (within 15%), taken round by round over ``--repeats`` rounds of every setting in
  rotated order (bench/repeats.py; one 8-second run of each differed by 10% and more
  between runs). On a small machine the ingress competes with the replica's torch
  threads for the same cores, so both engines get the same thread counts to try;
* ``ray_1_replica_haproxy``: the same behind HAProxy (``--ingress haproxy``);
* ``ray_2_nodes``: two ``ray start`` nodes of ``--num-cpus 1`` (head + worker), then
  ``mtreg serve --engine ray --address HEAD --replicas 2 --replica-cpus 1 --threads 1``
  following the alias ``serving``; while the load runs the alias moves to a bundle with a
  new version of task0. Counted: requests lost (errors), and which bundle each replica
  answers with afterwards.

Each single-machine row also shows how the server batched (bench/servestats.py).

Then bench/fleet_onboard.py's ``run`` is shown under ``onboard``.

    python bench/fleet.py [--seconds 10] [--concurrency 32] [--workloads all_tasks,one_task]
                          [--threads 1,2] [--repeats 3] [--no-onboard]
                                              # bench/results/fleet.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# bench/ is the script's folder, hence on sys.path.
import serve_load
import servestats
import sst2tasks
from raynodes import METRICS_PORTS, RAY_ENV, cpu_by_role, replica_requests, two_nodes
from repeats import Spread, count, ratios, rotations

from mtreg.core.text import split_list

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PORT = 8765
PLUGIN = "sst2_tasks.py"  # bench/sst2tasks.py's plugin file


def parser() -> argparse.ArgumentParser:
    """Return the benchmark's argument parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10, help="time limit per measurement")
    p.add_argument("--requests", type=int, default=4000, help="sentences per measurement")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--workloads", default="all_tasks,one_task")
    p.add_argument("--reload-after", type=float, default=4, help="seconds into the 2-node load")
    p.add_argument(
        "--threads",
        help="torch threads of each server, a comma list (each engine tried at each, the "
        "same budget for both) [the CPUs]",
    )
    p.add_argument(
        "--repeats",
        type=count,
        default=3,
        help="rounds of every single-machine setting, in rotated order (bench/repeats.py)",
    )
    p.add_argument("--no-onboard", action="store_true", help="skip bench/fleet_onboard.py")
    p.add_argument(
        "--cluster-only", action="store_true", help="run the two-node half into the last report"
    )
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return p


def new_version(work: Path) -> str:
    """Register task0 1.0.1 (new random weights) in the bench registry under ``work``
    (bench/sst2tasks.py's); return the new bundle's id (``latest`` moves, ``serving`` does
    not)."""
    import torch

    from mtreg.artifacts.branch_file import BranchMeta, branch_shapes, write_branch
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec

    checkpoint = read_checkpoint(sst2tasks.minilm_folder())
    head = HeadSpec("classification", sst2tasks.LABELS)
    shapes = branch_shapes(checkpoint.config, sst2tasks.LAYERS, head)
    generator = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    prefix = checkpoint.fingerprint.prefix(sst2tasks.DEPTH)
    meta = BranchMeta("task0", "1.0.1", sst2tasks.DEPTH, sst2tasks.LAYERS, head, 128, prefix)
    weights = write_branch(work / "task0-1.0.1.safetensors", tensors, meta)
    plugin = work / "plugins" / PLUGIN
    old = plugin.read_text()
    text = old.replace(repr(str(work / "task0.safetensors")), repr(str(weights)))
    text = text.replace('version="1.0.0"', 'version="1.0.1" if name == "task0" else "1.0.0"')
    if text.count("1.0.1") != 2:
        raise RuntimeError(f"task0 not found in {plugin}: bench/sst2tasks.py's plugin changed")
    plugin.write_text(text)
    with registry(work) as reg:
        reg.discover(refresh=True)
        reg.register(["task0"])
        return reg.bundle("latest").id


@contextmanager
def registry(work: Path) -> Iterator[Any]:
    """serve_load's registry under ``work``, with its plugin."""
    from mtreg.registry.api import Registry

    reg = Registry(url=f"sqlite:///{work / 'registry.db'}", home=work / "home")
    reg.plugins_dirs = (work / "plugins" / PLUGIN,)
    try:
        yield reg
    finally:
        reg.close()


def mtreg_cli(work: Path) -> list[str]:
    """The ``mtreg`` command on serve_load's registry under ``work``."""
    plugin = str(work / "plugins" / PLUGIN)
    db = f"sqlite:///{work / 'registry.db'}"
    home = str(work / "home")
    return [sys.executable, "-m", "mtreg", "--db", db, "--home", home, "--plugins-dir", plugin]


@contextmanager
def server(command: list[str], log: Path) -> Iterator[str]:
    """Run ``command`` (a server on :data:`PORT`) until ready; yield its URL; SIGTERM it."""
    with log.open("w") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{PORT}"
    try:
        try:
            serve_load.wait_ready(url, process, timeout=300)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its log ends: {log.read_text()[-2000:]}") from None
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def drive(url: str, texts: list[str], workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run serve_load's closed loop against ``url`` (every task there)."""
    return serve_load.measure({task: url for task in serve_load.TASKS}, texts, workload, args)


def replicas_answering(url: str, want: int, seconds: float = 20) -> dict[str, str]:
    """Return replica -> the bundle id it answers with, once ``want`` have answered."""
    import httpx

    found: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    while len(found) < want and time.monotonic() < deadline:
        response = httpx.post(f"{url}/v1/predict", json={"inputs": ["fine"]}, timeout=60)
        if response.status_code == 200:
            found[response.headers["x-mtreg-replica"]] = response.json()["bundle"]
    return found


def single_machine(work: Path, bundle: Path, texts: list[str], args: argparse.Namespace) -> dict:
    """uvicorn vs one Ray Serve replica on the same bundle, each at every torch thread
    count of ``--threads``, ``--repeats`` rounds in rotated order: workload -> setting
    (``ENGINE_tTHREADS``) -> one result per round."""
    cpus = str(len(os.sched_getaffinity(0)))
    common = ["--bundle", str(bundle), "--port", str(PORT), "--poll-seconds", "0"]
    common += ["--queue-size", "4096", "--log-level", "warning"]
    engines = {
        "uvicorn": [],
        "ray_1_replica": ["--engine", "ray", "--replicas", "1", "--replica-cpus", cpus],
    }
    engines["ray_1_replica_haproxy"] = [*engines["ray_1_replica"], "--ingress", "haproxy"]
    settings = {
        f"{engine}_t{threads}": [*extra, "--threads", threads]
        for threads in split_list(args.threads or cpus)
        for engine, extra in engines.items()
    }
    results: dict[str, dict[str, list]] = {
        w: {name: [] for name in settings} for w in split_list(args.workloads)
    }
    for repeat, order in rotations(list(settings), args.repeats):
        for name in order:
            command = [*mtreg_cli(work), "serve", *common, *settings[name]]
            with server(command, work / f"{name}.log") as url:
                for workload in results:
                    before, batched = cpu_by_role(), servestats.scrape(url)
                    result = drive(url, texts, workload, args)
                    spent = {r: s - before.get(r, 0.0) for r, s in cpu_by_role().items()}
                    result["cpu_s"] = {r: round(s, 1) for r, s in spent.items() if s >= 0.1}
                    result |= servestats.batching(batched, servestats.scrape(url))
                    results[workload][name].append(result)
                    print(repeat, name, workload, result, file=sys.stderr, flush=True)
    return results


def through_reload(work: Path, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Two replicas on two nodes answering the load while the alias moves."""
    with registry(work) as reg:
        reg.set_alias("serving", reg.bundle("latest").id)
        old = reg.bundle("serving").id
    new = new_version(work)
    began = time.perf_counter()
    with two_nodes() as address:
        cluster_s = time.perf_counter() - began
        command = [*mtreg_cli(work), "serve", "--engine", "ray", "--address", address]
        command += ["--replicas", "2", "--replica-cpus", "1", "--threads", "1"]
        command += ["--bundle", "serving", "--port", str(PORT), "--poll-seconds", "0.5"]
        command += ["--queue-size", "4096", "--log-level", "warning"]
        began = time.perf_counter()
        with server(command, work / "ray_2_nodes.log") as url:
            deploy_s = time.perf_counter() - began
            before = replicas_answering(url, 2)

            def move() -> None:
                time.sleep(args.reload_after)
                with registry(work) as reg:
                    reg.set_alias("serving", new)

            mover = threading.Thread(target=move)
            mover.start()
            result = drive(url, texts, "one_task", args)
            mover.join()
            after = replicas_answering(url, 2)
            metrics = replica_requests(want=2)
    counted = {replica for by_replica in metrics.values() for replica in by_replica}
    return {
        **result,
        "cluster_start_s": round(cluster_s, 1),
        "deploy_s": round(deploy_s, 1),
        "bundle_before": old,
        "bundle_after": new,
        "replicas_before": before,
        "replicas_after": after,
        "every_replica_reloaded": len(after) == 2 and set(after.values()) == {new},
        "ray_metrics_by_node_port": metrics,
        "every_replica_in_ray_metrics": {name.split()[0] for name in after} <= counted,
    }


def onboard(args: argparse.Namespace) -> dict[str, Any] | str:
    """Run bench/fleet_onboard.py's ``run`` (four tasks onboarded on two Ray nodes, and one
    after another), unless ``--no-onboard``."""
    if args.no_onboard:
        return "skipped (--no-onboard)"
    import fleet_onboard

    return fleet_onboard.run(fleet_onboard.parser().parse_args([]))


def inside(args: argparse.Namespace) -> dict[str, Any]:
    """The serving measurements (in the namespaces); return the report."""
    texts = serve_load.sentences()
    with tempfile.TemporaryDirectory(prefix="mtreg-fleet-") as tmp:
        work = Path(tmp)
        bundle = sst2tasks.build(work, dev=32).bundle
        if args.cluster_only:
            return {"two_nodes_through_reload": through_reload(work, texts, args)}
        single = single_machine(work, bundle, texts, args)
        reload = through_reload(work, texts, args)
    ratios = {w: engine_ratios(settings) for w, settings in single.items()}
    return {
        "benchmark": "fleet",
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "load_before": os.getloadavg()[0],
        "concurrency": args.concurrency,
        "seconds_limit": args.seconds,
        "repeats": args.repeats,
        "single_machine": single,
        "ratio_ray_vs_uvicorn": ratios,
        "two_nodes_through_reload": reload,
        "command": "python bench/fleet.py " + " ".join(a for a in sys.argv[1:] if a != "--inside"),
    }


ENGINES = ("uvicorn", "ray_1_replica", "ray_1_replica_haproxy")


def best_of(settings: dict[str, list[dict[str, Any]]], repeat: int) -> dict[str, float]:
    """Return each engine's best throughput in round ``repeat`` over its ``ENGINE_tT``
    settings (each engine gets the same thread counts to try)."""
    engine_of = {name: name.rsplit("_t", 1)[0] for name in settings}  # ENGINE_tTHREADS
    runs = settings.items()
    return {
        e: max(r[repeat]["throughput_per_s"] for n, r in runs if engine_of[n] == e) for e in ENGINES
    }


def engine_ratios(settings: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Return, per Ray engine, its best throughput over uvicorn's best, round by round
    (the two ran minutes apart at most), as the median and range over the rounds."""
    best = [best_of(settings, i) for i in range(len(next(iter(settings.values()))))]
    out = {}
    for name in ENGINES[1:]:
        spread = ratios([b[name] for b in best], [b["uvicorn"] for b in best])
        out[name] = spread and {k: round(v, 3) for k, v in vars(spread).items()}
    return out


def markdown(report: dict[str, Any]) -> str:
    """Return the report as markdown tables."""
    out = [
        "# Replicas on Ray Serve",
        "",
        f"bench/serve_load.py's bundle and load (MiniLM, {len(serve_load.TASKS)} tasks), "
        f"{report['concurrency']} clients, {report['seconds_limit']} s per measurement, "
        f"{report['cpus']} CPUs, in private network and PID namespaces.",
        "",
        "Settings are ENGINE_tTHREADS (torch threads); each engine is tried at the same "
        "thread counts, and the goal compares the best of each.",
        "",
        "| workload | setting | sentences/s | p50 ms | p99 ms | inputs/batch | queue wait ms "
        "| errors | CPU s by process |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for workload, settings in report["single_machine"].items():
        for name, runs in settings.items():
            errors = dict(sum((Counter(run["errors"]) for run in runs), Counter()))
            cpu = median_cpu([run.get("cpu_s", {}) for run in runs])
            out.append(
                f"| {workload} | {name} | {spread_text(runs, 'throughput_per_s')} "
                f"| {spread_text(runs, 'p50_ms')} | {spread_text(runs, 'p99_ms')} "
                f"| {spread_text(runs, 'inputs_per_batch')} | {spread_text(runs, 'queue_wait_ms')} "
                f"| {errors or '-'} | {', '.join(f'{k} {v}' for k, v in cpu.items())} |"
            )
    lines = []
    for workload, by_engine in report["ratio_ray_vs_uvicorn"].items():
        proxy, haproxy = (Spread(**by_engine[e]) for e in ENGINES[1:])
        lines.append(f"{workload} {proxy.ratio_text()} (behind HAProxy {haproxy.ratio_text()})")
    out += [
        "",
        f"Best Ray replica against best uvicorn, round by round over {report['repeats']} "
        f"rounds, median (range) (goal: >= 0.85x): {', '.join(lines)}.",
    ]
    r = report["two_nodes_through_reload"]
    out += [
        "",
        "## Two replicas on two nodes (1 CPU each), alias moved under load (one_task)",
        "",
        f"{r['sentences']} sentences in {r['seconds']} s ({r['throughput_per_s']}/s), "
        f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors: {r['errors'] or 'none'}; "
        f"every replica on the new bundle afterwards: {r['every_replica_reloaded']} "
        f"({len(r['replicas_after'])} replicas answered). Cluster start {r['cluster_start_s']} s, "
        f"deployment {r['deploy_s']} s (not counted).",
        "",
        f"Ray's metrics export on each node (ports {', '.join(map(str, METRICS_PORTS))}), "
        f"/v1/predict 200s by replica: {r.get('ray_metrics_by_node_port', 'not measured')}; "
        f"every replica counted: {r.get('every_replica_in_ray_metrics', 'not measured')}"
        + (f" (`{report['cluster_command']}`)." if "cluster_command" in report else "."),
        "",
        "## Onboarding four tasks on two Ray nodes",
        "",
    ]
    onboarded = report["onboard"]
    if isinstance(onboarded, dict):
        out.append(
            f"Sequential {onboarded['sequential_s']} s (every core), Ray {onboarded['ray_s']} s "
            f"(ratio {onboarded['ratio_ray_vs_sequential']}); sequential on one node's CPU "
            f"{onboarded['sequential_1cpu_s']} s "
            f"(ratio {onboarded['ratio_ray_vs_sequential_1cpu']}); same choices: "
            f"{onboarded['same_choices']} (bench/results/fleet_onboard.md has the details)."
        )
    else:
        out.append(str(onboarded))
    out += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(out)


def main() -> None:
    args = parser().parse_args()
    if args.inside:
        print("FLEET " + json.dumps(inside(args)), flush=True)
        return
    script = 'ip link set lo up && exec "$@"'
    namespaces = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", script, "-"]
    ran = subprocess.run(
        [*namespaces, sys.executable, __file__, *sys.argv[1:], "--inside"],
        env={**os.environ, **RAY_ENV},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = [line for line in ran.stdout.splitlines() if line.startswith("FLEET ")]
    if ran.returncode or not lines:
        sys.exit(f"the benchmark failed inside the namespaces (exit {ran.returncode})")
    report = json.loads(lines[-1].removeprefix("FLEET "))
    if args.cluster_only:  # the last full run's report, with this cluster half
        cluster = {**report, "cluster_command": f"python bench/fleet.py {' '.join(sys.argv[1:])}"}
        report = json.loads((RESULTS / "fleet.json").read_text()) | cluster
        write(report)
        print(markdown(report))
        return
    report["onboard"] = "not run yet (bench/fleet_onboard.py is running)"
    write(report)  # the serving half is kept if the onboarding half fails or is stopped
    # Outside the namespaces: fleet_onboard makes its own.
    report["onboard"] = onboard(args)
    write(report)
    print(markdown(report))


def spread_text(runs: list[dict[str, Any]], key: str) -> str:
    """Return ``median (min-max)`` of ``key`` over the rounds ``runs`` ("-" where none has it)."""
    spread = Spread.of([run[key] for run in runs if run.get(key) is not None])
    return spread.text() if spread else "-"


def median_cpu(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Return each process role's median CPU seconds over the rounds."""
    roles = sorted({role for cpu in rounds for role in cpu})
    return {r: round(statistics.median(cpu.get(r, 0.0) for cpu in rounds), 1) for r in roles}


def write(report: dict[str, Any]) -> None:
    """Write bench/results/fleet.json and fleet.md."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "fleet.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
