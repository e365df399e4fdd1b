"""Computing a bundle's quality gate: every backend scored on each task's dev split against
torch fp32, and timed at the probe batch sizes.

The graphs go into the bundle's ONNX cache folder (an ``mtreg export --format onnx``
folder plus :mod:`mtreg.runtime.quantize`'s variants), and ``gate.json``
(:mod:`mtreg.artifacts.gate_file`) is written there last and listed in the folder's
``onnx.json``, so that a half-computed gate is never read and an edited one is refused.
The task metric comes from the caller (``score``): metrics live in the training layer.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mtreg import heads
from mtreg.artifacts.bundle_dir import remove_bundle_dir
from mtreg.artifacts.gate_file import (
    BACKEND_FILES,
    GATE_FILE,
    PROBE_SIZES,
    REFERENCE,
    TOLERANCE,
    BackendGate,
    Gate,
    TaskScore,
    Tolerance,
)
from mtreg.artifacts.home import Home
from mtreg.artifacts.manifest import read_bundle_manifest
from mtreg.artifacts.objects import sha256_file
from mtreg.artifacts.onnx_info import OnnxInfo, read_onnx_info
from mtreg.runtime.backends import Bf16Model, OnnxModel, gate_folder
from mtreg.runtime.bundle import LoadedBundle, input_fields, input_problem
from mtreg.runtime.export import export_onnx
from mtreg.runtime.inference import Row, forward_groups
from mtreg.runtime.quantize import write_variants

# Train examples per task the static quantisation calibrates on.
CALIBRATION = 32
# Regression agreement: an output agrees with fp32's within this share of the gold values'
# standard deviation (1%: STS-B's 0..5 scores spread ~1.5, so within 0.015).
REGRESSION_SLACK = 0.01
# Metrics where lower is better: their drop is a rise.
LOWER_IS_BETTER = frozenset({"mse"})
# Timing: at least this many calls per backend and size, and until this many seconds.
_MIN_CALLS, _MIN_SECONDS = 3, 0.5
# A backend whose first timed call takes this many times torch fp32's median stops there:
# fp32 is always eligible, so it cannot be chosen at that size, and such backends (bf16,
# emulated on CPUs without AVX-512 BF16 or AMX) took most of the gate's timing on MiniLM.
_CLEARLY_SLOWER = 2.0
# Rows per forward pass when scoring the dev splits.
_DEV_BATCH = 32

Score = Callable[[Sequence[str], Sequence[Any], Sequence[Any]], Mapping[str, float]]


@dataclass(frozen=True)
class TaskData:
    """A task's data for the gate: its ``metrics`` (the first is the one gated), its dev
    examples and a few train examples to calibrate static quantisation on (each example a
    mapping of the task's input fields and ``label``, as a plugin's loader gives them)."""

    metrics: tuple[str, ...]
    dev: Sequence[Mapping[str, Any]]
    calibration: Sequence[Mapping[str, Any]]


def _readable(data: Mapping[str, TaskData], loaded: LoadedBundle) -> dict[str, TaskData]:
    """Return ``data`` without the dev examples no backend can read (an empty text: real
    data sets hold a few)."""
    return {
        task: replace(d, dev=[e for e in d.dev if input_problem(e, loaded.info[task]) is None])
        for task, d in data.items()
    }


def compute_gate(
    source: Path,
    bundle_id: str,
    data: Mapping[str, TaskData],
    score: Score,
    home: Home | None = None,
    tolerance: Tolerance = TOLERANCE,
) -> Gate:
    """Export and quantise bundle ``source`` (whose id is ``bundle_id``) into its gate
    folder under ``home``, score every backend on each task's dev data against torch fp32,
    time it at batch 1 and 32, and write ``gate.json`` there.

    Returns:
        The :class:`Gate` written.

    Raises:
        NotFound: a task of ``data`` the bundle does not hold. MtregError: onnx or
            onnxruntime missing, or a metric ``score`` refuses. Damaged: the source bundle
            differs from its manifest or id.
    """
    folder = gate_folder(bundle_id, home)
    remove_bundle_dir(folder)  # a previous export or gate of this bundle is redone whole
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The one export written inside a home on purpose: its ONNX cache, which verify checks.
    export_onnx(source, folder, quantize="int8", expected_id=bundle_id, homes=())
    loaded = LoadedBundle(source, None, "torch", expected_id=bundle_id)
    data = _readable(data, loaded)
    calibration = {task: list(d.calibration) for task, d in data.items()}
    failed = write_variants(loaded, folder, calibration)
    # Tracing for export changes the traced torch model's outputs: score a fresh one.
    loaded = LoadedBundle(source, None, "torch", expected_id=bundle_id)
    _, folder_id = read_bundle_manifest(folder)
    info = _list_files(folder, read_onnx_info(folder), [])
    reference = loaded.model
    models = _models(folder, folder_id, info, reference, failed)
    probe = _timing_batch(loaded, data)
    outputs = {name: _dev_outputs(loaded, model, data) for name, model in models.items()}
    backends = {}
    for name in BACKEND_FILES:
        if name in failed:
            backends[name] = BackendGate(reason=failed[name])
            continue
        fp32 = backends[REFERENCE].seconds if name != REFERENCE else {}
        seconds = {
            size: _seconds(models[name], batch, loaded.tasks, fp32.get(size))
            for size, batch in probe
        }
        tasks = {
            task: _task_score(loaded, task, data[task], outputs[REFERENCE][task], out, score)
            for task, out in outputs[name].items()
        }
        tasks = {t: replace(s, eligible=_within(s, tolerance)) for t, s in tasks.items()}
        backends[name] = BackendGate(None, seconds, tasks)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    gate = Gate(bundle_id, tolerance, CALIBRATION, created, backends)
    gate.write(folder)
    _list_files(folder, info, [GATE_FILE])  # written last: the gate now counts
    return gate


def _list_files(folder: Path, info: OnnxInfo, more: list[str]) -> OnnxInfo:
    """Rewrite ``onnx.json`` to hash every graph file now in ``folder`` and ``more``."""
    files = dict(info.files)
    for name in [*filter(None, BACKEND_FILES.values()), *more]:
        if (folder / name).is_file():
            files[name] = sha256_file(folder / name)
    updated = OnnxInfo(info.bundle, info.source, files, info.report)
    updated.write(folder)
    return updated


def _models(
    folder: Path, folder_id: str, info: OnnxInfo, reference: Any, failed: Mapping[str, str]
) -> dict[str, Callable]:
    """Return every backend that could be made, by name; the graphs' hashes were just
    computed (``info``), so they are not hashed again per graph."""
    models: dict[str, Callable] = {REFERENCE: reference, "torch-bf16": Bf16Model(reference)}
    for name, graph in BACKEND_FILES.items():
        if graph is not None and name not in failed:
            models[name] = OnnxModel(folder, folder_id, graph, verified=info)
    return models


def _inputs(examples: Sequence[Mapping[str, Any]], loaded: LoadedBundle, task: str) -> list:
    info = loaded.info[task]
    fields = [input_fields(example, info) or [] for example in examples]
    return [f[0] if len(f) == 1 else tuple(f) for f in fields]


def _timing_batch(
    loaded: LoadedBundle, data: Mapping[str, TaskData]
) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Return one encoded batch per probe size, of the first task's dev inputs (repeated
    when it has fewer), on which every backend runs every task."""
    task = sorted(data)[0]
    inputs = _inputs(data[task].dev, loaded, task)
    batches = []
    for size in PROBE_SIZES:
        chosen = [inputs[i % len(inputs)] for i in range(size)]
        batch = loaded.encode(chosen, loaded.info[task])["batch"]
        batches.append((size, dict(batch)))
    return batches


@torch.inference_mode()
def _seconds(
    model: Callable, batch: dict[str, torch.Tensor], tasks: list[str], reference: float | None
) -> float:
    """Return the median seconds of one call of ``model`` on ``batch`` for ``tasks``, or the
    first call's seconds when that took :data:`_CLEARLY_SLOWER` times ``reference`` (torch
    fp32's median; None for fp32 itself)."""
    call = lambda: model(  # noqa: E731
        batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), tasks=tasks
    )
    call()  # warm-up
    times: list[float] = []
    while len(times) < _MIN_CALLS or sum(times) < _MIN_SECONDS:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
        if reference and times[0] > _CLEARLY_SLOWER * reference:
            break
    return statistics.median(times)


def _dev_rows(
    loaded: LoadedBundle, data: Mapping[str, TaskData]
) -> tuple[list[Row], dict[str, list[int]]]:
    """Return one :class:`Row` per distinct dev input, asking for every task whose dev
    split holds it, and per task the row of each of its dev examples."""
    rows: list[Row] = []
    index: dict[str, int] = {}  # an input's repr -> its row
    where: dict[str, list[int]] = {}
    for task, task_data in data.items():
        where[task] = []
        for item in _inputs(task_data.dev, loaded, task):
            at = index.setdefault(repr(item), len(rows))
            if at == len(rows):
                rows.append(Row(item, ()))
            if task not in rows[at].tasks:
                rows[at] = Row(item, (*rows[at].tasks, task))
            where[task].append(at)
    return rows, where


@torch.inference_mode()
def _dev_outputs(
    loaded: LoadedBundle, model: Callable, data: Mapping[str, TaskData]
) -> dict[str, tuple[list[torch.Tensor], list[Any]]]:
    """Return per task its dev examples' logits (one tensor each) through ``model`` and
    their labels encoded as the head encodes them.

    The dev inputs run as serving's rows do (:func:`forward_groups`): an input that several
    tasks' dev splits hold goes through the trunk once for all of them, and each torch
    branch runs on its own rows only. Scoring task by task ran an ONNX graph, which
    computes every output per call, once per task.
    """
    loaded.model = model
    rows, where = _dev_rows(loaded, data)
    logits: dict[tuple[int, str], torch.Tensor] = {}
    word_ids: dict[tuple[int, str], Any] = {}
    for start in range(0, len(rows), _DEV_BATCH):
        chunk = rows[start : start + _DEV_BATCH]
        for group in forward_groups(loaded, chunk):
            for at, member in enumerate(group.members):
                for task in set(group.tasks) & set(chunk[member].tasks):
                    logits[start + member, task] = group.logits[task][at].float()
                    if "word_ids" in group.encoded:
                        word_ids[start + member, task] = group.encoded["word_ids"][at]
    out = {}
    for task, task_data in data.items():
        info = loaded.info[task]
        kind = heads.get(info.head.kind)
        labels = [
            kind.encode_label(info.head, example["label"], word_ids.get((row, task)))
            for example, row in zip(task_data.dev, where[task], strict=True)
        ]
        out[task] = ([logits[row, task] for row in where[task]], labels)
    return out


def _task_score(
    loaded: LoadedBundle,
    task: str,
    data: TaskData,
    reference: tuple[list[torch.Tensor], list[Any]],
    outputs: tuple[list[torch.Tensor], list[Any]],
    score: Score,
) -> TaskScore:
    head = loaded.info[task].head
    kind = heads.get(head.kind)
    ref_predictions, references = kind.decode(head, *reference)
    predictions, _ = kind.decode(head, *outputs)
    metric = data.metrics[0]
    ref_value = score([metric], ref_predictions, references)[metric]
    value = score([metric], predictions, references)[metric]
    drop = value - ref_value if metric in LOWER_IS_BETTER else ref_value - value
    agreement = _agreement(head.kind, predictions, ref_predictions, references)
    return TaskScore(agreement, metric, value, ref_value, drop, eligible=False)


def _agreement(
    kind: str, predictions: Sequence[Any], reference: Sequence[Any], gold: Sequence[Any]
) -> float:
    """Share of predictions equal to fp32's (tagging: of words). Regression: share of
    outputs within REGRESSION_SLACK of the gold values' standard deviation of fp32's: a
    correlation with fp32 would read noise as disagreement when the outputs barely vary."""
    if kind == "regression":
        a = torch.tensor(predictions, dtype=torch.float64).flatten()
        b = torch.tensor(reference, dtype=torch.float64).flatten()
        spread = float(torch.tensor(gold, dtype=torch.float64).std()) if len(gold) > 1 else 0.0
        slack = REGRESSION_SLACK * (spread if math.isfinite(spread) and spread > 0 else 1.0)
        return float(((a - b).abs() <= slack).double().mean()) if len(a) else 1.0
    if kind == "tagging":
        pairs = [
            (p, r)
            for ps, rs in zip(predictions, reference, strict=True)
            for p, r in zip(ps, rs, strict=True)
        ]
    else:
        pairs = list(zip(predictions, reference, strict=True))
    return sum(p == r for p, r in pairs) / len(pairs) if pairs else 1.0


def _within(score: TaskScore, tolerance: Tolerance) -> bool:
    return score.agreement >= tolerance.agreement and score.drop <= tolerance.metric_drop
