"""Reading a Hugging Face BERT-family checkpoint folder into trunk components.

A trunk is stored as separate components (embeddings, one file per layer, pooler,
tokenizer files) with tensor names relative to the component, so that a bundle can hold
only the layers below its deepest fork and a loader can read just those.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mtreg.artifacts.config import TrunkConfig
from mtreg.artifacts.fingerprint import TrunkFingerprint, tensor_group_hash, tokenizer_hash
from mtreg.artifacts.tensor_file import write_safetensors
from mtreg.errors import InvalidCheckpoint

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spm.model",
    "sentencepiece.bpe.model",
)
# Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
_LEGACY = {".gamma": ".weight", ".beta": ".bias"}

Tensors = dict[str, torch.Tensor]


def embedding_shapes(config: TrunkConfig) -> dict[str, tuple[int, ...]]:
    """Return the expected embeddings component tensors: name -> shape."""
    return config.family.embeddings(config)


def layer_shapes(config: TrunkConfig, index: int = 0) -> dict[str, tuple[int, ...]]:
    """Return the expected tensors of encoder layer ``index``: name -> shape (ModernBERT's
    layer 0 has no attention norm; every other family's layers are alike)."""
    return config.family.layer(config, index)


def pooler_shapes(config: TrunkConfig) -> dict[str, tuple[int, ...]]:
    """Return the expected tensors of a branch's pooler: name -> shape."""
    return config.family.pooler_shapes(config)


def top_shapes(config: TrunkConfig) -> dict[str, tuple[int, ...]]:
    """Return the expected tensors of the trunk's top component (what follows its last
    layer: BERT's pooler, ModernBERT's final norm): name -> shape."""
    if config.family.final_norm:
        return config.family.final_norm_shapes(config)
    return pooler_shapes(config)


@dataclass(frozen=True)
class Checkpoint:
    """A trunk read from a checkpoint folder, split into components."""

    config: TrunkConfig
    embeddings: Tensors
    layers: list[Tensors]
    pooler: Tensors | None
    tokenizer_files: dict[str, Path]
    fingerprint: TrunkFingerprint


def check_shapes(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str
) -> str | None:
    """Compare tensors with expected names and shapes.

    Returns:
        None if they match, else a phrase naming the first problem (missing, unexpected,
        wrong shape, not floating point, NaN/Inf).
    """
    for name, shape in expected.items():
        if name not in tensors:
            return f"{where} lacks tensor {name!r}"
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            return f"{where} tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
        if not tensor.is_floating_point():
            return f"{where} tensor {name!r} has dtype {tensor.dtype}, expected floating point"
        if not torch.isfinite(tensor).all():
            return f"{where} tensor {name!r} holds NaN or Inf values"
    extra = sorted(set(tensors) - set(expected))
    if extra:
        return f"{where} has unexpected tensor {extra[0]!r}"
    return None


def _read_tensors(folder: Path) -> Tensors:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "pytorch_model.bin").is_file():
        raise InvalidCheckpoint(
            f"{folder} holds only pytorch_model.bin: mtreg reads safetensors only (never "
            "pickles); convert it with transformers' save_pretrained(safe_serialization=True)"
        )
    else:
        raise InvalidCheckpoint(f"{folder} has no model.safetensors: point at a checkpoint folder")
    tensors: Tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidCheckpoint(f"{file} is not a readable safetensors file: {exc}") from None
    return tensors


def _split(tensors: Tensors, config: TrunkConfig) -> tuple[Tensors, list[Tensors], Tensors]:
    family = config.family
    prefix = next(
        (p for p in ("", family.base) if any(n.startswith(f"{p}embeddings.") for n in tensors)),
        None,
    )
    if prefix is None:
        raise InvalidCheckpoint(
            f"no embeddings tensors (with or without a {family.base} prefix): not a "
            f"{family.name} encoder"
        )
    embeddings: Tensors = {}
    layers: list[Tensors] = [{} for _ in range(config.num_hidden_layers)]
    top: Tensors = {}
    for full_name, tensor in tensors.items():
        if not full_name.startswith(prefix):
            continue  # a task head of a *ForSequenceClassification checkpoint, for example
        name = full_name[len(prefix) :]
        for old, new in _LEGACY.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        if name.startswith(family.layer_prefix):
            index, _, rest = name.removeprefix(family.layer_prefix).partition(".")
            if not index.isdigit() or int(index) >= len(layers):
                raise InvalidCheckpoint(
                    f"tensor {full_name!r} names a layer beyond num_hidden_layers "
                    f"{config.num_hidden_layers}"
                )
            layers[int(index)][rest] = tensor
        elif family.top_prefix and name.startswith(family.top_prefix):
            top[name.removeprefix(family.top_prefix)] = tensor
        elif not name.endswith(("position_ids", "token_type_ids")):
            for group, target in family.embedding_groups.items():
                if name.startswith(group):
                    embeddings[target + name.removeprefix(group)] = tensor
    return embeddings, layers, top


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read a Hugging Face checkpoint folder of one of the encoder families (its base model
    or a ``*For...`` model built on it).

    Returns:
        The config, the components (tensor names relative to each) and the fingerprint.

    Raises:
        InvalidCheckpoint: a missing folder or file, another architecture, a missing or
            misshapen tensor, non-finite weights, or no tokenizer; the message names it.
    """
    return read_model(folder)[0]


def read_model(folder: Path) -> tuple[Checkpoint, dict[str, Any], Tensors]:
    """Read a checkpoint folder as :func:`read_checkpoint` does, and also return its raw
    ``config.json`` and every tensor by its own name (a task head's included).

    Raises:
        InvalidCheckpoint: as :func:`read_checkpoint`.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InvalidCheckpoint(
            f"{folder} has no config.json: point at a Hugging Face checkpoint folder "
            "(config.json, model.safetensors, tokenizer files)"
        )
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidCheckpoint(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidCheckpoint(f"{config_file} is not a JSON object")
    config = TrunkConfig.from_hf(raw)
    tensors = _read_tensors(folder)
    embeddings, layers, pooler = _split(tensors, config)
    problem = check_shapes(embeddings, embedding_shapes(config), "embeddings")
    for index, layer in enumerate(layers):
        problem = problem or check_shapes(layer, layer_shapes(config, index), f"layer {index}")
    if pooler:
        problem = problem or check_shapes(pooler, top_shapes(config), "pooler")
    if problem:
        raise InvalidCheckpoint(f"{folder}: {problem}")
    tokenizer_files = {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}
    vocabularies = {"tokenizer.json", "vocab.txt", "vocab.json", "spm.model"}
    if not (vocabularies | {"sentencepiece.bpe.model"}) & set(tokenizer_files):
        raise InvalidCheckpoint(
            f"{folder} has no tokenizer (tokenizer.json, vocab.txt, vocab.json or a "
            "sentencepiece model): save the tokenizer into the checkpoint folder"
        )
    fingerprint = TrunkFingerprint(
        tokenizer=tokenizer_hash(tokenizer_files),
        config=config.architecture_hash(),
        embeddings=tensor_group_hash(embeddings),
        layers=tuple(tensor_group_hash(layer) for layer in layers),
    )
    checkpoint = Checkpoint(
        config, embeddings, layers, pooler or None, tokenizer_files, fingerprint
    )
    return checkpoint, raw, tensors


def save_component(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write one component's tensors to a safetensors file (same tensors, same bytes)."""
    write_safetensors(path, {name: tensors[name].contiguous() for name in sorted(tensors)})


def load_component(path: Path) -> Tensors:
    """Read one component file written by :func:`save_component` (safetensors only)."""
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
