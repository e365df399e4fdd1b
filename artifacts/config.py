"""The architecture of a trunk, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from mtreg.artifacts.families import MODEL_TYPES, Family, Options, family_of
from mtreg.artifacts.hub import is_hub_id
from mtreg.errors import InvalidCheckpoint

SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES)
SUPPORTED_ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
)
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


@dataclass(frozen=True)
class TrunkConfig:
    """Everything the network code needs to rebuild an encoder of one of the families.

    The common fields carry transformers' BERT names whatever the family calls them
    (DistilBERT's ``dim`` is ``hidden_size`` here); ``options`` holds the family's own
    fields that shape the network (DeBERTa's relative attention, ModernBERT's rotary and
    local attention, ...), each with its default filled in. Given as a dict (a manifest's
    or a registry row's ``config``, ``TrunkConfig(**d)``), they are read into
    :class:`~mtreg.artifacts.families.Options`. ``base_model`` is where the weights came
    from on the Hub (the id a trunk was added by, else the checkpoint's ``_name_or_path``
    when it is a Hub id): it is provenance, for model cards, not architecture, so it takes
    no part in equality, the architecture hash or ``to_hf``.
    """

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
    options: Options = field(default_factory=Options)
    base_model: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.options, dict):
            # The one place the stored form of the options is read.
            object.__setattr__(self, "options", Options.of(self.options))

    @property
    def family(self) -> Family:
        """Return the encoder family of this trunk (``artifacts/families.py``)."""
        return family_of(self.model_type)

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> TrunkConfig:
        """Read a Hugging Face config dict.

        Raises:
            InvalidCheckpoint: for a model type no family serves, a missing field or an
                unsupported option, naming what was found.
        """
        model_type = data.get("model_type")
        if model_type not in MODEL_TYPES:
            archs = ", ".join(data.get("architectures") or []) or "none listed"
            raise InvalidCheckpoint(
                f"unsupported model_type {model_type!r} (architectures: {archs}): mtreg "
                f"serves these encoder families: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        family = family_of(model_type)
        position_type = data.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise InvalidCheckpoint(
                f"unsupported position_embedding_type {position_type!r}: only 'absolute'"
            )
        values = {name: data[family.aliases.get(name, name)] for name in _common(family, data)}
        missing = sorted(set(_REQUIRED) - set(values))
        if missing:
            raise InvalidCheckpoint(f"config.json lacks {', '.join(missing)}")
        if values.get("hidden_act", "gelu") not in SUPPORTED_ACTIVATIONS:
            raise InvalidCheckpoint(
                f"unsupported hidden_act {values.get('hidden_act')!r}: "
                f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if values.get("pad_token_id") is None:
            values["pad_token_id"] = 1 if family.name == "roberta" else 0
        options = {k: data.get(k, default) for k, default in family.options.items()}
        options = _normalise(family, data, options)
        named = data.get("_name_or_path")
        base_model = named if isinstance(named, str) and is_hub_id(named) else None
        config = cls(
            model_type, **values, **family.fixed, options=Options.of(options), base_model=base_model
        )
        if config.hidden_size % config.num_attention_heads:
            raise InvalidCheckpoint(
                f"hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (``TrunkConfig(**d)`` reverses it); the
        options are the family's own, by name."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.base_model is None:
            # Left out rather than null: configs stored before it existed read the same.
            values.pop("base_model")
        return values | {"options": self.options.to_dict(self.family.options)}

    def to_hf(self) -> dict[str, Any]:
        """Return this architecture as a transformers config dict of its family (the
        family's own field names, its options, no dropout): what ``AutoConfig.for_model``
        and an exported ``config.json`` take."""
        family = self.family
        common = {k: v for k, v in self.to_dict().items() if k not in family.fixed}
        options = common.pop("options")
        common.pop("base_model", None)
        hf = {family.aliases.get(k, k): v for k, v in common.items()}
        return hf | {k: v for k, v in options.items() if v is not None}

    def architecture_hash(self) -> str:
        """sha256 of every field but the layer count (and ``base_model``).

        The layer count is left out on purpose: by the compatibility rule a branch at depth k
        depends only on layers below k, which the per-layer fingerprints already cover.
        ``options`` joins the hash only when the family has any, so that BERT and RoBERTa
        trunks keep the hashes they were registered with.
        """
        hashed = self.to_dict()
        hashed.pop("num_hidden_layers")
        hashed.pop("base_model", None)
        if not hashed["options"]:
            hashed.pop("options")
        text = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _common(family: Family, data: dict[str, Any]) -> list[str]:
    own = ("model_type", "options", "base_model")
    names = [f for f in TrunkConfig.__dataclass_fields__ if f not in own]
    return [n for n in names if n not in family.fixed and family.aliases.get(n, n) in data]


def _normalise(family: Family, data: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Bring options saved in older or newer config formats to one form (so that the same
    architecture hashes the same), and refuse what mtreg's network cannot run."""
    if family.name == "deberta-v2":
        if data.get("conv_kernel_size", 0) > 0:
            raise InvalidCheckpoint(
                "unsupported DeBERTa-v2 option conv_kernel_size > 0 (the xlarge/xxlarge v2 "
                "models): its convolution mixes layer 0 with the embeddings; use a v3 model"
            )
        kinds = options["pos_att_type"] or []
        if isinstance(kinds, str):
            kinds = [k.strip() for k in kinds.lower().split("|")]
        options["pos_att_type"] = sorted(kinds)
    if family.name == "modernbert":
        types = data.get("layer_types")
        if types:
            options["global_attn_every_n_layers"] = _global_period(types)
        for kind, key in (("full_attention", "global"), ("sliding_attention", "local")):
            rope = (data.get("rope_parameters") or {}).get(kind) or {}
            if rope.get("rope_type", "default") != "default":
                raise InvalidCheckpoint(
                    f"unsupported ModernBERT rope_type {rope['rope_type']!r}: only 'default'"
                )
            if "rope_theta" in rope:
                options[f"{key}_rope_theta"] = float(rope["rope_theta"])
    return options


def _global_period(types: list[str]) -> int:
    for n in range(1, len(types) + 1):
        expected = ["sliding_attention" if i % n else "full_attention" for i in range(len(types))]
        if types == expected:
            return n
    raise InvalidCheckpoint(
        "unsupported ModernBERT layer_types: global attention must come every n layers"
    )
