"""``gate.json``: the quality gate of a bundle's reduced-precision backends (format
``mtreg-gate`` 1).

The gate lives in the bundle's ONNX cache folder (``cache/onnx/<bundle id>/``) beside the
graphs it scored, and that folder's ``onnx.json`` lists ``gate.json`` among the files it
hashes: loading and ``mtreg verify`` refuse an edited gate as they refuse an edited graph
(:mod:`mtreg.artifacts.onnx_info`). It records, per backend, whether it ran here (and why
not), its measured seconds per batch at each probe size, and per task its agreement with
torch fp32 on the task's dev split, the task metric of both, and whether it is eligible
(:data:`TOLERANCE`). Which backend serves is decided at load from this record
(:mod:`mtreg.runtime.backends`); computing it is :mod:`mtreg.runtime.gate`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtreg.errors import Damaged

GATE_FILE = "gate.json"
FORMAT = "mtreg-gate"
FORMAT_VERSION = 1
REFERENCE = "torch"
# Every backend the gate scores -> the graph file it runs (None: the torch weights).
BACKEND_FILES: Mapping[str, str | None] = {
    "torch": None,
    "torch-bf16": None,
    "onnx-fp32": "model.onnx",
    "onnx-int8": "model.int8.onnx",
    "onnx-int8-pc": "model.int8-pc.onnx",
    "onnx-int8-static": "model.int8-static.onnx",
    "onnx-int8-static-pc": "model.int8-static-pc.onnx",
}
PROBE_SIZES = (1, 32)
# The fastest backend the gate finds eligible for every loaded task (torch without a gate).
FASTEST = "fastest"
# Every backend a bundle loads on (``onnx`` and ``auto`` also run a folder's own export).
BACKENDS = (FASTEST, *BACKEND_FILES, "onnx", "auto")


@dataclass(frozen=True)
class Tolerance:
    """How far a backend may stray from torch fp32 on a task's dev split and stay eligible.

    Attributes:
        metric_drop: the most the task's primary metric may fall (0.005: half a point of a
            metric in 0..1; lower-is-better metrics such as mse count a rise as the drop).
        agreement: the least share of dev predictions equal to fp32's (regression: the
            Pearson correlation of the two backends' outputs).
    """

    metric_drop: float = 0.005
    agreement: float = 0.99


# Both bounds hold at once: agreement >= 99% caps how much any count-based metric can move
# (at most 1 point of accuracy), and the 0.5-point metric bound is what a user compares
# versions by (the registry's own tolerances are of that size), so no gated backend changes
# a task's reported quality by more than the noise of re-training it.
TOLERANCE = Tolerance()


@dataclass(frozen=True)
class TaskScore:
    """One backend on one task's dev split: ``agreement`` with fp32, the primary ``metric``
    (named ``metric_name``) of this backend and of fp32 (``reference``), the ``drop`` from
    fp32 (positive: worse) and whether it is ``eligible`` within the gate's tolerance."""

    agreement: float
    metric_name: str
    metric: float
    reference: float
    drop: float
    eligible: bool


@dataclass(frozen=True)
class BackendGate:
    """One backend: ``reason`` why it could not run here (None when it ran), its measured
    ``seconds`` per batch at each probe size, and its ``tasks``' scores."""

    reason: str | None = None
    seconds: Mapping[int, float] = field(default_factory=dict)
    tasks: Mapping[str, TaskScore] = field(default_factory=dict)

    def eligible(self, tasks: list[str]) -> bool:
        """True when the backend ran and is eligible for every one of ``tasks``."""
        return self.reason is None and all(
            name in self.tasks and self.tasks[name].eligible for name in tasks
        )


@dataclass(frozen=True)
class Gate:
    """A bundle's gate: the ``bundle`` id it scored, the ``tolerance`` it applied, the
    train examples per task the static quantisation was calibrated on (``calibration``),
    when it was ``created`` (ISO 8601) and each backend's :class:`BackendGate`."""

    bundle: str
    tolerance: Tolerance
    calibration: int
    created: str
    backends: Mapping[str, BackendGate]

    def write(self, folder: Path) -> Path:
        """Write ``gate.json`` into ``folder`` (canonical JSON); return its path."""
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        path = Path(folder) / GATE_FILE
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return path


def read_gate(folder: Path) -> Gate | None:
    """Return the gate in ``folder``, or None when there is none. The caller has checked
    its hash against the folder's ``onnx.json``.

    Raises:
        Damaged: a ``gate.json`` that is unreadable or not this format.
    """
    path = Path(folder) / GATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if (data["format"], data["format_version"]) != (FORMAT, FORMAT_VERSION):
            raise ValueError("format")
        return Gate(
            bundle=str(data["bundle"]),
            tolerance=Tolerance(**data["tolerance"]),
            calibration=int(data["calibration"]),
            created=str(data["created"]),
            backends={name: _backend(name, value) for name, value in data["backends"].items()},
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise Damaged(
            f"{path} is not a {FORMAT} v{FORMAT_VERSION} record: compute it again with "
            "`mtreg bundle gate`"
        ) from None


def _backend(name: str, value: Any) -> BackendGate:
    if name not in BACKEND_FILES:
        raise ValueError(name)
    return BackendGate(
        reason=None if value["reason"] is None else str(value["reason"]),
        seconds={int(size): float(s) for size, s in value["seconds"].items()},
        tasks={task: TaskScore(**score) for task, score in value["tasks"].items()},
    )
