"""``mtreg serve --engine ray``: the bundle as a Ray Serve deployment of N replicas.

Each replica is the single-process server's app (:func:`mtreg.serving.app.create_app`:
the same ``/v1`` and ``/v2`` routers, middleware and lifespan) behind Serve's HTTP proxy or
HAProxy (:mod:`mtreg.serving.ray_ingress`), so each replica batches requests of every
task together with mtreg's own :class:`~mtreg.serving.batcher.Batcher`. Hot reload: every
replica runs the same reload watcher as ``mtreg serve`` (its lifespan starts it), polling
the registry every ``poll_seconds``; replicas on other machines read the same registry
database and object store, so each swaps on its own within one poll of the alias moving,
with no broadcast to lose. A request whose replica dies under it is sent again (by mtreg's
middleware in Serve's proxy, :mod:`mtreg.serving.ray_proxy`, which also refuses a body past
the limits before a replica sees it; or by HAProxy's retries); idle keep-alive connections
close after ``keep_alive_s``. Drain: Serve stops routing to a replica it stops, waits for
its requests up to ``graceful_shutdown_s``, then runs the app's lifespan shutdown
(queue drained, new work 503 + Retry-After); past ``max_queued`` requests waiting, Serve's
proxy answers 503 + Retry-After itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mtreg.artifacts.manifest import bundle_directory
from mtreg.core import env
from mtreg.core.cluster import connect
from mtreg.core.extras import EXTRA_MODULES, require
from mtreg.errors import MtregError
from mtreg.serving.config import ServeConfig
from mtreg.serving.ray_ingress import DEFAULT_INGRESS, HAPROXY_ENV, ingress_env
from mtreg.serving.ray_proxy import CALLBACK, CALLBACK_ENV

if TYPE_CHECKING:
    from mtreg.registry.api import Registry

log = logging.getLogger("mtreg.serving")

APP_NAME = "mtreg"


@dataclass(frozen=True)
class RayOptions:
    """How the deployment runs.

    Attributes:
        address: the cluster to join (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``), or
            None to start a local Ray for this command and stop it on exit.
        replicas: fixed replica count (ignored with ``autoscale``).
        autoscale: (min, max) replicas for Serve's autoscaling, or None.
        autoscaling: more of Serve's ``autoscaling_config`` (``upscale_delay_s``,
            ``look_back_period_s``...), over mtreg's; checked against Serve's own model
            before Ray starts.
        replica_cpus: CPUs Ray reserves per replica; torch threads follow it.
        metrics_port: where the Ray started here exports its metrics, every replica's
            ``mtreg_serve_*`` among them (a cluster's nodes: ``ray start
            --metrics-export-port``); None lets Ray choose.
        ingress: what takes HTTP to the replicas of the Ray started here
            (:mod:`mtreg.serving.ray_ingress`); None: Serve's proxy there (the default
            ingress), and on a cluster what its nodes were started with.
        max_ongoing_requests: requests a replica holds at once (Serve's default of 5
            would cap mtreg's micro-batches at 5 requests).
        target_ongoing_requests: what autoscaling aims at per replica: a full micro-batch.
        max_queued: requests waiting at the proxy past the replicas' limit before Serve
            answers 503 with Retry-After.
        graceful_shutdown_s: how long a stopping replica waits for its requests.
        log_level: the replicas' log level.
    """

    address: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    autoscaling: dict[str, Any] = field(default_factory=dict)
    replica_cpus: float = 1.0
    metrics_port: int | None = None
    ingress: str | None = None
    max_ongoing_requests: int = 256
    target_ongoing_requests: int = 32
    max_queued: int = 1024
    graceful_shutdown_s: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.replica_cpus <= 0 or self.max_ongoing_requests < 1:
            raise ValueError("replicas, replica CPUs and max ongoing requests must be positive")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"autoscale needs MIN <= MAX, got {self.autoscale}")

    def deployment_settings(self) -> dict[str, Any]:
        """Return the ``serve.deployment`` keyword arguments of these options."""
        settings: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_s,
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            # mtreg's own access log (--access-log) records requests; Serve's would repeat it.
            "logging_config": {"log_level": self.log_level.upper(), "enable_access_log": False},
        }
        if self.autoscale is None:
            settings["num_replicas"] = self.replicas
        else:
            low, high = self.autoscale
            settings["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "initial_replicas": max(low, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                **self.autoscaling,
            }
        return settings


def parse_autoscaling(text: str) -> dict[str, Any]:
    """Return the JSON object ``text`` (Serve's ``autoscaling_config`` keys).

    Raises:
        MtregError: not a JSON object.
    """
    try:
        found = json.loads(text)
    except ValueError as exc:
        found = exc
    if not isinstance(found, dict):
        raise MtregError(
            f"--autoscaling-config takes a JSON object of Ray Serve's autoscaling_config keys "
            f"(e.g. '{{\"upscale_delay_s\": 10}}'), got {text!r}"
        )
    return found


def parse_autoscale(text: str) -> tuple[int, int]:
    """Return (min, max) of ``MIN:MAX``.

    Raises:
        MtregError: not two integers with 0 <= MIN <= MAX and MAX >= 1.
    """
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = (-1, -1)
    if not sep or bounds[0] < 0 or bounds[1] < max(1, bounds[0]):
        raise MtregError(f"--autoscale takes MIN:MAX replicas (0 <= MIN <= MAX), got {text!r}")
    return bounds


@dataclass(frozen=True)
class RegistryOpener:
    """Opens the registry in a replica: picklable, so it travels to other machines, which
    read the same database and object store."""

    url: str | None
    home: str | None
    plugins_dirs: tuple[str, ...] = ()
    store: str | None = None

    def __call__(self) -> Registry:
        """Return a new Registry (one per thread, as the reloader wants)."""
        from mtreg.registry.api import Registry

        return Registry(self.url, self.home, self.plugins_dirs, create=False, store=self.store)


REPLICA_HEADER = "x-mtreg-replica"


def _replica_id() -> str:
    """Return Serve's id of the replica running this code."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


class NameReplica:
    """ASGI middleware: names the replica that answered (its Serve id and process id) in
    the ``x-mtreg-replica`` header, so that an operator can tell replicas apart."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


class RayMirror:
    """A replica's metrics mirror (:class:`~mtreg.serving.metrics.Mirror`): Ray Serve's
    metrics, which Ray exports on each node for Prometheus with the replica's id, its
    deployment and application as tags."""

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Any:
        from ray.serve import metrics

        return metrics.Counter(name, description=doc, tag_keys=labels)

    def histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...]
    ) -> Any:
        from ray.serve import metrics

        return metrics.Histogram(name, description=doc, boundaries=list(buckets), tag_keys=labels)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Any:
        from ray.serve import metrics

        return metrics.Gauge(name, description=doc, tag_keys=labels)


class Replica:
    """One replica: loads the bundle, then hands Serve the app that serves it (its metrics
    mirrored on Ray's, so that each replica's can be scraped)."""

    def __init__(self, config: ServeConfig, opener: RegistryOpener | None, threads: int) -> None:
        from mtreg.serving.app import create_app
        from mtreg.serving.server import load_first, set_threads

        set_threads(threads)
        served = load_first(config, opener)
        log.info("replica loaded bundle %s", served.id[:12])
        self.asgi = create_app(config, served, opener, RayMirror())
        self.asgi.add_middleware(NameReplica, name=f"{_replica_id()} {os.getpid()}")

    def __serve_build_asgi_app__(self) -> Any:
        """Return the app Serve's proxy sends this replica's requests to."""
        return self.asgi

    def check_health(self) -> None:
        """Serve's health check: a replica whose app is draining is restarted elsewhere.

        Raises:
            RuntimeError: the app has stopped taking requests.
        """
        if self.asgi.state.server.draining:
            raise RuntimeError("replica is draining")


def application(
    config: ServeConfig, options: RayOptions, opener: RegistryOpener | None, threads: int
) -> Any:
    """Return the Serve application (bound deployment) serving ``config.bundle``."""
    from ray import serve

    ingress = serve.ingress()(Replica)
    deployment = serve.deployment(name="bundle", **options.deployment_settings())(ingress)
    return deployment.bind(config, opener, threads)


def _checked(config: ServeConfig, opener: RegistryOpener | None) -> ServeConfig:
    """Return ``config`` with a bundle directory made absolute (replicas do not share this
    command's working directory), once the bundle it names is known to exist: a typo is
    one line here rather than replicas failing one after another.

    Raises:
        NotFound: no such bundle directory, alias or id.
    """
    directory = bundle_directory(config.bundle)
    if directory is not None:
        return replace(config, bundle=str(directory.resolve()))
    if opener is not None:
        with opener() as registry:
            registry.bundle(config.bundle)
    return config


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass


def _check_autoscaling(options: RayOptions) -> None:
    """Check the deployment's autoscaling config with Serve's own model, before Ray starts.

    Raises:
        MtregError: a key Serve does not know (Serve would ignore it) or a bad value.
    """
    from ray.serve.config import AutoscalingConfig

    config = options.deployment_settings().get("autoscaling_config")
    if config is None:
        if options.autoscaling:
            raise MtregError("--autoscaling-config needs --autoscale MIN:MAX")
        return
    unknown = sorted(set(config) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise MtregError(
            f"--autoscaling-config: Ray Serve's autoscaling_config has no {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(AutoscalingConfig.model_fields))}"
        )
    try:
        AutoscalingConfig(**config)
    except ValueError as exc:  # pydantic's ValidationError
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        where = ".".join(map(str, first["loc"]))
        raise MtregError(f"--autoscaling-config: {where}: {first['msg']}") from None


def _ray_start(options: RayOptions) -> tuple[bool, dict[str, Any]]:
    """Return whether this command starts its own Ray (no address, no ``$RAY_ADDRESS``: it
    then forwards its replicas' lines, and Serve and Ray stop with it) and the options of
    ``ray.init``.

    Serve's ingress settings go into this process's environment, before Ray is imported,
    for the Ray it starts (:func:`~mtreg.serving.ray_ingress.ingress_env`).

    Raises:
        MtregError: ``metrics_port`` or ``ingress`` for a cluster, whose nodes set their own;
            an ingress that cannot run here.
    """
    local = options.address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        os.environ.update(ingress_env(options.ingress or DEFAULT_INGRESS))
    elif options.ingress is not None:
        raise MtregError(
            "--ingress chooses for a Ray started here; a cluster's nodes choose when they "
            f"start: export {HAPROXY_ENV}=1 (HAProxy) or 0 before `ray start` (see the README)"
        )
    init: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": local}
    if options.metrics_port is not None:
        if not local:
            raise MtregError(
                "--metrics-port sets the port of a Ray started here; on a cluster give each "
                "node's `ray start --metrics-export-port`"
            )
        init["_metrics_export_port"] = options.metrics_port
    return local, init


def serve_on_ray(
    config: ServeConfig,
    options: RayOptions,
    opener: RegistryOpener | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    threads: int | None = None,
) -> None:
    """Deploy the bundle on Ray Serve, answer on ``host:port`` until SIGTERM or SIGINT,
    then delete the deployment (draining its replicas) and stop the Ray this started.

    Raises:
        MtregError: Ray or the serve extra is missing, the cluster is unreachable,
            ``metrics_port`` names no Ray of this command's, or the bundle cannot be
            loaded (replicas failing to start); one line each.
    """
    local, init = _ray_start(options)
    for module in (*EXTRA_MODULES["ray"], *EXTRA_MODULES["serve"]):
        require(module)
    import ray
    from ray import serve

    _check_autoscaling(options)
    config = _checked(config, opener)
    # Read by Serve's proxies in the Ray started here; a cluster's nodes set them themselves.
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    os.environ[env.PROXY_MAX_BODY_ENV] = str(config.max_body_bytes)
    os.environ[env.PROXY_BODY_TIMEOUT_ENV] = str(config.body_timeout_s)
    started = connect(ray, options.address, **init)
    try:
        http = {"host": host, "port": port, "keep_alive_timeout_s": config.keep_alive_s}
        serve.start(http_options=http)
        used = threads or max(1, math.floor(options.replica_cpus))
        try:
            serve.run(application(config, options, opener, used), name=APP_NAME, route_prefix="/")
        except Exception as exc:  # a replica that cannot load the bundle fails deploying
            lines = [line for line in str(exc).splitlines() if "Error" in line] or [str(exc)]
            raise MtregError(f"the deployment failed: {lines[-1].strip()}") from None
        log.info("serving on http://%s:%d through Ray Serve", host, port)
        _wait_for_signal()
        serve.delete(APP_NAME)
    finally:
        if local:
            serve.shutdown()
        if started:
            ray.shutdown()
