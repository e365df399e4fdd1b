"""``mtreg serve``: an HTTP server for a bundle (see :mod:`mtreg.serving`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mtreg.artifacts.gate_file import BACKENDS
from mtreg.cli.context import Context, pass_context
from mtreg.cli.defaults import default_option, field_default, given
from mtreg.core.text import split_list
from mtreg.errors import MtregError
from mtreg.serving.config import ServeConfig
from mtreg.serving.ray_ingress import DEFAULT_INGRESS, INGRESSES


def _config_option(*decls: str, **attrs: Any) -> Callable[[Any], Any]:
    """An option for a :class:`ServeConfig` field: the dataclass holds its default."""
    return default_option(ServeConfig, *decls, **attrs)


def _config(tasks: tuple[str, ...] | None, **values: Any) -> ServeConfig:
    """Build the ServeConfig from CLI values: the ones given replace the dataclass defaults,
    and a queue smaller than the inputs per request caps them rather than being refused.

    Raises:
        MtregError: a combination ServeConfig refuses.
    """
    fields = given(**values)
    fields["max_inputs"] = min(
        fields.get(name, field_default(ServeConfig, name)) for name in ("max_inputs", "queue_size")
    )
    try:
        return ServeConfig(tasks=tasks, **fields)
    except ValueError as exc:
        raise MtregError(str(exc)) from None


@click.command()
@_config_option(
    "--bundle",
    metavar="ALIAS|ID|PATH",
    help="Bundle to serve (a directory written as a path, ./DIR); an alias is followed "
    "(hot reload when it moves).",
)
@click.option("--tasks", default=None, metavar="A,B", help="Serve only these tasks.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@_config_option(
    "--backend",
    type=click.Choice(BACKENDS),
    help="fastest: per batch size, the fastest backend the bundle's quality gate (`mtreg "
    "bundle gate`) finds eligible for every task (torch without a gate); onnx/auto export "
    "a registry bundle to ONNX once (cached); auto measures torch and onnx at load.",
)
@_config_option("--max-batch-size", type=click.IntRange(1), help="Inputs per batch.")
@_config_option(
    "--max-wait-ms",
    type=click.FloatRange(0),
    help="How long a request waits for others to fill a batch.",
)
@_config_option(
    "--queue-size",
    type=click.IntRange(1),
    help="Most inputs waiting; past it requests get 503 with Retry-After.",
)
@_config_option("--max-inputs", type=click.IntRange(1), help="Inputs per request.")
@_config_option(
    "--poll-seconds",
    type=click.FloatRange(0),
    help="How often the alias is checked for hot reload (0: never).",
)
@_config_option(
    "--header-timeout",
    "header_timeout_s",
    type=click.FloatRange(0, min_open=True),
    help="Seconds a request line and headers may take to arrive (slower: 408, closed).",
)
@_config_option(
    "--body-timeout",
    "body_timeout_s",
    type=click.FloatRange(0, min_open=True),
    help="Seconds a request body may take to arrive after its headers (slower: 408).",
)
@_config_option(
    "--keep-alive",
    "keep_alive_s",
    type=click.FloatRange(0, min_open=True),
    help="Seconds an idle keep-alive connection stays open.",
)
@_config_option(
    "--max-connections",
    type=click.IntRange(1),
    help="Open connections; a request on one past it gets 503 with Retry-After.",
)
@_config_option(
    "--access-log",
    metavar="PATH",
    help="Append one JSON line per request to PATH (- for standard error), written by a "
    "thread of its own.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1),
    help="Inference threads, torch's and onnxruntime's [default: the cores this process may "
    "use: its CPU affinity, capped by a cgroup CPU quota].",
)
@_config_option(
    "--length-buckets/--no-length-buckets",
    default=None,  # a flag is False when left out; None keeps ServeConfig's default
    help="Run a batch's inputs in sub-batches of similar token length.",
)
@_config_option(
    "--tokenizer-thread/--no-tokenizer-thread",
    default=None,  # a flag is False when left out; None keeps ServeConfig's default
    help="Tokenise the next batch on a thread of its own while one runs.",
)
@_config_option(
    "--device",
    metavar="cpu|cuda[:N]",
    help="Run on this device: on a GPU, torch under bf16/fp16 autocast, or the fp32 ONNX "
    "graph on the CUDA execution provider.",
)
@click.option(
    "--engine",
    type=click.Choice(["uvicorn", "ray"]),
    default="uvicorn",
    show_default=True,
    help="uvicorn: one process; ray: replicas on Ray Serve (the ray extra).",
)
@click.option(
    "--address",
    default=None,
    metavar="auto|HOST:PORT|ray://HOST:PORT",
    help="With --engine ray: the cluster to join [default: start a local Ray, stopped on exit].",
)
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="With --engine ray: replicas of the bundle.",
)
@click.option(
    "--autoscale",
    default=None,
    metavar="MIN:MAX",
    help="With --engine ray: autoscale between MIN and MAX replicas (replaces --replicas).",
)
@click.option(
    "--autoscaling-config",
    default=None,
    metavar="JSON",
    help="With --autoscale: more of Ray Serve's autoscaling_config, e.g. "
    '\'{"upscale_delay_s": 10, "downscale_delay_s": 120}\'.',
)
@click.option(
    "--replica-cpus",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="With --engine ray: CPUs per replica (its torch threads, unless --threads).",
)
@click.option(
    "--ingress",
    type=click.Choice(INGRESSES),
    default=None,
    help=f"With --engine ray and the Ray it starts: what takes HTTP to the replicas: HAProxy "
    f"straight to each replica, or Serve's Python proxy [default: {DEFAULT_INGRESS}; a "
    "cluster's nodes choose at `ray start`].",
)
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="With --engine ray and the Ray it starts: the port where Ray exports every "
    "replica's metrics for Prometheus (tagged by replica; on a cluster, `ray start "
    "--metrics-export-port`).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@pass_context
def serve(
    ctx: Context,
    bundle: str | None,
    tasks: str | None,
    host: str,
    port: int,
    backend: str | None,
    max_batch_size: int | None,
    max_wait_ms: float | None,
    queue_size: int | None,
    max_inputs: int | None,
    poll_seconds: float | None,
    header_timeout_s: float | None,
    body_timeout_s: float | None,
    keep_alive_s: float | None,
    max_connections: int | None,
    access_log: str | None,
    threads: int | None,
    length_buckets: bool | None,
    tokenizer_thread: bool | None,
    device: str | None,
    log_level: str,
    **ray_options: Any,  # --engine and the options of --engine ray (:func:`_serve_on_ray`)
) -> None:
    """Serve a bundle over HTTP: POST /v1/predict, GET /v1/tasks, /healthz, /readyz,
    /metrics, the Open Inference Protocol (v2) under /v2, and the OpenAPI spec at
    /openapi.json (docs at /docs).

    Requests for different tasks share micro-batches. Stops on SIGTERM after draining.
    With --engine ray, each replica batches on its own behind Serve's HTTP proxy (or
    HAProxy, --ingress haproxy) and follows the alias by itself.
    """
    config = _config(
        bundle=bundle,
        tasks=tuple(split_list(tasks)) if tasks else None,
        backend=backend,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        max_inputs=max_inputs,
        poll_seconds=poll_seconds,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        keep_alive_s=keep_alive_s,
        max_connections=max_connections,
        access_log=access_log,
        length_buckets=length_buckets,
        tokenizer_thread=tokenizer_thread,
        device=device,
    )
    if ray_options.pop("engine") == "ray":
        _serve_on_ray(ctx, config, host, port, threads, log_level=log_level, **ray_options)
        return
    ray_only = ("address", "autoscale", "autoscaling_config", "metrics_port", "ingress")
    if any(ray_options[name] for name in ray_only) or ray_options["replicas"] != 1:
        raise MtregError(
            "--address, --replicas, --autoscale, --autoscaling-config, --metrics-port and "
            "--ingress need --engine ray"
        )
    from mtreg.serving.server import serve as run

    run(
        config,
        host=host,
        port=port,
        registry_factory=ctx.open_registry,
        threads=threads,
        log_level=log_level,
    )


def _serve_on_ray(
    ctx: Context,
    config: ServeConfig,
    host: str,
    port: int,
    threads: int | None,
    *,
    address: str | None,
    replicas: int,
    autoscale: str | None,
    autoscaling_config: str | None,
    replica_cpus: float,
    metrics_port: int | None,
    ingress: str | None,
    log_level: str,
) -> None:
    """Run ``mtreg serve --engine ray`` (see :mod:`mtreg.serving.ray_engine`).

    Raises:
        MtregError: bad --autoscale, Ray missing, the cluster unreachable.
    """
    from mtreg.serving.ray_engine import (
        RayOptions,
        RegistryOpener,
        parse_autoscale,
        parse_autoscaling,
        serve_on_ray,
    )

    options = RayOptions(
        address=address,
        replicas=replicas,
        autoscale=parse_autoscale(autoscale) if autoscale else None,
        autoscaling=parse_autoscaling(autoscaling_config) if autoscaling_config else {},
        replica_cpus=replica_cpus,
        metrics_port=metrics_port,
        ingress=ingress,
        target_ongoing_requests=config.max_batch_size,
        max_queued=config.queue_size,
        graceful_shutdown_s=config.drain_seconds,
        log_level=log_level,
    )
    home = str(ctx.home.resolve()) if ctx.home else None
    dirs = tuple(str(Path(d).resolve()) for d in ctx.plugins_dirs)
    opener = RegistryOpener(ctx.url, home, dirs, ctx.store)
    serve_on_ray(config, options, opener, host, port, threads)


COMMANDS = [serve]
