"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API): its bodies as pydantic
models, and the translation between its tensors and mtreg's inputs and results.

A task is a model. Its inputs are BYTES tensors of shape ``[batch]`` (or ``[batch, 1]``),
one per text field the task reads (``text``, or the two fields of a pair task), holding
UTF-8 text as JSON strings or, with the binary tensor data extension, as length-prefixed
bytes after the JSON header. Its outputs depend on its head kind (:data:`OUTPUTS`) and are
read from the same results ``/v1/predict`` answers, so the two protocols agree.
"""

# No `from __future__ import annotations`: FastAPI reads these models' annotations.

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtreg.artifacts.manifest import TaskEntry
from mtreg.core.spec import HeadSpec
from mtreg.runtime.inference import Input
from mtreg.serving.plan import check_text
from mtreg.serving.schemas import validation_message

BYTES = "BYTES"
# Names and lists a client sends are bounded: the limits keep a hostile body cheap to check.
Name = Annotated[str, Field(min_length=1, max_length=200)]
Parameters = Annotated[dict[str, Any], Field(max_length=64)]


class Invalid(Exception):
    """A request the model cannot answer: ``status`` (400 or 404), ``str()`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TensorMetadata(BaseModel):
    """One input or output of a model: its name, datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{task}``; ``parameters`` holds mtreg's extras (head kind, labels,
    the bundle serving)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


class ServerMetadata(BaseModel):
    """``GET /v2``: the server's name, version and protocol extensions."""

    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    """An input tensor of an inference request."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=8)]
    datatype: Name
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """An output an inference request asks for (default: all of the model's)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    parameters: Parameters | None = None


class InferRequest(BaseModel):
    """``POST /v2/models/{task}[/versions/{version}]/infer``."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(max_length=200)] | None = None
    parameters: Parameters | None = None
    inputs: Annotated[list[RequestInput], Field(min_length=1, max_length=8)]
    outputs: Annotated[list[RequestOutput], Field(max_length=16)] | None = None


class ResponseOutput(BaseModel):
    """An output tensor of an inference response (data flattened in row-major order)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferResponse(BaseModel):
    """The answer of an inference request; ``parameters.bundle`` is the bundle's id."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[ResponseOutput]


class Error(BaseModel):
    """Every refusal of the v2 endpoints: what is wrong, in one sentence."""

    error: str


@dataclass(frozen=True)
class Output:
    """One output of a head kind: ``values(head, result)`` gives one input's values from
    its ``/v1`` result; ``width(head)`` is their count (None: one value, shape ``[-1]``);
    ``logits``: the result must hold the raw logits."""

    name: str
    datatype: str
    width: Callable[[HeadSpec], int | None]
    values: Callable[[HeadSpec, Mapping[str, Any]], list[Any]]
    logits: bool = False


def _one(_: HeadSpec) -> None:
    return None


def _labels(head: HeadSpec) -> int:
    return len(head.labels)


def _softmax(_: HeadSpec, result: Mapping[str, Any]) -> list[float]:
    # The classification head's result keeps only the best label's probability; the
    # whole distribution is the same softmax over the logits it was taken from.
    return torch.tensor(result["logits"]).softmax(-1).tolist()


def _regression(head: HeadSpec, result: Mapping[str, Any]) -> list[float]:
    if "value" in result:
        return [result["value"]]
    return [result["values"][label] for label in head.labels]


OUTPUTS: dict[str, tuple[Output, ...]] = {
    "classification": (
        Output("label", BYTES, _one, lambda h, r: [r["label"]]),
        Output("score", "FP32", _one, lambda h, r: [r["score"]]),
        Output("scores", "FP32", _labels, _softmax, logits=True),
    ),
    "multilabel": (
        Output("labels", "BOOL", _labels, lambda h, r: [x in r["labels"] for x in h.labels]),
        Output("scores", "FP32", _labels, lambda h, r: [r["scores"][x] for x in h.labels]),
    ),
    "regression": (
        Output("value", "FP32", lambda h: max(1, len(h.labels)), _regression),
    ),
    "tagging": (
        Output("spans", BYTES, _one, lambda h, r: [json.dumps(r["spans"])]),
    ),
}  # fmt: skip


def _shape(width: int | None, batch: int) -> list[int]:
    return [batch] if width is None else [batch, width]


def model_tensors(info: TaskEntry) -> tuple[list[TensorMetadata], list[TensorMetadata]]:
    """Return the inputs and outputs of task ``info`` as a model's metadata."""
    inputs = [TensorMetadata(name=name, datatype=BYTES, shape=[-1]) for name in info.inputs]
    outputs = [
        TensorMetadata(name=o.name, datatype=o.datatype, shape=_shape(o.width(info.head), -1))
        for o in OUTPUTS[info.head.kind]
    ]
    return inputs, outputs


def parse_request(header: bytes) -> InferRequest:
    """Return the inference request in JSON ``header``.

    Raises:
        Invalid: 400, not JSON or not an inference request (naming the bad fields).
    """
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        raise Invalid(400, validation_message(exc)) from None


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """Return the JSON header and the binary data of a request body; ``header_length`` is
    its ``Inference-Header-Content-Length`` (None: the whole body is JSON).

    Raises:
        Invalid: 400, a header length that is not a size within the body.
    """
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
        raise Invalid(
            400,
            f"Inference-Header-Content-Length {header_length[:20]!r} is not the size of the "
            f"JSON header of this body of {len(body)} bytes",
        )
    size = int(header_length)
    return body[:size], body[size:]


def _elements(raw: bytes, name: str) -> list[bytes]:
    """Split binary BYTES tensor data: each element is a 4-byte little-endian length and
    that many bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise Invalid(400, f"input {name!r}: binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        if at + 4 + size > len(raw):
            raise Invalid(400, f"input {name!r}: binary data ends inside element {len(out)}")
        out.append(raw[at + 4 : at + 4 + size])
        at += 4 + size
    return out


def _flat(data: list[Any], name: str) -> list[Any]:
    """Return ``data`` flattened: a list of texts, or of one-text lists for ``[batch, 1]``."""
    flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
    if any(isinstance(x, list) for x in flat):
        raise Invalid(400, f"input {name!r}: data nested deeper than its shape")
    return flat


def _texts(tensor: RequestInput, raw: bytes | None, max_inputs: int) -> list[Any]:
    """Return the elements of one BYTES input tensor: strings, or bytes from binary data."""
    name = tensor.name
    if tensor.datatype != BYTES:
        raise Invalid(400, f"input {name!r} is {tensor.datatype[:20]}: send BYTES (UTF-8 text)")
    shape = tensor.shape
    if len(shape) > 2 or shape[1:] not in ([], [1]):
        raise Invalid(400, f"input {name!r} has shape {shape}: send [batch] or [batch, 1]")
    if shape[0] == 0:  # shapes are never negative (the model checks it)
        raise Invalid(400, f"input {name!r} has an empty batch: send at least one text")
    if shape[0] > max_inputs:
        raise Invalid(400, f"batch of {shape[0]} inputs: this server takes at most {max_inputs}")
    if raw is not None:
        elements: list[Any] = _elements(raw, name)
    elif tensor.data is not None:
        elements = _flat(tensor.data, name)
    else:
        raise Invalid(400, f"input {name!r} holds no data")
    if len(elements) != shape[0]:
        raise Invalid(400, f"input {name!r} holds {len(elements)} elements, its shape {shape}")
    return elements


def _binary_parts(request: InferRequest, binary: bytes) -> dict[str, bytes]:
    """Return each input's binary data (inputs with ``binary_data_size``, in order)."""
    parts, at = {}, 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise Invalid(400, f"input {tensor.name!r}: binary_data_size must be a byte count")
        parts[tensor.name] = binary[at : at + size]
        at += size
    if at != len(binary):
        raise Invalid(400, f"binary data of {len(binary)} bytes, the inputs' sizes add to {at}")
    return parts


def _decoded(value: Any, where: str, max_chars: int) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(400, f"{where} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise Invalid(400, f"{where} is {type(value).__name__}, not text")
    check_text(value, where, max_chars)
    return value


def decode_inputs(
    request: InferRequest, binary: bytes, info: TaskEntry, max_inputs: int, max_chars: int
) -> list[Input]:
    """Return the inputs of ``request`` for task ``info``: one text, or one tuple of texts
    in the task's field order, per batch element.

    Raises:
        Invalid: 400, an input missing, unknown, repeated, of another datatype or shape,
            holding too many elements or no text. BadRequest: a text the task refuses.
    """
    names = [t.name for t in request.inputs]
    wanted = " and ".join(repr(n) for n in info.inputs)
    for name in names:
        if name not in info.inputs:
            raise Invalid(400, f"model {info.name!r} has no input {name!r}: it takes {wanted}")
        if names.count(name) > 1:
            raise Invalid(400, f"input {name!r} given twice")
    for name in info.inputs:
        if name not in names:
            raise Invalid(400, f"missing input {name!r}: model {info.name!r} takes {wanted}")
    parts = _binary_parts(request, binary)
    columns = {t.name: _texts(t, parts.get(t.name), max_inputs) for t in request.inputs}
    sizes = {len(column) for column in columns.values()}
    if len(sizes) > 1:
        raise Invalid(400, "inputs of different batch sizes")
    texts = [
        [_decoded(value, f"input {name!r}[{i}]", max_chars) for i, value in enumerate(column)]
        for name, column in ((n, columns[n]) for n in info.inputs)
    ]
    if len(texts) == 1:
        return list(texts[0])
    return list(zip(*texts, strict=True))


def select_outputs(request: InferRequest, info: TaskEntry) -> tuple[Output, ...]:
    """Return the outputs ``request`` asks of task ``info`` (all by default).

    Raises:
        Invalid: 400, an output the task's head kind does not have.
    """
    offered = OUTPUTS[info.head.kind]
    if not request.outputs:
        return offered
    by_name = {o.name: o for o in offered}
    for asked in request.outputs:
        if asked.name not in by_name:
            have = ", ".join(by_name)
            raise Invalid(400, f"model {info.name!r} has no output {asked.name!r}: it has {have}")
    return tuple(by_name[name] for name in dict.fromkeys(o.name for o in request.outputs))


def encode_outputs(
    info: TaskEntry, outputs: Sequence[Output], results: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Return the response tensors of ``outputs`` from the batch's per-input results
    (``{task: result}`` as :meth:`mtreg.runtime.bundle.LoadedBundle.run` gives them)."""
    head, batch = info.head, len(results)
    return [
        {
            "name": o.name,
            "datatype": o.datatype,
            "shape": _shape(o.width(head), batch),
            "data": [v for result in results for v in o.values(head, result[info.name])],
        }
        for o in outputs
    ]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Return ``model``'s JSON schema with its ``$defs`` references inlined, for a request
    body the OpenAPI spec describes but FastAPI does not parse (binary bodies)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)
