"""Request and response bodies of the HTTP API, as pydantic models (the OpenAPI spec).

The request model is built per server so that its limits (inputs per request, text
length) appear in the spec and are enforced before a request reaches the queue.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time.

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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
