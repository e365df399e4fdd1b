"""The encoder families mtreg serves, as names and shapes (no torch, no transformers).

A family says how a Hugging Face checkpoint of its kind names its tensors, which config
fields shape the network, and the name and shape of every tensor of a trunk component or a
branch. The network code (``nn/layers.py``) builds the modules from transformers' own
classes; this module is what the registry and the file readers check weights against.

Component tensor names are the HF names relative to the component: the embeddings
component holds ``embeddings.*`` (and, for DeBERTa, the relative position table every layer
reads, as ``context.*``; for ELECTRA its projection, as ``project.*``), layer i holds
``<layer prefix>{i}.*``, and the optional top component holds what follows the last layer
(BERT's pooler, ModernBERT's final norm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Options:
    """A trunk's family-specific config fields that shape the network, typed: the one
    reader of them. :attr:`Family.options` names a family's fields and their defaults;
    the fields of other families are None (``to_dict`` leaves them out)."""

    # DistilBERT
    sinusoidal_pos_embds: bool | None = None
    # ELECTRA and DeBERTa (None for DeBERTa: the hidden size)
    embedding_size: int | None = None
    # DeBERTa-v2/v3
    relative_attention: bool | None = None
    max_relative_positions: int | None = None
    position_buckets: int | None = None
    norm_rel_ebd: str | None = None
    pos_att_type: tuple[str, ...] | None = None
    share_att_key: bool | None = None
    position_biased_input: bool | None = None
    pooler_hidden_act: str | None = None
    # ModernBERT
    norm_bias: bool | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    local_attention: int | None = None
    global_attn_every_n_layers: int | None = None
    global_rope_theta: float | None = None
    local_rope_theta: float | None = None
    classifier_pooling: str | None = None
    classifier_activation: str | None = None
    classifier_bias: bool | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Options:
        """Return the options in ``values`` (a family's fields, as :meth:`to_dict` gives
        them and a manifest holds them).

        Raises:
            TypeError: a name no family has.
        """
        kinds = values.get("pos_att_type")
        fixed = {**values, "pos_att_type": tuple(kinds)} if kinds is not None else values
        return cls(**fixed)

    def to_dict(self, names: Iterable[str]) -> dict[str, Any]:
        """Return the fields ``names`` (a family's) as a JSON-ready dict: exactly what the
        architecture hash and a manifest have always held."""
        values = {name: getattr(self, name) for name in names}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


class Architecture(Protocol):
    """What the shape functions read of a trunk config (``TrunkConfig`` has it)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def type_vocab_size(self) -> int: ...
    @property
    def options(self) -> Options: ...


def _linear(name: str, out: int, inp: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (out, inp)} | ({f"{name}.bias": (out,)} if bias else {})


def _norm(name: str, h: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (h,)} | ({f"{name}.bias": (h,)} if bias else {})


def _post_ln(c: Architecture, projections: tuple[str, ...]) -> Shapes:
    """A BERT-style post-LN layer: the attention projections named ``projections`` (under
    ``attention.self.``), then the output dense and norm, intermediate, output and norm."""
    h, i = c.hidden_size, c.intermediate_size
    shapes: Shapes = {}
    for name in projections:
        shapes |= _linear(f"attention.self.{name}", h, h)
    return (
        shapes
        | _linear("attention.output.dense", h, h)
        | _norm("attention.output.LayerNorm", h)
        | _linear("intermediate.dense", i, h)
        | _linear("output.dense", h, i)
        | _norm("output.LayerNorm", h)
    )


def _bert_layer(c: Architecture, index: int) -> Shapes:
    return _post_ln(c, ("query", "key", "value"))


def _distilbert_layer(c: Architecture, index: int) -> Shapes:
    h, i = c.hidden_size, c.intermediate_size
    shapes: Shapes = {}
    for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
        shapes |= _linear(f"attention.{name}", h, h)
    return (
        shapes
        | _norm("sa_layer_norm", h)
        | _linear("ffn.lin1", i, h)
        | _linear("ffn.lin2", h, i)
        | _norm("output_layer_norm", h)
    )


def _deberta_layer(c: Architecture, index: int) -> Shapes:
    o = c.options
    projections = ("query_proj", "key_proj", "value_proj")
    if o.relative_attention and not o.share_att_key:
        for kind, name in (("c2p", "pos_key_proj"), ("p2c", "pos_query_proj")):
            if kind in o.pos_att_type:
                projections += (name,)
    return _post_ln(c, projections)


def _modernbert_layer(c: Architecture, index: int) -> Shapes:
    h, i, o = c.hidden_size, c.intermediate_size, c.options
    nb, ab, mb = o.norm_bias, o.attention_bias, o.mlp_bias
    # Layer 0 reads the embeddings' own norm: transformers gives it no attention norm.
    shapes = _norm("attn_norm", h, nb) if index > 0 else {}
    return (
        shapes
        | _linear("attn.Wqkv", 3 * h, h, ab)
        | _linear("attn.Wo", h, h, ab)
        | _norm("mlp_norm", h, nb)
        | _linear("mlp.Wi", 2 * i, h, mb)
        | _linear("mlp.Wo", h, i, mb)
    )


def _bert_embeddings(c: Architecture) -> Shapes:
    e = c.options.embedding_size or c.hidden_size
    shapes = {
        "word_embeddings.weight": (c.vocab_size, e),
        "position_embeddings.weight": (c.max_position_embeddings, e),
    }
    if c.type_vocab_size > 0:
        shapes["token_type_embeddings.weight"] = (c.type_vocab_size, e)
    shapes |= _norm("LayerNorm", e)
    if e != c.hidden_size:  # ELECTRA's small generator-sized embeddings
        shapes |= _linear("project", c.hidden_size, e)
    return shapes


def _deberta_embeddings(c: Architecture) -> Shapes:
    h, o = c.hidden_size, c.options
    e = o.embedding_size or h
    shapes = {"word_embeddings.weight": (c.vocab_size, e)}
    if o.position_biased_input:
        shapes["position_embeddings.weight"] = (c.max_position_embeddings, e)
    if c.type_vocab_size > 0:
        shapes["token_type_embeddings.weight"] = (c.type_vocab_size, e)
    if e != h:
        shapes |= _linear("embed_proj", h, e, bias=False)
    return shapes | _norm("LayerNorm", h) | deberta_context(c)


def deberta_context(c: Architecture) -> Shapes:
    """Return DeBERTa's relative-position tensors (``context.*``): every layer reads them."""
    o = c.options
    if not o.relative_attention:
        return {}
    span = o.max_relative_positions
    span = o.position_buckets if o.position_buckets > 0 else span
    span = span if span >= 1 else c.max_position_embeddings
    shapes = {"context.rel_embeddings.weight": (2 * span, c.hidden_size)}
    if "layer_norm" in o.norm_rel_ebd:
        shapes |= _norm("context.LayerNorm", c.hidden_size)
    return shapes


def _modernbert_embeddings(c: Architecture) -> Shapes:
    return {"tok_embeddings.weight": (c.vocab_size, c.hidden_size)} | _norm(
        "norm", c.hidden_size, c.options.norm_bias
    )


@dataclass(frozen=True)
class Family:
    """One encoder family: how its checkpoints name tensors and what its network holds.

    Attributes:
        name: the family (``bert``, ``roberta``, ...); ``model_types`` the HF model types.
        hf_class: transformers' class-name prefix (``BertFor...``), per model type.
        base: the base model's attribute in ``*For...`` checkpoints (``bert.``).
        layer_prefix: where layer i's tensors sit below the base (``encoder.layer.``).
        embedding_groups: HF name prefix -> embeddings component prefix.
        top_prefix: the HF prefix of what follows the last layer (stored as the trunk's
            top component), and ``top_target`` where a branch keeps its copy.
        aliases: common field -> this family's config.json field, where they differ.
        fixed: common fields this family's config does not have, with their value.
        options: family-specific config fields that shape the network, with defaults.
        classifier: HF classifier tensor prefix (from the checkpoint's root) -> branch
            prefix, for sequence heads, and ``token_classifier`` for per-token heads.
        final_norm: a branch ends with its own copy of the final norm (ModernBERT).
        token_pooler: per-token heads also run the pooler transform (ModernBERT).
        onnx_fusion: onnxruntime's fusion model type, or None to export unfused.
    """

    name: str
    model_types: tuple[str, ...]
    hf_class: dict[str, str]
    base: str
    layer_prefix: str
    embeddings: Callable[[Architecture], Shapes]
    layer: Callable[[Architecture, int], Shapes]
    embedding_groups: dict[str, str] = field(default_factory=lambda: {"embeddings.": ""})
    top_prefix: str | None = None
    top_target: str = "pooler."
    aliases: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, str] = field(default_factory=dict)
    token_classifier: dict[str, str] = field(default_factory=lambda: {"classifier.": "head."})
    final_norm: bool = False
    token_pooler: bool = False
    onnx_fusion: str | None = "bert"

    def pooler_shapes(self, c: Architecture) -> Shapes:
        """Return the branch pooler's tensors (relative to ``pooler.``)."""
        h, o = c.hidden_size, c.options
        if self.name == "modernbert":
            return _linear("dense", h, h, o.classifier_bias) | _norm("norm", h, o.norm_bias)
        return _linear("dense", h, h)

    def final_norm_shapes(self, c: Architecture) -> Shapes:
        """Return the tensors of a branch's own final norm (relative to ``final_norm.``)."""
        if not self.final_norm:
            return {}
        bias = c.options.norm_bias
        return {"weight": (c.hidden_size,)} | ({"bias": (c.hidden_size,)} if bias else {})


_BERT_CLASSIFIER = {"bert.pooler.": "pooler.", "classifier.": "head."}
_MODERNBERT_CLASSIFIER = {
    "model.final_norm.": "final_norm.",
    "head.": "pooler.",
    "classifier.": "head.",
}
_ROBERTA_CLASSIFIER = {"classifier.dense.": "pooler.dense.", "classifier.out_proj.": "head."}

FAMILIES = (
    Family(
        "bert",
        ("bert",),
        {"bert": "Bert"},
        "bert.",
        "encoder.layer.",
        _bert_embeddings,
        _bert_layer,
        top_prefix="pooler.",
        classifier=_BERT_CLASSIFIER,
    ),
    Family(
        "roberta",
        ("roberta", "xlm-roberta"),
        {"roberta": "Roberta", "xlm-roberta": "XLMRoberta"},
        "roberta.",
        "encoder.layer.",
        _bert_embeddings,
        _bert_layer,
        top_prefix="pooler.",
        classifier=_ROBERTA_CLASSIFIER,
    ),
    Family(
        "distilbert",
        ("distilbert",),
        {"distilbert": "DistilBert"},
        "distilbert.",
        "transformer.layer.",
        _bert_embeddings,
        _distilbert_layer,
        aliases={
            "hidden_size": "dim",
            "num_hidden_layers": "n_layers",
            "num_attention_heads": "n_heads",
            "intermediate_size": "hidden_dim",
            "hidden_act": "activation",
        },
        fixed={"type_vocab_size": 0, "layer_norm_eps": 1e-12},
        options={"sinusoidal_pos_embds": False},
        classifier={"pre_classifier.": "pooler.dense.", "classifier.": "head."},
    ),
    Family(
        "electra",
        ("electra",),
        {"electra": "Electra"},
        "electra.",
        "encoder.layer.",
        _bert_embeddings,
        _bert_layer,
        embedding_groups={"embeddings.": "", "embeddings_project.": "project."},
        options={"embedding_size": 128},
        classifier=_ROBERTA_CLASSIFIER,
    ),
    Family(
        "deberta-v2",
        ("deberta-v2",),
        {"deberta-v2": "DebertaV2"},
        "deberta.",
        "encoder.layer.",
        _deberta_embeddings,
        _deberta_layer,
        embedding_groups={
            "embeddings.": "",
            "encoder.rel_embeddings.": "context.rel_embeddings.",
            "encoder.LayerNorm.": "context.LayerNorm.",
        },
        options={
            "relative_attention": False,
            "max_relative_positions": -1,
            "position_buckets": -1,
            "norm_rel_ebd": "none",
            "pos_att_type": [],
            "share_att_key": False,
            "position_biased_input": True,
            "pooler_hidden_act": "gelu",
            "embedding_size": None,
        },
        classifier={"pooler.dense.": "pooler.dense.", "classifier.": "head."},
        onnx_fusion=None,
    ),
    Family(
        "modernbert",
        ("modernbert",),
        {"modernbert": "ModernBert"},
        "model.",
        "layers.",
        _modernbert_embeddings,
        _modernbert_layer,
        top_prefix="final_norm.",
        top_target="final_norm.",
        aliases={"hidden_act": "hidden_activation", "layer_norm_eps": "norm_eps"},
        fixed={"type_vocab_size": 0},
        options={
            "norm_bias": False,
            "attention_bias": False,
            "mlp_bias": False,
            "local_attention": 128,
            "global_attn_every_n_layers": 3,
            "global_rope_theta": 160000.0,
            "local_rope_theta": 10000.0,
            "classifier_pooling": "cls",
            "classifier_activation": "gelu",
            "classifier_bias": False,
        },
        classifier=_MODERNBERT_CLASSIFIER,
        token_classifier=_MODERNBERT_CLASSIFIER,
        final_norm=True,
        token_pooler=True,
        onnx_fusion=None,
    ),
)

MODEL_TYPES = {t: family for family in FAMILIES for t in family.model_types}


def family_of(model_type: str) -> Family:
    """Return the family serving HF ``model_type``.

    Raises:
        KeyError: a model type no family serves.
    """
    return MODEL_TYPES[model_type]
