"""The Open Inference Protocol endpoints (``/v2``), beside mtreg's own ``/v1``.

Each task of the served bundle is a model; its versions are those the bundle holds. An
inference request is checked and planned here, then queued through the same path as
``/v1/predict`` (:func:`mtreg.serving.dispatch.dispatch`): requests of both protocols share
micro-batches and get the same answers. Every refusal is ``{"error": "..."}`` with a 4xx
status (503 while draining or when the queue is full); the tensor formats are in
:mod:`mtreg.serving.oip`.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mtreg import __version__
from mtreg.artifacts.manifest import TaskEntry
from mtreg.errors import NotFound
from mtreg.serving.dispatch import Host, Refused, count_errors, dispatch, refuse_if_draining
from mtreg.serving.oip import (
    Error,
    InferRequest,
    InferResponse,
    Invalid,
    ModelMetadata,
    Output,
    ServerMetadata,
    decode_inputs,
    encode_outputs,
    inline_schema,
    model_tensors,
    parse_request,
    select_outputs,
    split_body,
)
from mtreg.serving.plan import BadRequest, plan_rows
from mtreg.serving.reload import Served

PREFIX = "/v2"
# The binary tensor data extension is read for inputs; outputs are always JSON.
EXTENSIONS = ["binary_tensor_data"]
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "A request the model cannot answer."},
    404: {"model": Error, "description": "No such model (task) or version."},
    503: {"model": Error, "description": "Starting, draining or queue full."},
}


def oip_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Return the refusal every v2 endpoint has: ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _host(request: Request) -> Host:
    return request.app.state.server


def versions(served: Served, task: str) -> list[str]:
    """Return the versions of ``task`` the bundle serving holds: its stable version, and
    its release's candidate when it has one."""
    bundle = served.bundle
    release = bundle.releases.get(task)
    stable = [bundle.info[task].version]
    return stable if release is None else [*stable, release.candidate.version]


def _model(served: Served, task: str, version: str | None) -> TaskEntry:
    """Return the entry of ``task`` at ``version`` (default: its stable version) in the
    bundle serving.

    Raises:
        Invalid: 404, a task or version the bundle does not hold.
    """
    bundle = served.bundle
    if task not in bundle.info:
        held = ", ".join(bundle.tasks)
        raise Invalid(404, f"unknown model {task[:100]!r}: this server has {held}")
    try:
        return bundle.branches[bundle.branch(task, version)]
    except NotFound:
        held = ", ".join(versions(served, task))
        missing = f"model {task!r} has no version {str(version)[:50]!r}: it has {held}"
        raise Invalid(404, missing) from None


def _not_ready(host: Host) -> JSONResponse | None:
    if host.draining or not host.started:
        return oip_error(503, "draining" if host.draining else "starting")
    return None


router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol (v2)"], responses=ERRORS)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> Any:
    """The server's name, version and the protocol extensions it supports."""
    return ServerMetadata(name="mtreg", version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", summary="Liveness (v2)")
async def live() -> Any:
    """200 while the process answers."""
    return {"live": True}


@router.get("/health/ready", summary="Readiness (v2)")
async def ready(request: Request) -> Any:
    """200 when a bundle is loaded and requests are taken; 503 starting or draining."""
    return _not_ready(_host(request)) or {"ready": True}


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(InferRequest)}},
    }
}


@router.get("/models/{task}", response_model=ModelMetadata, summary="Model metadata")
async def model_metadata(task: str, request: Request) -> Any:
    """A task's versions, inputs and outputs (see the README for each head kind's)."""
    return _metadata(_host(request).served, task, None)


@router.get(
    "/models/{task}/versions/{version}", response_model=ModelMetadata, summary="Model metadata"
)
async def version_metadata(task: str, version: str, request: Request) -> Any:
    """One version's inputs and outputs; 404 for a version the bundle does not hold."""
    return _metadata(_host(request).served, task, version)


@router.get("/models/{task}/ready", summary="Model readiness")
async def model_ready(task: str, request: Request) -> Any:
    """200 when the server is ready and serves the task; 404 if it does not."""
    return _model_ready(_host(request), task, None)


@router.get("/models/{task}/versions/{version}/ready", summary="Model version readiness")
async def version_ready(task: str, version: str, request: Request) -> Any:
    """200 when the server is ready and serves this version of the task."""
    return _model_ready(_host(request), task, version)


@router.post(
    "/models/{task}/infer",
    response_model=InferResponse,
    summary="Inference",
    openapi_extra=INFER_BODY,
)
async def infer(task: str, request: Request) -> Any:
    """Run a task on a batch of texts (BYTES inputs; JSON or binary tensor data).

    Requests share micro-batches with every other request, ``/v1`` ones included.
    """
    return await _infer(request, task, None)


@router.post(
    "/models/{task}/versions/{version}/infer",
    response_model=InferResponse,
    summary="Inference by one version",
    openapi_extra=INFER_BODY,
)
async def version_infer(task: str, version: str, request: Request) -> Any:
    """Run one version of a task; 404 for a version the bundle does not hold."""
    return await _infer(request, task, version)


def _metadata(served: Served, task: str, version: str | None) -> Any:
    try:
        info = _model(served, task, version)
    except Invalid as exc:
        return oip_error(exc.status, str(exc))
    inputs, outputs = model_tensors(info)
    extras = {"head_kind": info.head.kind, "labels": list(info.head.labels), "bundle": served.id}
    return ModelMetadata(
        name=task,
        versions=versions(served, task),
        platform="mtreg",
        inputs=inputs,
        outputs=outputs,
        parameters=extras,
    )


def _model_ready(host: Host, task: str, version: str | None) -> Any:
    try:
        _model(host.served, task, version)
    except Invalid as exc:
        return oip_error(exc.status, str(exc))
    return _not_ready(host) or {"name": task, "ready": True}


async def _infer(request: Request, task: str, version: str | None) -> Any:
    """Check, plan, queue and answer one inference request (see :func:`infer`)."""
    host = _host(request)
    served = host.served  # the bundle this request is admitted to, even across a swap
    info = None
    try:
        refuse_if_draining(host)
        info = _model(served, task, version)
        header, binary = split_body(
            await request.body(), request.headers.get("inference-header-content-length")
        )
        body = parse_request(header)
        config = host.config
        items = decode_inputs(body, binary, info, config.max_inputs, config.max_text_chars)
        outputs = select_outputs(body, info)
        logits = any(o.logits for o in outputs)
        pin = {task: info.version} if version is not None else None
        key = (body.parameters or {}).get("key")
        routing = key if isinstance(key, str) else None
        rows = plan_rows(served.bundle, items, [task], config.max_text_chars, logits, pin, routing)
        results = await dispatch(host, served, rows)
    except (Invalid, BadRequest) as exc:
        if info is not None:
            count_errors(host.metrics, {task: info.version}, "bad_request")
        return oip_error(getattr(exc, "status", 400), str(exc))
    except Refused as exc:
        return oip_error(exc.status, str(exc), exc.headers)
    return JSONResponse(_answer(served, info, body, outputs, results))


def _answer(
    served: Served,
    info: TaskEntry,
    body: InferRequest,
    outputs: tuple[Output, ...],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """Return the inference response: the version that answered (the stable one when a
    canary split the batch; ``parameters.versions`` then says which answered each input)."""
    answered = [result[info.name].get("version", info.version) for result in results]
    parameters: dict[str, Any] = {"bundle": served.id}
    if info.name in served.bundle.releases:
        parameters["versions"] = answered
    single = set(answered) == {answered[0]}
    answer = {
        "model_name": info.name,
        "model_version": answered[0] if single else served.bundle.info[info.name].version,
        "parameters": parameters,
        "outputs": encode_outputs(info, outputs, results),
    }
    if body.id is not None:
        answer["id"] = body.id
    return answer
