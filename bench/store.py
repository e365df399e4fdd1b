"""Start-up cost of a bundle kept in an S3 bucket against one kept in a local home.

One registry on the packaged MiniLM (two random-weight tasks forking at depth 4) is
registered twice: in a local home (today's layout), and with ``--store s3://...`` on an S3
server started here (moto, on 127.0.0.1). Then, in one run, runs interleaved:

* ``load_bundle("serving")`` in this process, from the local home; from the bucket into an
  empty home (cold: every object fetched and verified); from the bucket into a home that
  already holds the bundle (warm: the cache);
* ``mtreg serve`` as a fresh process, from start to ``/readyz`` answering 200, the same
  three ways.

Goal (issue 16): a warm start within 1.1x of the local one. moto answers from memory on
loopback, so the cold numbers are a floor: a real bucket adds its latency and bandwidth.

    python bench/store.py [--runs 5]

Prints a table and writes bench/results/store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchtasks

RESULTS = Path(__file__).resolve().parent / "results"
TASKS, DEPTH, LAYERS = 2, 4, 1
GOAL = 1.1


def start_s3() -> tuple[object, str]:
    """Start moto's S3 server on a free loopback port, with bucket ``bench``."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


def write_plugin(work: Path) -> Path:
    """Write random branch files and a plugin offering them on trunk ``minilm``."""
    from mtreg.artifacts.branch_file import BranchMeta, branch_shapes, write_branch
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec

    checkpoint = read_checkpoint(benchtasks.minilm_folder())
    head = HeadSpec("classification", ("negative", "positive"))
    generator = torch.Generator().manual_seed(0)
    lines = ["import mtreg", "", "", "@mtreg.hookimpl", "def register_tasks(register):"]
    for index in range(TASKS):
        tensors = {
            key: torch.randn(shape, generator=generator) * 0.02
            for key, shape in branch_shapes(checkpoint.config, LAYERS, head).items()
        }
        prefix = checkpoint.fingerprint.prefix(DEPTH)
        meta = BranchMeta(f"task{index}", "1.0.0", DEPTH, LAYERS, head, 128, prefix)
        weights = write_branch(work / f"task{index}.safetensors", tensors, meta)
        lines.append(
            f"    register(mtreg.TaskSpec(name='task{index}', version='1.0.0', trunk='minilm', "
            f"weights={str(weights)!r}, head=mtreg.HeadSpec('classification', "
            "('negative', 'positive'))))"
        )
    plugin = work / "plugins" / "bench_store.py"
    plugin.parent.mkdir(parents=True)
    plugin.write_text("\n".join(lines) + "\n")
    return plugin


def register(db: str, home: Path, store: str | None, plugin: Path) -> None:
    from mtreg.registry.api import Registry

    with Registry(db, home, [plugin], store=store) as registry:
        registry.add_trunk("minilm", benchtasks.minilm_folder())
        registry.register([f"task{i}" for i in range(TASKS)], promote=True)


def time_load(db: str, home: Path, store: str | None) -> float:
    from mtreg.registry.api import Registry
    from mtreg.runtime.bundle import load_bundle

    started = time.perf_counter()
    with Registry(db, home, store=store) as registry:
        load_bundle("serving", registry=registry)
    return time.perf_counter() - started


def time_serve(db: str, home: Path, store: str | None) -> float:
    """Seconds from starting ``mtreg serve`` to its ``/readyz`` answering 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MTREG_HOME": str(home), "MTREG_DATABASE_URL": db}
    env.pop("MTREG_STORE_URL", None)
    if store:
        env["MTREG_STORE_URL"] = store
    command = [sys.executable, "-m", "mtreg", "serve", "--bundle", "serving"]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "error"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mtreg serve exited with {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(30)


def measure(runs: int, work: Path, store: str) -> dict[str, dict[str, list[float]]]:
    """Run every case ``runs`` times, interleaved; return seconds per case and kind."""
    local_db, shared_db = f"sqlite:///{work / 'local.db'}", f"sqlite:///{work / 'shared.db'}"
    warm = work / "warm"
    cases: dict[str, Callable[[Callable[..., float]], float]] = {
        "local home": lambda timer: timer(local_db, work / "local", None),
        "bucket, cold cache": lambda timer: timer(shared_db, fresh(work), store),
        "bucket, warm cache": lambda timer: timer(shared_db, warm, store),
    }
    time_load(shared_db, warm, store)  # fills the warm cache (not measured)
    samples: dict[str, dict[str, list[float]]] = {"load_bundle": {}, "serve": {}}
    for kind, timer in (("load_bundle", time_load), ("serve", time_serve)):
        for case in cases.values():
            case(timer)  # one unmeasured run each: the file cache, imports
        for _ in range(runs):
            for name, case in cases.items():
                samples[kind].setdefault(name, []).append(case(timer))
    return samples


def fresh(work: Path) -> Path:
    """Return a new, empty home (an empty cache)."""
    return Path(tempfile.mkdtemp(dir=work, prefix="cold-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    server, endpoint = start_s3()
    work = Path(tempfile.mkdtemp(prefix="mtreg-bench-store-"))
    try:
        plugin = write_plugin(work)
        store = "s3://bench/registry"
        register(f"sqlite:///{work / 'local.db'}", work / "local", None, plugin)
        register(f"sqlite:///{work / 'shared.db'}", work / "publisher", store, plugin)
        samples = measure(args.runs, work, store)
    finally:
        server.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)
    report(samples, args.runs, endpoint)


def report(samples: dict[str, dict[str, list[float]]], runs: int, endpoint: str) -> None:
    medians = {
        kind: {name: statistics.median(values) for name, values in cases.items()}
        for kind, cases in samples.items()
    }
    ratios = {
        kind: {name: value / cases["local home"] for name, value in cases.items()}
        for kind, cases in medians.items()
    }
    print(f"{'start':<12} {'case':<20} {'median s':>9} {'min s':>7} {'x local':>8}")
    for kind, cases in samples.items():
        for name, values in cases.items():
            print(
                f"{kind:<12} {name:<20} {medians[kind][name]:>9.3f} {min(values):>7.3f} "
                f"{ratios[kind][name]:>8.2f}"
            )
    warm = {kind: ratios[kind]["bucket, warm cache"] for kind in ratios}
    print(f"\nwarm / local: {', '.join(f'{k} {v:.2f}' for k, v in warm.items())} (goal <= {GOAL})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "store.json"
    payload = {
        "runs": runs,
        "bundle": {"trunk": "MiniLM-L6", "tasks": TASKS, "fork_depth": DEPTH},
        "store": f"moto S3 on {endpoint}",
        "median_seconds": medians,
        "ratio_to_local": ratios,
        "samples": samples,
        "goal_warm_to_local": GOAL,
        "warm_within_goal": {kind: value <= GOAL for kind, value in warm.items()},
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
