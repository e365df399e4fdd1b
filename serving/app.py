"""The ASGI application of ``mtreg serve`` (FastAPI; its OpenAPI spec is /openapi.json).

Endpoints: POST /v1/predict, GET /v1/tasks, /healthz (alive), /readyz (loaded and not
draining), /metrics (Prometheus), and the Open Inference Protocol under /v2
(:mod:`mtreg.serving.v2`). Handlers only check requests and queue them (through
:mod:`mtreg.serving.dispatch`); inference runs in the batcher's thread.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtreg import __version__
from mtreg.runtime.bundle import LoadedBundle
from mtreg.runtime.inference import encode_rows
from mtreg.serving import v2
from mtreg.serving.access import NOTE, AccessLog, RequestNote
from mtreg.serving.batcher import Batcher
from mtreg.serving.body import BodyRefused, read_body, replay
from mtreg.serving.config import ServeConfig
from mtreg.serving.dispatch import Refused, dispatch, refuse_if_draining
from mtreg.serving.metrics import Mirror, ServeMetrics
from mtreg.serving.plan import BadRequest, plan_rows
from mtreg.serving.reload import RegistryFactory, Reloader, Served, is_directory_ref
from mtreg.serving.schemas import (
    PredictResponse,
    Problem,
    Status,
    TaskOut,
    TasksResponse,
    request_model,
    validation_message,
)

log = logging.getLogger("mtreg.serving")

ENDPOINTS = {"/v1/predict", "/v1/tasks", "/healthz", "/readyz", "/metrics"}


class ServerState:
    """What the handlers share: the bundle serving now, the batcher, metrics, reloader.

    With ``registry_factory`` and ``config.bundle`` naming an alias (not a directory),
    :meth:`start` also starts polling the registry for hot reload.
    """

    def __init__(
        self,
        config: ServeConfig,
        served: Served,
        registry_factory: RegistryFactory | None,
        mirror: Mirror | None = None,
    ) -> None:
        self.config = config
        self.served = served
        self.registry_factory = registry_factory
        self.metrics = ServeMetrics(mirror)
        self.draining = False
        self.started = False
        self.reloader: Reloader | None = None
        self.batcher = Batcher(
            LoadedBundle.run,
            self.metrics,
            config.max_batch_size,
            config.max_wait_ms,
            config.queue_size,
            prepare=partial(encode_rows, buckets=config.length_buckets),
            pipeline=config.tokenizer_thread,
        )
        self.metrics.watch_queue(lambda: self.batcher.depth)
        self.metrics.serving(served.id)
        log_to = config.access_log
        self.access_log = AccessLog.open(log_to, self.metrics) if log_to else None

    def swap(self, served: Served) -> None:
        """Serve ``served`` from the next request on (one assignment: atomic)."""
        self.served = served
        self.metrics.serving(served.id)

    def start(self) -> None:
        """Start the inference thread and, when following an alias, the reloader."""
        config = self.config
        self.batcher.start()
        follow = self.registry_factory is not None and not is_directory_ref(config.bundle)
        if follow and config.poll_seconds > 0:
            self.reloader = Reloader(
                config.bundle,
                config.tasks,
                config.backend,
                self.registry_factory,
                lambda: self.served,
                self.swap,
                self.metrics,
                config.poll_seconds,
                config.device,
            )
            self.reloader.start()
        self.started = True
        log.info("serving bundle %s: %s", self.served.id[:12], ", ".join(self.served.bundle.tasks))

    async def stop(self) -> None:
        """Refuse new work (readiness turns 503), stop the reloader, drain the queue."""
        self.draining = True
        if self.reloader is not None:
            await asyncio.to_thread(self.reloader.stop)
        await asyncio.to_thread(self.batcher.stop, self.config.drain_seconds)
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)
        log.info("stopped")


def server_state(request: Request) -> ServerState:
    """Return the state of the app that received ``request`` (a FastAPI dependency)."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


def problem(
    status: int, detail: str, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    """Return the problem response every refusal of the server has: ``{"detail": ...}``,
    or the Open Inference Protocol's ``{"error": ...}`` for a ``path`` under ``/v2``."""
    if path.startswith(v2.PREFIX):
        return v2.oip_error(status, detail, headers)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _endpoint(scope: dict) -> str:
    """The endpoint label of a request: the path template of the route that answered it
    (``/v2/models/{task}/infer``, never the path itself, so that the label's values are
    bounded), a known path refused before routing, or ``other``."""
    route = scope.get("route")
    if route is not None:
        return route.path
    return scope["path"] if scope["path"] in ENDPOINTS else "other"


class Observe:
    """ASGI middleware: refuses bodies over the size limit (413) or arriving too slowly
    (408), closes every connection a draining server answers, and records request counts
    and latencies per endpoint."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, arrived = time.perf_counter(), time.time()
        status = {"code": 500}
        note = RequestNote()
        NOTE.set(note)  # this request's task: the handler fills the note in

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if self.state.draining:
                    # Its next request must go elsewhere, not to a connection about to close.
                    headers = [*message.get("headers", []), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            await send(message)

        body = await self._body(receive, scope["path"])
        if isinstance(body, bytes):
            await self.app(scope, replay(body, receive), send_and_note)
        else:
            await body(scope, receive, send_and_note)
        seconds = time.perf_counter() - began
        endpoint = _endpoint(scope)
        metrics = self.state.metrics
        metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
        metrics.latency.labels(endpoint=endpoint).observe(seconds)
        if self.state.access_log is not None:
            self.state.access_log.record(note.entry(scope, status["code"], seconds, arrived))

    async def _body(self, receive: Callable, path: str) -> bytes | JSONResponse:
        """Return the request body, or the problem refusing it (:func:`read_body`)."""
        config = self.state.config
        body = await read_body(receive, config.max_body_bytes, config.body_timeout_s)
        if not isinstance(body, BodyRefused):
            return body
        if body.reason is not None:
            self.state.metrics.dropped.labels(reason=body.reason).inc()
        return problem(body.status, body.detail, body.headers or None, path)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the batcher (and the reloader) while the app runs; drain them at shutdown."""
    state: ServerState = app.state.server
    state.start()
    try:
        yield
    finally:
        await state.stop()


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Return a 422 problem naming the invalid fields."""
    return problem(422, validation_message(exc))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Return an HTTP error (404, 405, ...) as a problem body."""
    headers = getattr(exc, "headers", None)
    return problem(exc.status_code, str(exc.detail), headers, request.url.path)


ERRORS: dict[int | str, dict[str, Any]] = {
    408: {"model": Problem, "description": "Request body not complete in time."},
    413: {"model": Problem, "description": "Request body too large."},
    422: {"model": Problem, "description": "Malformed JSON or a request not fitting "
          "the bundle (unknown task, bad input, empty or oversized text)."},
    503: {"model": Problem, "description": "Queue full or shutting down; see Retry-After.",
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
}  # fmt: skip


async def answer(body: Any, state: ServerState) -> Any:
    """Plan ``body`` (a request of :func:`request_model`) against the bundle serving now,
    queue it and wait for its results.

    Returns:
        The response body, or a problem response: 422 (the request does not fit the
        bundle), 503 (queue full, shutting down) or 500 (inference failed).
    """
    served = state.served  # the bundle this request is admitted to, even across a swap
    try:
        refuse_if_draining(state)
        rows = plan_rows(
            served.bundle,
            body.inputs,
            body.tasks,
            state.config.max_text_chars,
            body.logits,
            body.versions,
            body.key,
        )
        results = await dispatch(state, served, rows)
    except BadRequest as exc:
        return problem(422, str(exc))
    except Refused as exc:
        return problem(exc.status, str(exc), exc.headers)
    return {"bundle": served.id, "results": results}


def predict_router(config: ServeConfig) -> APIRouter:
    """Return the router of POST /v1/predict.

    Its body is the request model built from ``config``, so that the limits show in the
    spec and are enforced before a request reaches :func:`answer`; FastAPI reads a body's
    model from the handler's signature, hence a handler per config.
    """
    body_model = request_model(config)
    router = APIRouter()

    @router.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        summary="Predict tasks for inputs",
    )
    async def predict(body: body_model, state: State) -> Any:  # type: ignore[valid-type]
        """Run the requested tasks (default: every task that reads the input) on each input.

        Requests for different tasks share micro-batches: the trunk runs once per batch, and
        each branch only on the inputs that asked for it.
        """
        return await answer(body, state)

    return router


router = APIRouter()


@router.get("/v1/tasks", response_model=TasksResponse, summary="The tasks served")
async def tasks(state: State) -> Any:
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


@router.get("/healthz", response_model=Status, summary="Liveness")
async def healthz() -> Any:
    """200 while the process answers."""
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    responses={503: {"model": Status, "description": "Starting or draining."}},
    summary="Readiness",
)
async def readyz(state: State) -> Any:
    """200 when a bundle is loaded and the server takes requests; 503 while draining."""
    if state.draining or not state.started:
        status = "draining" if state.draining else "starting"
        return JSONResponse({"status": status, "bundle": state.served.id}, 503)
    return Status(status="ready", bundle=state.served.id)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
async def metrics_text(state: State) -> Response:
    """Requests, latency, batch sizes, queue depth, per-task counts, reloads."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(
    config: ServeConfig,
    served: Served,
    registry_factory: RegistryFactory | None = None,
    mirror: Mirror | None = None,
) -> FastAPI:
    """Return the server's ASGI app serving ``served``.

    With ``registry_factory`` and ``config.bundle`` naming an alias (not a directory), the
    app polls the registry every ``config.poll_seconds`` and hot-reloads when it moves.
    The batcher and reloader start and stop with the app's lifespan. Its metrics are also
    recorded on ``mirror`` when one is given (:class:`~mtreg.serving.metrics.Mirror`).
    """
    app = FastAPI(
        title="mtreg serve",
        version=__version__,
        description="One merged multi-task BERT bundle answering every task's requests.",
        lifespan=lifespan,
        exception_handlers={
            RequestValidationError: invalid_request,
            StarletteHTTPException: http_error,
        },
    )
    state = ServerState(config, served, registry_factory, mirror)
    app.state.server = state
    app.include_router(predict_router(config))
    app.include_router(router)
    app.include_router(v2.router)
    app.add_middleware(Observe, state=state)
    return app
