"""Exporting a bundle: a smaller bundle folder, one ONNX graph, or one task as a standard
transformers folder.

Every export is written to a temporary directory beside ``out`` and renamed into place, so
an interrupted export never leaves a half-written folder under the requested name.
"""

from __future__ import annotations

import json
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
from mtreg.artifacts.checkpoint import load_component
from mtreg.artifacts.manifest import Manifest, layer_path
from mtreg.core.disk import disk_errors
from mtreg.errors import MtregError
from mtreg.nn.network import MultiTaskModel
from mtreg.runtime.bundle import LoadedBundle

ONNX_INFO = "onnx.json"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
PARITY = 1e-4  # max abs logit difference an exported graph may have against torch


@contextmanager
def _atomic_folder(out: Path) -> Iterator[Path]:
    out = Path(out)
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


def export_dir(bundle: Path, out: Path, tasks: Sequence[str] | None = None) -> Path:
    """Write a self-contained bundle folder holding only ``tasks`` (default: all), its trunk
    cut at their deepest fork. Returns ``out``.

    Raises:
        NotFound: a task the bundle does not hold. MtregError: ``out`` exists.
    """
    loaded = LoadedBundle(bundle, tasks)  # checks every file against the manifest
    manifest = loaded.manifest.subset(loaded.tasks)
    with _atomic_folder(out) as scratch:
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


def _probe_batch(loaded: LoadedBundle) -> dict[str, torch.Tensor]:
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
    bundle: Path, out: Path, tasks: Sequence[str] | None = None, quantize: str | None = None
) -> dict[str, Any]:
    """Write one ONNX graph serving ``tasks``: inputs input_ids, attention_mask and
    token_type_ids (dynamic batch and sequence axes), one output per task, with the
    manifest and tokenizer beside it.

    Returns:
        A report: the files, the outputs, and the max abs difference to torch on a probe
        batch (and, with ``quantize="int8"``, the int8 graph's difference and argmax
        agreement with fp32).

    Raises:
        MtregError: ``out`` exists, an unknown quantisation, or onnx/onnxruntime missing.
    """
    if quantize not in (None, "int8"):
        raise MtregError(f"unknown quantisation {quantize!r}: use int8")
    try:
        import onnxruntime
    except ImportError:
        raise MtregError("ONNX export needs `pip install 'mtreg[onnx]'`") from None
    loaded = LoadedBundle(bundle, tasks)
    names = loaded.tasks
    manifest = loaded.manifest.subset(names)
    probe = _probe_batch(loaded)
    with torch.no_grad():
        expected = _Graph(loaded.model, names)(*probe.values())
    report: dict[str, Any] = {"outputs": names, "files": ["model.onnx"], "opset": OPSET}
    with _atomic_folder(out) as scratch:
        _copy_bundle(loaded.path, manifest, scratch)
        graph = scratch / "model.onnx"
        axes = {name: {0: "batch", 1: "sequence"} for name in ONNX_INPUTS}
        for name in names:
            per_token = loaded.info[name].head.per_token
            axes[name] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
        # The TorchScript exporter: on this model it gives onnxruntime's BERT fusions the
        # graph they expect (measured faster than the dynamo exporter, see bench/serving.py).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _export(loaded.model, names, probe, graph, axes)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # Quantise the plain graph: the quantiser does not know the fused operators.
            int8 = scratch / "model.int8.onnx"
            quantize_dynamic(str(graph), str(int8), weight_type=QuantType.QInt8)
            int8_out = _session(int8, onnxruntime)(probe)
            report["files"].append(int8.name)
            report["int8_max_abs_diff"] = _max_diff(int8_out, expected)
            report["int8_argmax_agreement"] = _argmax_agreement(int8_out, expected)
        report["fused"] = _fuse(graph, loaded.config, probe, expected, onnxruntime)
        report["max_abs_diff"] = _max_diff(_session(graph, onnxruntime)(probe), expected)
        (scratch / ONNX_INFO).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


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

    fused = graph.with_name("fused.onnx")
    model = optimizer.optimize_model(
        str(graph),
        model_type="bert",
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
    return lambda feeds: session.run(None, {k: v.numpy() for k, v in feeds.items()})


def _argmax_agreement(a: Sequence[Any], b: Sequence[Any]) -> float:
    agree = [
        float((torch.as_tensor(x).argmax(-1) == torch.as_tensor(y).argmax(-1)).float().mean())
        for x, y in zip(a, b, strict=True)
    ]
    return sum(agree) / len(agree)


# transformers' class name prefix per model type: BertFor..., RobertaFor...
_HF_PREFIXES = {"bert": "Bert", "roberta": "Roberta"}


def hf_state_dict(loaded: LoadedBundle, task: str) -> dict[str, torch.Tensor]:
    """Return ``task``'s standalone network as a transformers ``*For...Classification`` state
    dict: trunk layers below the fork, then the branch layers, then pooler and head."""
    info = loaded.info[task]
    model_type = loaded.config.model_type
    prefix = f"{model_type}."
    branch = loaded.model.branches[task].state_dict()
    trunk = loaded.model.trunk.state_dict()
    tensors = {
        f"{prefix}embeddings.{k.removeprefix('embeddings.')}": v
        for k, v in trunk.items()
        if k.startswith("embeddings.")
    }
    for i in range(info.fork_depth):
        for key, value in load_component(loaded.path / layer_path(i)).items():
            tensors[f"{prefix}encoder.layer.{i}.{key}"] = value
    for key, value in branch.items():
        if key.startswith("layers."):
            j, _, rest = key.removeprefix("layers.").partition(".")
            tensors[f"{prefix}encoder.layer.{info.fork_depth + int(j)}.{rest}"] = value
    head = {k.removeprefix("head."): v for k, v in branch.items() if k.startswith("head.")}
    pooler = {k.removeprefix("pooler."): v for k, v in branch.items() if k.startswith("pooler.")}
    if info.head.per_token:  # no pooler: the classifier reads every token's state
        tensors |= {f"classifier.{k}": v for k, v in head.items()}
    elif model_type == "roberta":
        # RoBERTa's classification head is dense + tanh + out_proj on the first token:
        # the same function as mtreg's pooler + head.
        tensors |= {f"classifier.{k}": v for k, v in pooler.items()}
        tensors |= {f"classifier.out_proj.{k}": v for k, v in head.items()}
    else:
        tensors |= {f"{prefix}pooler.{k}": v for k, v in pooler.items()}
        tensors |= {f"classifier.{k}": v for k, v in head.items()}
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def export_hf(bundle: Path, out: Path, task: str) -> Path:
    """Write one task as a transformers folder that ``AutoModelForSequenceClassification``
    (or ``AutoModelForTokenClassification`` for tagging) loads with the same logits.

    Returns:
        ``out``.

    Raises:
        NotFound: an unknown task. MtregError: ``out`` exists.
    """
    from safetensors.torch import save_file

    loaded = LoadedBundle(bundle, [task])
    name = loaded.tasks[0]
    info, config = loaded.info[name], loaded.config
    kind = heads.get(info.head.kind)
    labels = list(info.head.labels) or ["value"]
    hf_config = {
        **config.to_dict(),
        "architectures": [f"{_HF_PREFIXES[config.model_type]}For{kind.hf_architecture}"],
        "num_hidden_layers": info.fork_depth + info.num_layers,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
    }
    if kind.hf_problem_type is not None:
        hf_config["problem_type"] = kind.hf_problem_type
    with _atomic_folder(out) as scratch:
        save_file(hf_state_dict(loaded, name), str(scratch / "model.safetensors"))
        (scratch / "config.json").write_text(json.dumps(hf_config, indent=1) + "\n")
        for relative in loaded.manifest.tokenizer_files:
            shutil.copyfile(loaded.path / relative, scratch / Path(relative).name)
    return Path(out)
