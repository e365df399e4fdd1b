"""Running the app under uvicorn: what ``mtreg serve`` does, callable from Python.

Shutdown on SIGTERM or SIGINT: /readyz turns 503 at once (so a load balancer stops sending)
and new predictions get 503 with ``Connection: close``, while the requests admitted before
the signal finish; once no request has come or run for a moment (at most ``drain_seconds``),
uvicorn stops accepting connections and waits for requests in flight, and the lifespan
drains the queue and stops the inference and reload threads.

Connections are bounded by the ServeConfig: request heads and bodies must arrive in time,
idle keep-alive connections close, and past ``max_connections`` requests get 503 (see
:mod:`mtreg.serving.protocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from mtreg.core.extras import EXTRA_MODULES, require
from mtreg.serving.access import check_target
from mtreg.serving.config import ServeConfig
from mtreg.serving.reload import RegistryFactory, Served, is_directory_ref, load_served

log = logging.getLogger("mtreg.serving")

# A draining server stops listening once no request came or ran for this long.
QUIET_SECONDS = 0.25
# Where this process's cgroup (its CPU quota) is mounted, in a container.
CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """Return the CPUs the cgroup quota under ``root`` allows (cgroup v2 ``cpu.max``, else
    v1 ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), or None where none is set."""
    try:
        if (root / "cpu.max").is_file():
            quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period or "100000")
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = CGROUP) -> int:
    """Return how many cores this process may use: its CPU affinity (what ``taskset`` and
    container cpusets set), capped by the cgroup CPU quota rounded up (``docker --cpus``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpus(root)
    if quota is not None:
        cores = min(cores or 1, math.ceil(quota))
    return max(1, cores or 1)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: :func:`usable_cores`); return it. ONNX
    sessions opened afterwards take the same number (``runtime/backends.py``).

    One inference thread runs at a time, so it may use all cores; inter-op parallelism only
    adds contention for these small graphs, so it is set to 1.
    """
    import torch

    torch.set_num_threads(max(1, threads or usable_cores()))
    # RuntimeError: already set, or parallel work already started; keep it then.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def load_first(config: ServeConfig, registry_factory: RegistryFactory | None) -> Served:
    """Load the bundle to serve at start-up.

    Raises:
        NotFound, InvalidWeights, MtregError: the bundle cannot be served.
    """
    if is_directory_ref(config.bundle) or registry_factory is None:
        return load_served(config.bundle, config.tasks, config.backend, device=config.device)
    registry = registry_factory()
    try:
        return load_served(config.bundle, config.tasks, config.backend, registry, config.device)
    finally:
        registry.close()


def build_server(
    app: Any, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"
) -> Any:
    """Return the ``uvicorn.Server`` that runs ``app`` (made by
    :func:`mtreg.serving.app.create_app`) under the limits of its ServeConfig and drains
    on SIGTERM or SIGINT as this module says; start it with ``run()``."""
    # FastAPI and uvicorn (the `serve` extra) load only when a server starts.
    import uvicorn

    from mtreg.serving.protocol import guarded_protocol

    state = app.state.server
    config: ServeConfig = state.config

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True  # /readyz and new predictions answer 503 from now on
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list | None = None) -> None:
            # Keep accepting until no request has been in flight for a while (those
            # admitted before the signal finish, new ones get 503): a client connecting
            # as the listening socket closes would see its connection reset.
            deadline, seen = time.monotonic() + config.drain_seconds, -1
            busy = self.server_state
            while time.monotonic() < deadline and (busy.tasks or seen != busy.total_requests):
                seen = busy.total_requests
                await asyncio.sleep(QUIET_SECONDS)
            await super().shutdown(sockets)

    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=guarded_protocol(state),
        timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=int(config.drain_seconds),
        lifespan="on",
    )
    return Server(settings)


def serve(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    registry_factory: RegistryFactory | None = None,
    threads: int | None = None,
    log_level: str = "info",
) -> None:
    """Load the bundle and serve it until SIGTERM or SIGINT.

    Raises:
        NotFound, InvalidWeights, MtregError: the bundle cannot be served, the access
            log cannot be written, or the ``serve`` extra is missing (nothing listens).
    """
    # The serve extra is checked before anything loads, so a missing one is a single line.
    for module in EXTRA_MODULES["serve"]:
        require(module)
    from mtreg.serving.app import create_app

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s:%(name)s: %(message)s")
    logging.getLogger("mtreg").setLevel(log_level.upper())
    if config.access_log is not None:
        check_target(config.access_log)
    used = set_threads(threads)
    log.info(
        "%d inference threads (%s)",
        used,
        "--threads" if threads else f"the cores this process may use, of {os.cpu_count()}",
    )
    served = load_first(config, registry_factory)
    log.info("loaded bundle %s (%s backend, %d torch threads)", served.id, config.backend, used)
    server = build_server(create_app(config, served, registry_factory), host, port, log_level)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it stopped on once it is done; a SIGTERM that was
        # served by draining is a clean exit (status 0), so let that second one pass.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server.run()
