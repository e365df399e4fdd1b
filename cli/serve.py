"""``mtreg serve``: an HTTP server for a bundle (see :mod:`mtreg.serving`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.defaults import default_option, field_default, given
from mtreg.core.text import split_list
from mtreg.errors import MtregError
from mtreg.serving.config import ServeConfig


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
    type=click.Choice(["torch", "onnx", "auto"]),
    help="onnx/auto export a registry bundle to ONNX once (cached); auto measures both "
    "backends at load and uses the faster one for each batch size.",
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
    log_level: str,
) -> None:
    """Serve a bundle over HTTP: POST /v1/predict, GET /v1/tasks, /healthz, /readyz,
    /metrics, the Open Inference Protocol (v2) under /v2, and the OpenAPI spec at
    /openapi.json (docs at /docs).

    Requests for different tasks share micro-batches. Stops on SIGTERM after draining.
    """
    from mtreg.serving.server import serve as run

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
    )
    run(
        config,
        host=host,
        port=port,
        registry_factory=ctx.open_registry,
        threads=threads,
        log_level=log_level,
    )


COMMANDS = [serve]
