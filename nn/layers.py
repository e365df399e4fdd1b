"""The building blocks of a BERT-family encoder and of a task branch.

Modules are laid out so that ``state_dict()`` names equal Hugging Face's names relative to
the component (``attention.self.query.weight``, ``output.LayerNorm.bias``, ...): trunk and
branch tensors load with ``load_state_dict(tensors, strict=True)`` and no renaming. In eval
mode everything is deterministic and matches HF ``BertModel``/``RobertaModel`` in fp32.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtreg.artifacts.config import TrunkConfig
from mtreg.core.spec import HeadSpec

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


def attention_bias(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn a [B, T] 0/1 padding mask into a [B, 1, 1, T] additive attention bias:
    0 where a key may be attended to, the dtype's most negative value where it is padding."""
    keep = mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class Embeddings(nn.Module):
    """Word + token-type + position embeddings, then LayerNorm (no dropout)."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        h, pad = config.hidden_size, config.pad_token_id
        self.roberta = config.model_type == "roberta"
        self.pad_token_id = pad
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=pad)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, h, padding_idx=pad if self.roberta else None
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Return the embedding output [B, T, H] (the trunk's hidden state at depth 0)."""
        if self.roberta:  # positions count real tokens from pad+1; padding sits at pad
            real = input_ids.ne(self.pad_token_id).int()
            positions = (torch.cumsum(real, dim=1).type_as(real) * real).long() + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (the projections only; no output dense)."""

    def __init__(self, config: TrunkConfig, dropout: float = 0.0) -> None:
        super().__init__()
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.dropout = dropout
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """Return the attention context [B, T, H] for hidden states [B, T, H]."""

        def split(t: Tensor) -> Tensor:  # [B, T, H] -> [B, heads, T, H / heads]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return y.transpose(1, 2).flatten(2)


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: HF's BertSelfOutput and BertOutput."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """Return the normalised sum, shaped like ``residual``."""
        y = F.dropout(self.dense(x), self.dropout, self.training)
        return self.LayerNorm(y + residual)


class Attention(nn.Module):
    """Self-attention plus its output projection, residual and LayerNorm."""

    def __init__(self, config: TrunkConfig, dropout: float = 0.0) -> None:
        super().__init__()
        h = config.hidden_size
        self.self = SelfAttention(config, dropout)  # named as in HF: attention.self.query...
        self.output = AddNorm(h, h, config.layer_norm_eps, dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """Return the attention sub-layer's output [B, T, H]."""
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    """The feed-forward expansion: activation(dense(x))."""

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        """Return the expanded activations [B, T, intermediate_size]."""
        return self.act(self.dense(x))


class Layer(nn.Module):
    """One post-LN transformer encoder layer, computed exactly as HF's BertLayer.

    ``dropout`` applies to attention probabilities and after each dense projection, and only
    in training mode; the trunk's layers use 0.
    """

    def __init__(self, config: TrunkConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = Attention(config, dropout)
        self.intermediate = Intermediate(config)
        self.output = AddNorm(
            config.intermediate_size, config.hidden_size, config.layer_norm_eps, dropout
        )

    def forward(self, hidden: Tensor, bias: Tensor) -> Tensor:
        """Return the next hidden state [B, T, H]; ``bias`` comes from :func:`attention_bias`."""
        hidden = self.attention(hidden, bias)
        return self.output(self.intermediate(hidden), hidden)


class Pooler(nn.Module):
    """tanh(dense(first token)), as HF's BertPooler."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """Return the pooled representation [B, H] of hidden states [B, T, H]."""
        return torch.tanh(self.dense(hidden[:, 0]))


class Branch(nn.Module):
    """A task's own layers on top of the trunk state at its fork: ``num_layers`` encoder
    layers (may be 0), a pooler (none for a per-token head) and a linear head.

    State dict names: ``layers.{j}.<layer tensor>``, ``pooler.dense.*``, ``head.*``.
    """

    def __init__(
        self, config: TrunkConfig, num_layers: int, head: HeadSpec, dropout: float = 0.1
    ) -> None:
        super().__init__()
        h = config.hidden_size
        self.spec = head
        self.dropout = dropout
        self.layers = nn.ModuleList(Layer(config, dropout) for _ in range(num_layers))
        self.pooler = None if head.per_token else Pooler(h)
        self.head = nn.Linear(h, head.num_outputs)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Return logits [B, C] for trunk state ``hidden`` [B, T, H] and 0/1 ``mask`` [B, T]
        ([B, T, C] for a per-token head)."""
        bias = attention_bias(mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        x = hidden if self.pooler is None else self.pooler(hidden)
        return self.head(F.dropout(x, self.dropout, self.training))
