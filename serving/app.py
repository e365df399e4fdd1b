"""The ASGI application of ``mtreg serve`` (FastAPI; its OpenAPI spec is /openapi.json).

Endpoints: POST /v1/predict, GET /v1/tasks, /healthz (alive), /readyz (loaded and not
draining), /metrics (Prometheus). Handlers only check requests and queue them; inference
runs in the batcher's thread.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtreg import __version__
from mtreg.runtime.inference import run_rows
from mtreg.serving.batcher import Batcher, Job, QueueFull, Results, ShuttingDown
from mtreg.serving.config import ServeConfig
from mtreg.serving.metrics import ServeMetrics
from mtreg.serving.plan import BadRequest, plan_rows
from mtreg.serving.reload import RegistryFactory, Reloader, Served, is_directory_ref
from mtreg.serving.schemas import (
    PredictResponse,
    Problem,
    Status,
    TaskOut,
    TasksResponse,
    request_model,
)

log = logging.getLogger("mtreg.serving")

ENDPOINTS = {"/v1/predict", "/v1/tasks", "/healthz", "/readyz", "/metrics"}


class ServerState:
    """What the handlers share: the bundle serving now, the batcher, metrics, reloader."""

    def __init__(self, config: ServeConfig, served: Served, metrics: ServeMetrics) -> None:
        self.config = config
        self.served = served
        self.metrics = metrics
        self.draining = False
        self.started = False
        self.reloader: Reloader | None = None
        self.batcher = Batcher(
            lambda bundle, rows: run_rows(bundle, rows),
            metrics,
            config.max_batch_size,
            config.max_wait_ms,
            config.queue_size,
        )
        metrics.watch_queue(lambda: self.batcher.depth)
        metrics.serving(served.id)

    def swap(self, served: Served) -> None:
        """Serve ``served`` from the next request on (one assignment: atomic)."""
        self.served = served
        self.metrics.serving(served.id)


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """One line naming each invalid field (without echoing the input back).

    pydantic reports a value matching no member of a union once per member, under
    locations like ``inputs.0.list[...]``: those are merged into one entry per field.
    """
    found: dict[str, list[str]] = {}
    for error in exc.errors():
        parts = [
            str(p)
            for p in error.get("loc", ())
            if p != "body" and (isinstance(p, int) or str(p).isidentifier())
        ]
        messages = found.setdefault(".".join(parts) or "body", [])
        message = str(error.get("msg", "invalid"))
        if message not in messages:
            messages.append(message)
    parts = [f"{where}: {' or '.join(msgs)}" for where, msgs in list(found.items())[:5]]
    return "invalid request: " + "; ".join(parts)


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """Return the request body, or None as soon as it passes ``limit`` bytes.

    The body is counted as it arrives rather than trusted from Content-Length, which a
    chunked request does not send and any client can understate. Bodies here are JSON that
    is parsed whole anyway, so holding one (at most ``limit`` bytes) costs nothing extra.
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client left: the app will see an empty body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    """Return an ASGI ``receive`` that yields ``body`` once, then defers to ``receive``
    (which then reports the disconnect when the client goes away)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class Observe:
    """ASGI middleware: refuses bodies over the limit (413) and records request counts and
    latencies per endpoint."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        began = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        limit = self.state.config.max_body_bytes
        body = await _read_body(receive, limit)
        if body is None:
            response = _problem(413, f"request body over {limit} bytes")
            await response(scope, receive, send_and_note)
        else:
            await self.app(scope, _replay(body, receive), send_and_note)
        metrics = self.state.metrics
        metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - began)


def _settle(future: asyncio.Future, results: Results | None, error: BaseException | None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable:
    """Return a Job.done callback that hands the outcome to ``future`` on ``loop``."""

    def done(results: Results | None, error: BaseException | None) -> None:
        # RuntimeError: the loop closed during shutdown, and nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, results, error)

    return done


def create_app(
    config: ServeConfig, served: Served, registry_factory: RegistryFactory | None = None
) -> FastAPI:
    """Return the server's ASGI app serving ``served``.

    With ``registry_factory`` and ``config.bundle`` naming an alias (not a directory), the
    app polls the registry every ``config.poll_seconds`` and hot-reloads when it moves.
    The batcher and reloader start and stop with the app's lifespan.
    """
    metrics = ServeMetrics()
    state = ServerState(config, served, metrics)
    predict_request = request_model(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        follow = registry_factory is not None and not is_directory_ref(config.bundle)
        if follow and config.poll_seconds > 0:
            state.reloader = Reloader(
                config.bundle,
                config.tasks,
                config.backend,
                registry_factory,
                lambda: state.served,
                state.swap,
                metrics,
                config.poll_seconds,
            )
            state.reloader.start()
        state.started = True
        log.info("serving bundle %s: %s", state.served.id[:12], ", ".join(served.bundle.tasks))
        try:
            yield
        finally:
            state.draining = True
            if state.reloader is not None:
                await asyncio.to_thread(state.reloader.stop)
            await asyncio.to_thread(state.batcher.stop, config.drain_seconds)
            log.info("stopped")

    app = FastAPI(
        title="mtreg serve",
        version=__version__,
        description="One merged multi-task BERT bundle answering every task's requests.",
        lifespan=lifespan,
    )
    app.state.server = state

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _problem(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    errors: dict[int | str, dict[str, Any]] = {
        413: {"model": Problem, "description": "Request body too large."},
        422: {"model": Problem, "description": "Malformed JSON or a request not fitting "
              "the bundle (unknown task, bad input, empty or oversized text)."},
        503: {"model": Problem, "description": "Queue full or shutting down; see Retry-After.",
              "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    }  # fmt: skip

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=errors,
        summary="Predict tasks for inputs",
    )
    async def predict(body: predict_request) -> Any:  # type: ignore[valid-type]
        """Run the requested tasks (default: every task that reads the input) on each input.

        Requests for different tasks share micro-batches: the trunk runs once per batch, and
        each branch only on the inputs that asked for it.
        """
        served = state.served  # the bundle this request is admitted to, even across a swap
        try:
            rows = plan_rows(
                served.bundle, body.inputs, body.tasks, config.max_text_chars, body.logits
            )
        except BadRequest as exc:
            return _problem(422, str(exc))
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        retry = {"Retry-After": str(config.retry_after_s)}
        try:
            state.batcher.submit(Job(served.bundle, rows, _deliver(loop, future)))
        except QueueFull as exc:
            metrics.rejected.inc()
            return _problem(503, str(exc), retry)
        except ShuttingDown as exc:
            return _problem(503, str(exc), retry)
        for task in {t for row in rows for t in row.tasks}:
            metrics.task_requests.labels(task=task).inc()
        try:
            results = await future
        except ShuttingDown as exc:
            return _problem(503, str(exc), retry)
        except RuntimeError as exc:
            return _problem(500, str(exc))
        return {"bundle": served.id, "results": results}

    @app.get("/v1/tasks", response_model=TasksResponse, summary="The tasks served")
    async def tasks() -> Any:
        """Tasks of the bundle serving now: versions, head kinds, labels, inputs."""
        served = state.served
        out = [
            TaskOut(
                name=info.name,
                version=info.version,
                kind=info.head.kind,
                labels=list(info.head.labels),
                inputs=list(info.inputs),
                fork_depth=info.fork_depth,
                max_length=info.max_length,
            )
            for info in served.bundle.info.values()
        ]
        return TasksResponse(bundle=served.id, tasks=out)

    @app.get("/healthz", response_model=Status, summary="Liveness")
    async def healthz() -> Any:
        """200 while the process answers."""
        return Status(status="ok")

    @app.get(
        "/readyz",
        response_model=Status,
        responses={503: {"model": Status, "description": "Starting or draining."}},
        summary="Readiness",
    )
    async def readyz() -> Any:
        """200 when a bundle is loaded and the server takes requests; 503 while draining."""
        if state.draining or not state.started:
            status = "draining" if state.draining else "starting"
            return JSONResponse({"status": status, "bundle": state.served.id}, 503)
        return Status(status="ready", bundle=state.served.id)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
        summary="Prometheus metrics",
    )
    async def metrics_text() -> Response:
        """Requests, latency, batch sizes, queue depth, per-task counts, reloads."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Observe, state=state)
    return app
