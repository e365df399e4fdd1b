"""Ray on this machine for the fleet benchmarks: the environment of the nodes they start,
a two-node local cluster, each node's metrics export, and where the CPU went by process.

Ray rewrites 127.0.0.1 to the host's address: callers run inside a private network
namespace with loopback only (bench/fleet.py re-runs itself in one).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtreg.serving.ray_ingress import DEFAULT_INGRESS, ingress_env

HEAD_PORT = 6390
METRICS_PORTS = (9101, 9102)  # the head's, the worker's
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # Serve's proxies on the nodes started here resend requests lost with a replica.
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mtreg.serving.ray_proxy.middlewares",
}
NODE_ENV = {**os.environ, **RAY_ENV, **ingress_env(DEFAULT_INGRESS)}  # nodes pick the ingress


# What a process's command line names -> its role in the CPU accounting (the first match).
ROLES = (
    ("ServeReplica", "replica"),
    ("ProxyActor", "serve_proxy"),
    ("ServeController", "serve_controller"),
    ("-m mtreg", "mtreg_serve"),
)


def cpu_by_role() -> dict[str, float]:
    """Return the CPU seconds so far of every process in this PID namespace by role
    (:data:`ROLES`; this process, the load's clients, is ``load``; Ray's own daemons and
    the rest ``other``), to see where a machine's cores went during a measurement."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it exited
        fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state) on
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        role = next((r for key, r in ROLES if key in command), "other")
        role = "load" if int(entry.name) == os.getpid() else role
        out[role] = out.get(role, 0.0) + seconds
    return out


@contextmanager
def two_nodes() -> Iterator[str]:
    """Start a head and a worker node of one CPU each, each exporting Ray's metrics on its
    port of :data:`METRICS_PORTS`; yield the head's address; stop both by their PIDs."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    address = f"127.0.0.1:{HEAD_PORT}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": NODE_ENV}
    head = [ray_cli, "start", "--head", "--port", str(HEAD_PORT), "--include-dashboard", "false"]
    head += ["--metrics-export-port", str(METRICS_PORTS[0])]
    nodes = [subprocess.Popen([*head, *common], **quiet)]
    try:
        while True:  # the head's port answers first; ray.init would retry for minutes
            try:
                socket.create_connection(("127.0.0.1", HEAD_PORT), 1).close()
                break
            except OSError:
                time.sleep(0.5)
        import ray

        for _ in range(600):  # the port answers before the head's raylet has registered
            try:
                ray.init(address=address, logging_level="ERROR")
                break
            except Exception:
                time.sleep(0.5)
        worker = [ray_cli, "start", "--address", address]
        worker += ["--metrics-export-port", str(METRICS_PORTS[1])]
        nodes.append(subprocess.Popen([*worker, *common], **quiet))
        while sum(node["Alive"] for node in ray.nodes()) < 2:
            time.sleep(0.5)
        ray.shutdown()
        yield address
    finally:
        for node in reversed(nodes):
            node.terminate()
            node.wait(timeout=120)


def replica_requests(
    want: int, seconds: float = 60, ports: tuple[int, ...] = METRICS_PORTS
) -> dict[str, dict[str, float]]:
    """Return, per node metrics port, replica id -> the ``/v1/predict`` 200s Ray's export
    there counts for it (``ray_mtreg_serve_requests_total``, tagged by replica): where each
    replica's own metrics surface on a cluster. Ray exports every few seconds: asks again
    until ``want`` replicas are counted or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    found = _scrape(ports)
    while len({r for counted in found.values() for r in counted}) < want:
        if time.monotonic() > deadline:
            break
        time.sleep(2)
        found = _scrape(ports)
    return found


def _scrape(ports: tuple[int, ...]) -> dict[str, dict[str, float]]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[str, float]] = {}
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        counted = found.setdefault(str(port), {})
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                wanted = (labels.get("endpoint"), labels.get("status")) == ("/v1/predict", "200")
                if sample.name.startswith("ray_mtreg_serve_requests") and wanted:
                    counted[labels["replica"]] = counted.get(labels["replica"], 0) + sample.value
    return found
