"""An encoder family's modules, taken from transformers, and a task branch.

Every family's embeddings and layers are transformers' own classes (``BertLayer``,
DistilBERT's ``TransformerBlock``, ``DebertaV2Layer``, ``ModernBertEncoderLayer``, ...), so
their outputs equal transformers' by construction. An :class:`Adapter` says, per family, how
to call them: the embeddings' inputs, what every layer reads besides the hidden state (the
*context*: an attention mask; DeBERTa's relative positions and embeddings; ModernBERT's
rotary embeddings and local/global masks) and how a layer is called with it.

State dict names equal transformers' names relative to each component, so trunk and branch
tensors load with ``load_state_dict(tensors, strict=True)`` and no renaming.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_bidirectional_sliding_window_mask,
)
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
from transformers.models.deberta_v2.modeling_deberta_v2 import (
    DebertaV2Embeddings,
    DebertaV2Encoder,
    DebertaV2Layer,
)
from transformers.models.distilbert.modeling_distilbert import Embeddings as DistilEmbeddings
from transformers.models.distilbert.modeling_distilbert import TransformerBlock
from transformers.models.electra.modeling_electra import ElectraEmbeddings, ElectraLayer
from transformers.models.modernbert.modeling_modernbert import (
    ModernBertEmbeddings,
    ModernBertEncoderLayer,
    ModernBertRotaryEmbedding,
)
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings, RobertaLayer
from transformers.models.xlm_roberta.modeling_xlm_roberta import (
    XLMRobertaEmbeddings,
    XLMRobertaLayer,
)

from mtreg.artifacts.config import TrunkConfig
from mtreg.core.spec import HeadSpec


class MaskContext(nn.Module):
    """What a BERT-like layer reads besides the hidden state: the attention mask, built by
    transformers' own mask function (always materialised, so a traced graph keeps it)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden: Tensor, mask: Tensor) -> Any:
        """Return the attention mask for ``hidden`` [B, T, H] and the 0/1 ``mask`` [B, T]."""
        return create_bidirectional_mask(
            self.config, hidden, mask, allow_is_bidirectional_skip=False
        )


class DebertaContext(DebertaV2Encoder):
    """DeBERTa's encoder state without layers: the relative-position embeddings (and their
    norm) every layer reads. Frozen: they belong to the trunk below every fork."""

    def __init__(self, config: PretrainedConfig) -> None:
        config = copy.copy(config)
        config.num_hidden_layers = 0
        super().__init__(config)
        self.requires_grad_(False)

    def forward(self, hidden: Tensor, mask: Tensor) -> Any:  # type: ignore[override]
        """Return (attention mask, relative positions, relative embeddings)."""
        return self.get_attention_mask(mask), self.get_rel_pos(hidden), self.get_rel_embedding()


class ModernBertContext(ModernBertRotaryEmbedding):
    """ModernBERT's per-layer-type inputs: global or sliding-window mask and rotary
    position embeddings (no weights: both come from the config)."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Any:  # type: ignore[override]
        """Return {layer type: (attention mask, (cos, sin))}."""
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        masks = {
            "full_attention": create_bidirectional_mask(
                self.config, hidden, mask, allow_is_bidirectional_skip=False
            ),
            "sliding_attention": create_bidirectional_sliding_window_mask(
                self.config, hidden, mask, allow_is_bidirectional_skip=False
            ),
        }
        rotary = super().forward
        return {t: (masks[t], rotary(hidden, positions, t)) for t in self.layer_types}


class ElectraProjected(ElectraEmbeddings):
    """ELECTRA's embeddings plus the projection to the hidden size that ``ElectraModel``
    applies when its embeddings are narrower."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        wide = config.embedding_size != config.hidden_size
        self.project = nn.Linear(config.embedding_size, config.hidden_size) if wide else None

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Return the embedding output [B, T, hidden_size]."""
        x = super().forward(input_ids=input_ids, token_type_ids=token_type_ids)
        return x if self.project is None else self.project(x)


def _typed(module: nn.Module, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
    return module(input_ids=ids, token_type_ids=types)


def _bert_like(layer: nn.Module, hidden: Tensor, context: Any) -> Tensor:
    return layer(hidden, context)


@dataclass(frozen=True)
class Adapter:
    """How one family's transformers modules are built and called.

    ``embed(module, input_ids, token_type_ids, mask)`` runs the embeddings;
    ``context(config)`` builds the module computing what layers read besides the hidden
    state; ``run(layer, hidden, context)`` runs one layer; ``dropouts`` names the config
    fields a branch's dropout sets.
    """

    embeddings: Callable[[PretrainedConfig], nn.Module]
    layer: Callable[[PretrainedConfig, int], nn.Module]
    embed: Callable[[nn.Module, Tensor, Tensor | None, Tensor], Tensor] = _typed
    context: Callable[[PretrainedConfig], nn.Module] = MaskContext
    run: Callable[[nn.Module, Tensor, Any], Tensor] = _bert_like
    dropouts: tuple[str, ...] = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def _modernbert_run(layer: nn.Module, hidden: Tensor, context: Any) -> Tensor:
    mask, rotary = context[layer.attention_type]
    return layer(hidden, attention_mask=mask, position_embeddings=rotary)


ADAPTERS = {
    "bert": Adapter(BertEmbeddings, lambda c, i: BertLayer(c, layer_idx=i)),
    "roberta": Adapter(RobertaEmbeddings, lambda c, i: RobertaLayer(c, layer_idx=i)),
    "xlm-roberta": Adapter(XLMRobertaEmbeddings, lambda c, i: XLMRobertaLayer(c, layer_idx=i)),
    "electra": Adapter(ElectraProjected, lambda c, i: ElectraLayer(c, layer_idx=i)),
    "distilbert": Adapter(
        DistilEmbeddings,
        lambda c, i: TransformerBlock(c),
        embed=lambda m, ids, types, mask: m(ids),
        dropouts=("dropout", "attention_dropout"),
    ),
    "deberta-v2": Adapter(
        DebertaV2Embeddings,
        lambda c, i: DebertaV2Layer(c),
        embed=lambda m, ids, types, mask: m(input_ids=ids, token_type_ids=types, mask=mask),
        context=DebertaContext,
        run=lambda layer, h, ctx: layer(h, ctx[0], relative_pos=ctx[1], rel_embeddings=ctx[2])[0],
    ),
    "modernbert": Adapter(
        ModernBertEmbeddings,
        lambda c, i: ModernBertEncoderLayer(c, layer_idx=i),
        embed=lambda m, ids, types, mask: m(input_ids=ids),
        context=ModernBertContext,
        run=_modernbert_run,
        dropouts=("attention_dropout", "mlp_dropout"),
    ),
}


def hf_config(config: TrunkConfig, dropout: float = 0.0) -> PretrainedConfig:
    """Return transformers' config object for ``config``'s family, with ``dropout`` on
    its layers (the trunk uses 0) and PyTorch's fused attention."""
    fields = config.to_hf() | dict.fromkeys(ADAPTERS[config.model_type].dropouts, dropout)
    hf = AutoConfig.for_model(**fields)
    hf._attn_implementation = "sdpa"
    return hf


class Pooler(nn.Module):
    """The family's sequence pooling, as its ``*ForSequenceClassification`` computes it:
    act(dense(first token)) (tanh for BERT and RoBERTa, ReLU for DistilBERT, GELU for
    ELECTRA, DeBERTa's ``pooler_hidden_act``); ModernBERT's norm(act(dense(x))) over the
    first token or the mean, per token for a tagging head."""

    def __init__(self, config: TrunkConfig, per_token: bool) -> None:
        super().__init__()
        h, options, family = config.hidden_size, config.options, config.family.name
        self.pooling = "token" if per_token else options.classifier_pooling or "cls"
        self.norm: nn.Module | None = None
        if family == "modernbert":
            self.dense = nn.Linear(h, h, bias=bool(options.classifier_bias))
            self.act = ACT2FN[options.classifier_activation]
            self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps, bias=bool(options.norm_bias))
        else:
            self.dense = nn.Linear(h, h)
            act = {"distilbert": "relu", "electra": "gelu"}.get(family, "tanh")
            self.act = ACT2FN[options.pooler_hidden_act or act]

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Return the pooled representation [B, H] ([B, T, H] per token)."""
        if self.pooling == "cls":
            hidden = hidden[:, 0]
        elif self.pooling == "mean":
            keep = mask.unsqueeze(-1).to(hidden.dtype)
            hidden = (hidden * keep).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        x = self.act(self.dense(hidden))
        return x if self.norm is None else self.norm(x)


class Branch(nn.Module):
    """A task's own layers on top of the trunk state at its fork: ``num_layers`` encoder
    layers of the trunk's family (may be 0), the family's extras (ModernBERT's final norm,
    a frozen copy of DeBERTa's relative embeddings), a pooler (none for a per-token head,
    except ModernBERT's) and a linear head.

    State dict names: ``layers.{j}.<layer tensor>``, ``context.*``, ``final_norm.*``,
    ``pooler.*``, ``head.*`` (see ``artifacts/branch_file.branch_shapes``).
    """

    def __init__(
        self,
        config: TrunkConfig,
        num_layers: int,
        head: HeadSpec,
        dropout: float = 0.1,
        fork_depth: int = 0,
    ) -> None:
        super().__init__()
        h, adapter, family = config.hidden_size, ADAPTERS[config.model_type], config.family
        hf = hf_config(config, dropout)
        self.spec, self.dropout, self.run = head, dropout, adapter.run
        self.fork_depth = fork_depth
        self.top_target = family.top_target
        self.context = adapter.context(hf)
        self.layers = nn.ModuleList(adapter.layer(hf, fork_depth + j) for j in range(num_layers))
        self.final_norm: nn.Module | None = None
        if family.final_norm:
            bias = bool(config.options.norm_bias)
            self.final_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, bias=bias)
        pooled = not head.per_token or family.token_pooler
        self.pooler = Pooler(config, head.per_token) if pooled else None
        self.head = nn.Linear(h, head.num_outputs)

    def take_from_trunk(
        self, embeddings: Mapping[str, Tensor], top: Mapping[str, Tensor] | None
    ) -> None:
        """Copy what a new branch starts from in the trunk: DeBERTa's relative embeddings
        (from the embeddings component; they stay frozen) and the trunk's top component
        (BERT's pooler, ModernBERT's final norm), where this branch has them.

        Raises:
            RuntimeError: tensors that do not fit this branch.
        """
        state = {k: v for k, v in embeddings.items() if k.startswith("context.")}
        if top and getattr(self, self.top_target.rstrip(".")) is not None:
            state |= {f"{self.top_target}{k}": v for k, v in top.items()}
        unexpected = self.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"trunk tensor {unexpected[0]!r} does not fit the branch")

    def encode(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Return the branch's top hidden state [B, T, H] (after the final norm, where the
        family has one) for trunk state ``hidden`` [B, T, H] and 0/1 ``mask`` [B, T]."""
        context = self.context(hidden, mask)
        for layer in self.layers:
            hidden = self.run(layer, hidden, context)
        return hidden if self.final_norm is None else self.final_norm(hidden)

    def classify(self, states: Tensor, mask: Tensor) -> Tensor:
        """Return logits [B, C] ([B, T, C] for a per-token head) for the branch's top
        hidden state ``states`` (:meth:`encode`) and 0/1 ``mask`` [B, T]."""
        x = states if self.pooler is None else self.pooler(states, mask)
        return self.head(F.dropout(x, self.dropout, self.training))

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Return logits [B, C] for trunk state ``hidden`` [B, T, H] and 0/1 ``mask`` [B, T]
        ([B, T, C] for a per-token head)."""
        return self.classify(self.encode(hidden, mask), mask)
