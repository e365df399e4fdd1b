"""The reduced-precision ONNX graphs a quality gate scores, written beside ``model.onnx``.

``mtreg export --format onnx --quantize int8`` already writes ``model.onnx`` (fp32 with
onnxruntime's fusions) and ``model.int8.onnx`` (dynamic int8, one scale per tensor). The
gate adds dynamic int8 with one scale per output channel, and static int8 (activations'
ranges calibrated on a few TRAIN examples per task, never dev), per tensor and per channel.
Every variant is quantised from the plain, unfused graph: the quantiser does not know the
fused operators. A variant the quantiser cannot make is reported with its reason instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mtreg.artifacts.gate_file import BACKEND_FILES
from mtreg.artifacts.manifest import TaskEntry
from mtreg.runtime.bundle import LoadedBundle, input_fields
from mtreg.runtime.export import probe_batch, write_graph
from mtreg.runtime.inference import GroupKey, group_key

# The static quantiser's calibration batch size.
_CALIBRATION_BATCH = 8


def calibration_feeds(
    loaded: LoadedBundle, examples: dict[str, Sequence[Any]]
) -> list[dict[str, Any]]:
    """Return the graph's input feeds (numpy) for each task's calibration ``examples``
    (train examples: mappings of the task's input fields), encoded as that task reads
    them, in batches of a few. An input that several tasks reading it the same way hold is
    fed once: the graph computes every output on every feed, and a repeated input adds
    nothing to the MinMax ranges the quantiser calibrates (8 tasks on one data set fed
    each input 8 times)."""
    unique: dict[GroupKey, tuple[TaskEntry, dict[str, Any]]] = {}
    for task, rows in sorted(examples.items()):
        info = loaded.info[task]
        _, inputs = unique.setdefault(group_key(info), (info, {}))
        for row in rows:
            if (fields := input_fields(row, info)) is not None:
                inputs.setdefault(repr(fields), tuple(fields) if len(fields) > 1 else fields[0])
    feeds = []
    for info, inputs in unique.values():
        chunks = list(inputs.values())
        for start in range(0, len(chunks), _CALIBRATION_BATCH):
            batch = loaded.encode(chunks[start : start + _CALIBRATION_BATCH], info)["batch"]
            ids = batch["input_ids"]
            types = batch.get("token_type_ids", torch.zeros_like(ids))
            feeds.append(
                {
                    "input_ids": ids.numpy(),
                    "attention_mask": batch["attention_mask"].numpy(),
                    "token_type_ids": types.numpy(),
                }
            )
    return feeds


class _Reader:
    """onnxruntime's CalibrationDataReader over prepared feeds (only the graph's inputs)."""

    def __init__(self, feeds: list[dict[str, Any]], inputs: set[str]) -> None:
        self._feeds: Iterator[dict[str, Any]] = iter(
            [{k: v for k, v in feed.items() if k in inputs} for feed in feeds]
        )

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # called by newer onnxruntime versions between passes
        pass


def write_variants(
    loaded: LoadedBundle, folder: Path, calibration: dict[str, Sequence[Any]]
) -> dict[str, str]:
    """Write the gate's extra int8 graphs (per-channel dynamic, static per tensor and per
    channel) into export folder ``folder`` from ``loaded``'s torch model.

    Returns:
        backend name -> why its graph could not be made, for each that failed.
    """
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    plain = folder / ".plain.onnx"
    write_graph(loaded, loaded.tasks, probe_batch(loaded), plain)
    inputs = {i.name for i in onnxruntime.InferenceSession(str(plain)).get_inputs()}
    feeds = calibration_feeds(loaded, calibration)
    # The activation ranges do not depend on how weights are quantised: the per-channel
    # static variant reads the ranges the per-tensor one calibrated, not a second pass
    # (onnxruntime's calibration cache; older versions without it calibrate twice).
    ranges = folder / ".calibration.json"
    reuse = (
        {"calibration_cache_path": ranges}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters
        else {}
    )
    failed: dict[str, str] = {}
    for name in ("onnx-int8-pc", "onnx-int8-static", "onnx-int8-static-pc"):
        out = folder / str(BACKEND_FILES[name])
        per_channel = name.endswith("-pc")
        try:
            if "static" not in name:
                quantize_dynamic(plain, out, weight_type=QuantType.QInt8, per_channel=True)
            elif not feeds:
                failed[name] = "no calibration examples (the tasks' train splits gave none)"
            else:
                # MatMuls only: quantised softmax, GELU and LayerNorm inputs lose too much.
                quantize_static(
                    plain,
                    out,
                    _Reader(feeds, inputs),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"],
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    **reuse,
                )
        except Exception as exc:  # the quantiser's own errors: the gate reports, not fails
            out.unlink(missing_ok=True)
            failed[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    plain.unlink()
    ranges.unlink(missing_ok=True)
    return failed
