"""Exporting a bundle: a smaller bundle folder, one ONNX graph, or one task as a standard
transformers folder.

Every export is written to a temporary directory beside ``out`` and renamed into place, so
an interrupted export never leaves a half-written folder under the requested name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtreg import heads
from mtreg.artifacts.bundle_dir import write_bundle_files
from mtreg.artifacts.hf_model import classifier_config, classifier_state_dict, write_config
from mtreg.artifacts.home import Home
from mtreg.artifacts.manifest import MANIFEST, MODEL_CARD, Manifest
from mtreg.artifacts.model_card import model_card
from mtreg.artifacts.objects import sha256_file
from mtreg.artifacts.onnx_info import GRAPH, ONNX_INFO, OnnxInfo
from mtreg.artifacts.tensor_file import write_safetensors
from mtreg.core.disk import disk_errors
from mtreg.core.extras import require
from mtreg.errors import MtregError
from mtreg.nn.network import MultiTaskModel
from mtreg.runtime.bundle import LoadedBundle

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
PARITY = 1e-4  # max abs logit difference an exported graph may have against torch


def _check_out(out: Path, bundle: Path, homes: Sequence[Home] | None) -> None:
    """Refuse ``out`` inside a registry home (:meth:`Home.check_output`): by default the
    home of ``$MTREG_HOME`` and the home whose ``bundles/`` holds ``bundle``."""
    if homes is None:
        homes = [Home.resolve(), *filter(None, [Home.holding(bundle)])]
    for home in homes:
        home.check_output(out)


@contextmanager
def _atomic_folder(out: Path, bundle: Path, homes: Sequence[Home] | None) -> Iterator[Path]:
    out = Path(out)
    _check_out(out, bundle, homes)
    if out.exists():
        raise MtregError(f"{out} already exists: choose another --out or delete it first")
    with disk_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            yield scratch
            os.replace(scratch, out)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise


def _copy_bundle(source: Path, manifest: Manifest, target: Path) -> None:
    write_bundle_files(target, manifest, lambda rel, dest: shutil.copyfile(source / rel, dest))


def export_dir(
    bundle: Path,
    out: Path,
    tasks: Sequence[str] | None = None,
    expected_id: str | None = None,
    *,
    homes: Sequence[Home] | None = None,
) -> Path:
    """Write a self-contained bundle folder holding only ``tasks`` (default: all), its trunk
    cut at their deepest fork. ``expected_id``: the id the registry recorded for ``bundle``
    (see :class:`LoadedBundle`). ``homes``: the registry homes ``out`` must lie outside
    (default: ``$MTREG_HOME``'s and the one holding ``bundle``). Returns ``out``.

    Raises:
        NotFound: a task the bundle does not hold. MtregError: ``out`` exists or lies in
            a registry home. Damaged: the source bundle differs from its manifest or id.
    """
    loaded = LoadedBundle(bundle, tasks, expected_id=expected_id)  # checks every file
    manifest = loaded.manifest.subset(loaded.tasks)
    with _atomic_folder(out, bundle, homes) as scratch:
        _copy_bundle(loaded.path, manifest, scratch)
    return Path(out)


class _Graph(nn.Module):
    """The merged model with positional outputs, one per task, for the ONNX exporter."""

    def __init__(self, model: MultiTaskModel, tasks: Sequence[str]) -> None:
        super().__init__()
        self.model, self.tasks = model, list(tasks)

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids, attention_mask, token_type_ids, tasks=self.tasks)
        return tuple(out[task] for task in self.tasks)


def probe_batch(loaded: LoadedBundle) -> dict[str, torch.Tensor]:
    """Return a small fixed batch of the graph's inputs: what exports are traced on and
    checked against torch with."""
    texts = [
        "the service was great and fast",
        "i want a refund for my order",
        "what is it",
        "not good , very slow and the food was awful but the price was fine",
    ]
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    types = batch.get("token_type_ids", torch.zeros_like(ids))
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "token_type_ids": types}


def _max_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    return max(
        float((torch.as_tensor(x) - torch.as_tensor(y)).abs().max())
        for x, y in zip(a, b, strict=True)
    )


def export_onnx(
    bundle: Path,
    out: Path,
    tasks: Sequence[str] | None = None,
    quantize: str | None = None,
    expected_id: str | None = None,
    external_data: bool = False,
    *,
    homes: Sequence[Home] | None = None,
) -> dict[str, Any]:
    """Write one ONNX graph serving ``tasks``: inputs input_ids, attention_mask and
    token_type_ids (dynamic batch and sequence axes), one output per task, with the
    manifest and tokenizer beside it, and ``onnx.json`` hashing every graph file
    (:mod:`mtreg.artifacts.onnx_info`). ``external_data`` stores the weights beside the
    graph in ``model.onnx.data`` (needed past protobuf's 2 GB limit). ``homes``: as
    :func:`export_dir`.

    Returns:
        A report: the files, the outputs, and the max abs difference to torch on a probe
        batch (and, with ``quantize="int8"``, the int8 graph's difference and argmax
        agreement with fp32).

    Raises:
        MtregError: ``out`` exists or lies in a registry home, an unknown quantisation, or
            onnx/onnxruntime missing.
        Damaged: the source bundle differs from its manifest or ``expected_id``.
    """
    if quantize not in (None, "int8"):
        raise MtregError(f"unknown quantisation {quantize!r}: use int8")
    onnxruntime = require("onnxruntime")
    loaded = LoadedBundle(bundle, tasks, expected_id=expected_id)
    names = loaded.tasks
    manifest = loaded.manifest.subset(names)
    probe = probe_batch(loaded)
    with torch.no_grad():
        expected = _Graph(loaded.model, names)(*probe.values())
    report: dict[str, Any] = {"outputs": names, "files": [GRAPH], "opset": OPSET}
    with _atomic_folder(out, bundle, homes) as scratch:
        _copy_bundle(loaded.path, manifest, scratch)
        graph = scratch / GRAPH
        write_graph(loaded, names, probe, graph)
        if quantize == "int8":
            int8, measured = _quantize_int8(graph, probe, expected, onnxruntime)
            report["files"].append(int8)
            report.update(measured)
        report["fused"] = _fuse(graph, loaded.config, probe, expected, onnxruntime)
        report["max_abs_diff"] = _max_diff(_session(graph, onnxruntime)(probe), expected)
        if external_data:
            report["files"].append(_externalise(graph))
        files = _graph_files(scratch, manifest)
        OnnxInfo(manifest.bundle_id, loaded.bundle_id, files, report).write(scratch)
    return report


def write_graph(
    loaded: LoadedBundle, names: list[str], probe: dict[str, torch.Tensor], graph: Path
) -> None:
    """Export ``loaded``'s model serving ``names`` to ``graph`` (dynamic batch and sequence
    axes; a per-sequence task's output has no sequence axis)."""
    axes = {name: {0: "batch", 1: "sequence"} for name in ONNX_INPUTS}
    for name in names:
        per_token = loaded.info[name].head.per_token
        axes[name] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    # The TorchScript exporter: on this model it gives onnxruntime's BERT fusions the
    # graph they expect (measured faster than the dynamo exporter, see bench/serving.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(loaded.model, names, probe, graph, axes)


def _quantize_int8(
    graph: Path, probe: dict[str, torch.Tensor], expected: Sequence[Any], onnxruntime: Any
) -> tuple[str, dict[str, Any]]:
    """Write ``graph``'s dynamic int8 quantisation beside it as ``model.int8.onnx``.

    Returns:
        Its file name, and its max abs difference and argmax agreement to ``expected``
        (the torch outputs on ``probe``), as the report's ``int8_*`` entries.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Quantise the plain graph: the quantiser does not know the fused operators.
    int8 = graph.with_name("model.int8.onnx")
    quantize_dynamic(str(graph), str(int8), weight_type=QuantType.QInt8)
    outputs = _session(int8, onnxruntime)(probe)
    return int8.name, {
        "int8_max_abs_diff": _max_diff(outputs, expected),
        "int8_argmax_agreement": _argmax_agreement(outputs, expected),
    }


def _externalise(graph: Path) -> str:
    """Move every tensor of ``graph`` into one external-data file beside it; return its name."""
    import onnx

    data = f"{graph.name}.data"
    model = onnx.load(str(graph))
    onnx.save_model(
        model,
        str(graph),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
    )
    return data


def _graph_files(folder: Path, manifest: Manifest) -> dict[str, str]:
    """Return every file of an export folder that is not the bundle's own (the graph, its
    external data, the int8 graph) -> sha256: whatever the exporters wrote is hashed."""
    own = {*manifest.files, MANIFEST, MODEL_CARD, ONNX_INFO}
    return {
        rel: sha256_file(folder / rel)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and (rel := path.relative_to(folder).as_posix()) not in own
    }


def _export(model: MultiTaskModel, names, probe, graph: Path, axes) -> None:
    torch.onnx.export(
        _Graph(model, names),
        tuple(probe.values()),
        str(graph),
        input_names=list(ONNX_INPUTS),
        output_names=list(names),
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
    )


def _fuse(graph: Path, config, probe, expected, onnxruntime) -> dict[str, int]:
    """Apply onnxruntime's transformer fusions (attention, skip LayerNorm, bias GELU) in
    place, if the fused graph still matches torch; return the fused operator counts."""
    from onnxruntime.transformers import optimizer

    if config.family.onnx_fusion is None:
        return {}  # onnxruntime has no fusion for this family's attention
    fused = graph.with_name("fused.onnx")
    model = optimizer.optimize_model(
        str(graph),
        model_type=config.family.onnx_fusion,
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
    )
    model.save_model_to_file(str(fused))
    if _max_diff(_session(fused, onnxruntime)(probe), expected) > PARITY:
        fused.unlink()
        return {}
    os.replace(fused, graph)
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def _session(graph: Path, onnxruntime) -> Callable[[dict[str, torch.Tensor]], list]:
    options = onnxruntime.SessionOptions()
    # As many threads as torch uses, so the two backends compare (and share a CPU) fairly.
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}  # no token_type_ids: DistilBERT, ModernBERT
    return lambda feeds: session.run(None, {k: v.numpy() for k, v in feeds.items() if k in inputs})


def _argmax_agreement(a: Sequence[Any], b: Sequence[Any]) -> float:
    agree = [
        float((torch.as_tensor(x).argmax(-1) == torch.as_tensor(y).argmax(-1)).float().mean())
        for x, y in zip(a, b, strict=True)
    ]
    return sum(agree) / len(agree)


def hf_state_dict(loaded: LoadedBundle, task: str) -> dict[str, torch.Tensor]:
    """Return ``task``'s standalone network as a transformers ``*For...Classification`` state
    dict: trunk layers below the fork, then the branch layers, then its classifier."""
    info, trunk = loaded.info[task], loaded.model.trunk
    # The embeddings component as stored: the embeddings' own names, DeBERTa's "context.*".
    embeddings = {
        k.removeprefix("embeddings."): v
        for k, v in trunk.state_dict().items()
        if not k.startswith("layers.")
    }
    layers = [trunk.layers[i].state_dict() for i in range(info.fork_depth)]
    branch = loaded.model.branches[task].state_dict()
    branch = {k: v for k, v in branch.items() if not k.startswith("context.")}
    return classifier_state_dict(loaded.config, embeddings, layers, branch, info.head.per_token)


def export_hf(
    bundle: Path,
    out: Path,
    task: str,
    expected_id: str | None = None,
    *,
    homes: Sequence[Home] | None = None,
) -> Path:
    """Write one task as a transformers folder that ``AutoModelForSequenceClassification``
    (or ``AutoModelForTokenClassification`` for tagging) loads with the same logits.
    ``homes``: as :func:`export_dir`.

    Returns:
        ``out``.

    Raises:
        NotFound: an unknown task. MtregError: ``out`` exists or lies in a registry home.
            Damaged: the source bundle differs from its manifest or ``expected_id``.
    """
    loaded = LoadedBundle(bundle, [task], expected_id=expected_id)
    name = loaded.tasks[0]
    info, config = loaded.info[name], loaded.config
    kind = heads.get(info.head.kind)
    layers = info.fork_depth + info.num_layers
    hf_config = classifier_config(
        config, layers, info.head, f"For{kind.hf_architecture}", kind.hf_problem_type
    )
    with _atomic_folder(out, bundle, homes) as scratch:
        write_safetensors(scratch / "model.safetensors", hf_state_dict(loaded, name))
        write_config(scratch / "config.json", hf_config)
        (scratch / MODEL_CARD).write_text(model_card(loaded.manifest, name), encoding="utf-8")
        for relative in loaded.manifest.tokenizer_files:
            shutil.copyfile(loaded.path / relative, scratch / Path(relative).name)
    return Path(out)
