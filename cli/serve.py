"""``mtreg serve``: an HTTP server for a bundle (see :mod:`mtreg.serving`)."""

from __future__ import annotations

import click

from mtreg.cli.context import Context, pass_context
from mtreg.errors import MtregError


@click.command()
@click.option(
    "--bundle",
    default="serving",
    show_default=True,
    metavar="ALIAS|ID|PATH",
    help="Bundle to serve; an alias is followed (hot reload when it moves).",
)
@click.option("--tasks", default=None, metavar="A,B", help="Serve only these tasks.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnx", "auto"]),
    default="torch",
    show_default=True,
    help="onnx/auto export a registry bundle to ONNX once (cached); auto measures both "
    "backends at load and uses the faster one for each batch size.",
)
@click.option(
    "--max-batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Inputs per batch.",
)
@click.option(
    "--max-wait-ms",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0),
    help="How long a request waits for others to fill a batch.",
)
@click.option(
    "--queue-size",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Most inputs waiting; past it requests get 503 with Retry-After.",
)
@click.option(
    "--max-inputs",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Inputs per request.",
)
@click.option(
    "--poll-seconds",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0),
    help="How often the alias is checked for hot reload (0: never).",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1),
    help="Torch threads [default: the cores this process may use].",
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
    bundle: str,
    tasks: str | None,
    host: str,
    port: int,
    backend: str,
    max_batch_size: int,
    max_wait_ms: float,
    queue_size: int,
    max_inputs: int,
    poll_seconds: float,
    threads: int | None,
    log_level: str,
) -> None:
    """Serve a bundle over HTTP: POST /v1/predict, GET /v1/tasks, /healthz, /readyz,
    /metrics, and the OpenAPI spec at /openapi.json (docs at /docs).

    Requests for different tasks share micro-batches. Stops on SIGTERM after draining.
    """
    from mtreg.registry.api import Registry
    from mtreg.serving.config import ServeConfig
    from mtreg.serving.server import serve as run

    try:
        config = ServeConfig(
            bundle=bundle,
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else None,
            backend=backend,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            max_inputs=min(max_inputs, queue_size),
            poll_seconds=poll_seconds,
        )
    except ValueError as exc:
        raise MtregError(str(exc)) from None
    run(
        config,
        host=host,
        port=port,
        registry_factory=lambda: Registry(ctx.url, ctx.home, ctx.plugins_dirs),
        threads=threads,
        log_level=log_level,
    )


COMMANDS = [serve]
