"""Request and response bodies of the HTTP API, as pydantic models (the OpenAPI spec).

The request model is built per server so that its limits (inputs per request, text
length) appear in the spec and are enforced before a request reaches the queue.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time.

from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from mtreg.serving.config import ServeConfig

TaskName = Annotated[str, StringConstraints(min_length=1, max_length=200)]


def request_model(config: ServeConfig) -> type[BaseModel]:
    """Return the PredictRequest model enforcing ``config``'s limits."""
    text = Annotated[
        str, StringConstraints(min_length=1, max_length=config.max_text_chars, pattern=r"\S")
    ]
    pair = Annotated[list[text], Field(min_length=2, max_length=2)]
    fields = Annotated[dict[str, text], Field(min_length=1, max_length=8)]

    class PredictRequest(BaseModel):
        """Inputs and, optionally, the tasks to run on each (default: every task that
        reads that kind of input)."""

        model_config = ConfigDict(
            strict=True,
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {"inputs": ["the movie was great"], "tasks": None},
                    {"inputs": [["a man plays", "someone is playing"]], "logits": True},
                ]
            },
        )

        inputs: Annotated[
            list[text | pair | fields],
            Field(
                min_length=1,
                max_length=config.max_inputs,
                description="Texts, [text, pair] lists, or {field: text} objects.",
            ),
        ]
        tasks: Annotated[
            list[TaskName] | None,
            Field(min_length=1, max_length=256, description="Task names (default: all)."),
        ] = None
        logits: Annotated[bool, Field(description="Add raw logits to each result.")] = False
        versions: Annotated[
            dict[TaskName, Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None,
            Field(
                max_length=256,
                description="Pin tasks to a version the bundle serves (task -> version).",
            ),
        ] = None
        key: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=256,
                description="Routing key of a sticky canary split (when an input lacks the "
                "release's key field).",
            ),
        ] = None

    return PredictRequest


class PredictResponse(BaseModel):
    """Per input, per task: ``label``/``score`` (classification), ``labels``/``scores``
    (multi-label), ``value`` (regression) or ``spans`` (tagging)."""

    bundle: str = Field(description="Id of the bundle that answered.")
    results: list[dict[str, dict[str, Any]]]


class TaskOut(BaseModel):
    """One task of the served bundle."""

    name: str
    version: str
    kind: str
    labels: list[str]
    inputs: list[str]
    fork_depth: int
    max_length: int


class TasksResponse(BaseModel):
    """The tasks the server answers."""

    bundle: str
    tasks: list[TaskOut]


class Status(BaseModel):
    """A health or readiness answer."""

    status: str
    bundle: str | None = None


class Problem(BaseModel):
    """An error: what is wrong, in one sentence."""

    detail: str


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """One line naming each invalid field of a request body (without echoing the input).

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
