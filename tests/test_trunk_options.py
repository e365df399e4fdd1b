"""A trunk's family options are a typed object (``artifacts.families.Options``), read in one
place, and the change kept every fingerprint: the architecture hashes below were computed by
the code that held the options as a plain dict, so a trunk registered before still matches.
"""

from __future__ import annotations

import json

import pytest

from mtreg.artifacts.config import TrunkConfig
from mtreg.artifacts.families import Options

COMMON = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
# model type -> (its config.json, the architecture hash the dict-based code gave it)
PINNED = {
    "bert": (
        {"model_type": "bert", **COMMON},
        "09039bb548b660cbb10ce675f095f5c4142b0f58076a6a77e0e196a4f7b397bc",
    ),
    "distilbert": (
        {"model_type": "distilbert", "vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 4}
        | {"hidden_dim": 64},
        "16cf3edbb2352cfaee4febf917370dff343e0a4051f16b60665e01f454606d79",
    ),
    "electra": (
        {"model_type": "electra", **COMMON, "embedding_size": 16},
        "1fdebff4ec6a58299d8a6e1f8b474ee440c968db5c687ab4f260391bfe0e6722",
    ),
    "deberta-v2": (
        {"model_type": "deberta-v2", **COMMON, "relative_attention": True}
        | {"position_buckets": 16, "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm"}
        | {"share_att_key": True, "position_biased_input": False},
        "f525e2e29fdd0ab2c21629f93dc9e10a785f31f75fa3bcccedf6154907199b4c",
    ),
    "modernbert": (
        {"model_type": "modernbert", **COMMON, "global_attn_every_n_layers": 2}
        | {"local_attention": 8},
        "cdbd6f40fc6a99bdf1197799d6e0104979abad4bb21afb22ff8af313b4d26258",
    ),
}


@pytest.mark.parametrize("model_type", list(PINNED))
def test_the_architecture_hash_is_what_it_was(model_type: str) -> None:
    hf, expected = PINNED[model_type]
    config = TrunkConfig.from_hf(hf)
    assert isinstance(config.options, Options)
    assert config.architecture_hash() == expected


@pytest.mark.parametrize("model_type", list(PINNED))
def test_the_stored_form_reads_back_to_the_same_config(model_type: str) -> None:
    config = TrunkConfig.from_hf(PINNED[model_type][0])
    # What a registry row and a manifest hold: JSON, the family's own option names only.
    stored = json.loads(json.dumps(config.to_dict()))
    assert set(stored["options"]) == set(config.family.options)
    again = TrunkConfig(**stored)
    assert again == config and isinstance(again.options, Options)
    assert again.to_dict() == stored and again.architecture_hash() == PINNED[model_type][1]


def test_options_are_typed_values() -> None:
    deberta = TrunkConfig.from_hf(PINNED["deberta-v2"][0]).options
    assert deberta.pos_att_type == ("c2p", "p2c") and deberta.relative_attention is True
    assert deberta.norm_bias is None  # a ModernBERT field: not DeBERTa's
    modern = TrunkConfig.from_hf(PINNED["modernbert"][0]).options
    assert modern.global_attn_every_n_layers == 2 and modern.classifier_pooling == "cls"
    assert TrunkConfig("bert", **COMMON).to_dict()["options"] == {}
    with pytest.raises(TypeError):
        Options.of({"no_such_option": 1})
