"""The architecture of a trunk, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from mtreg.errors import InvalidCheckpoint

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class TrunkConfig:
    """Everything the network code needs to rebuild a BERT-family encoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> TrunkConfig:
        """Read a Hugging Face config dict.

        Raises:
            InvalidCheckpoint: for a model type other than BERT/RoBERTa, a missing field or
                an unsupported option, naming what was found.
        """
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(data.get("architectures") or []) or "none listed"
            raise InvalidCheckpoint(
                f"unsupported model_type {model_type!r} (architectures: {archs}): mtreg "
                f"serves BERT-family encoders ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        position_type = data.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise InvalidCheckpoint(
                f"unsupported position_embedding_type {position_type!r}: only 'absolute'"
            )
        if data.get("hidden_act", "gelu") not in SUPPORTED_ACTIVATIONS:
            raise InvalidCheckpoint(
                f"unsupported hidden_act {data.get('hidden_act')!r}: "
                f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        names = [f for f in cls.__dataclass_fields__ if f in data]
        missing = {
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        } - set(names)
        if missing:
            raise InvalidCheckpoint(f"config.json lacks {', '.join(sorted(missing))}")
        values = {name: data[name] for name in names}
        if values.get("pad_token_id") is None:
            values["pad_token_id"] = 1 if model_type == "roberta" else 0
        config = cls(**values)
        if config.hidden_size % config.num_attention_heads:
            raise InvalidCheckpoint(
                f"hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (``TrunkConfig(**d)`` reverses it)."""
        return asdict(self)

    def architecture_hash(self) -> str:
        """sha256 of every field but the layer count.

        The layer count is left out on purpose: by the compatibility rule a branch at depth k
        depends only on layers below k, which the per-layer fingerprints already cover.
        """
        fields = self.to_dict()
        fields.pop("num_hidden_layers")
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
