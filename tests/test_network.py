"""The network code against Hugging Face: the trunk, branches, the merged model.

Each case builds a tiny random BERT/RoBERTa with ``transformers`` (no downloads), loads its
tensors into our modules and compares outputs, not just that calls return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from mtreg.artifacts.checkpoint import embedding_shapes, layer_shapes, pooler_shapes
from mtreg.artifacts.config import TrunkConfig
from mtreg.core.spec import HeadSpec
from mtreg.nn.layers import Branch
from mtreg.nn.network import MultiTaskModel, Standalone, Trunk

TOL = 1e-5
N_LAYERS = 4
SMALL = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    intermediate_size=64,
)


def _bert(act: str) -> Callable[[], tuple[BertConfig, type]]:
    return lambda: (BertConfig(**SMALL, hidden_act=act, max_position_embeddings=64), BertModel)


def _roberta() -> tuple[RobertaConfig, type]:
    config = RobertaConfig(
        **SMALL, pad_token_id=1, type_vocab_size=1, max_position_embeddings=66, hidden_act="gelu"
    )
    return config, RobertaModel


# (id, factory of (HF config, HF model class)) in the style of PEFT's TEST_CASES tables.
CONFIG_CASES = [
    ("bert-gelu", _bert("gelu")),
    ("bert-gelu_new", _bert("gelu_new")),
    ("bert-relu", _bert("relu")),
    ("roberta", _roberta),
]


@dataclass
class Case:
    """One tiny HF encoder, our config for it and a padded batch."""

    config: TrunkConfig
    hf: torch.nn.Module
    input_ids: torch.Tensor
    mask: torch.Tensor
    token_type_ids: torch.Tensor | None

    def hf_states(self) -> tuple[torch.Tensor, ...]:
        """HF hidden states at depths 0..N for the batch."""
        with torch.no_grad():
            out = self.hf(
                input_ids=self.input_ids,
                attention_mask=self.mask,
                token_type_ids=self.token_type_ids,
                output_hidden_states=True,
            )
        return out.hidden_states

    def tensors(self) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """HF's tensors split into (embeddings, [layer 0, layer 1, ...]), prefixes stripped."""
        state = self.hf.state_dict()
        embeddings = {k.removeprefix("embeddings."): v for k, v in state.items() if "embed" in k}
        layers = []
        for i in range(self.config.num_hidden_layers):
            prefix = f"encoder.layer.{i}."
            layers.append({k.removeprefix(prefix): v for k, v in state.items() if prefix in k})
        return embeddings, layers

    def trunk(self, depth: int | None = None) -> Trunk:
        """Our trunk (in eval mode) loaded from HF's tensors, ``depth`` layers deep."""
        embeddings, layers = self.tensors()
        depth = self.config.num_hidden_layers if depth is None else depth
        return Trunk.from_tensors(self.config, embeddings, layers[:depth]).eval()


def padded_batch(
    config: TrunkConfig, lengths: list[int], seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random token ids (never the pad id) right-padded to the longest length, the 0/1
    mask, and token-type ids (a second segment in each row when the vocabulary has two)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, config.vocab_size, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    types = None
    if config.type_vocab_size > 1:
        types = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            types[row, n // 2 : n] = 1
    return ids, mask, types


@pytest.fixture(params=CONFIG_CASES, ids=[name for name, _ in CONFIG_CASES])
def case(request: pytest.FixtureRequest) -> Case:
    """A tiny random HF encoder of each configuration with a padded batch."""
    torch.manual_seed(0)
    hf_config, model_class = request.param[1]()
    # Weights well above HF's default scale (0.02) and LayerNorms off (1, 0), so that a wrong
    # activation (erf vs tanh gelu) or a wrong residual/norm order fails the 1e-5 bound.
    hf_config.initializer_range = 0.2
    hf = model_class(hf_config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    config = TrunkConfig.from_hf(hf_config.to_dict())
    ids, mask, types = padded_batch(config, [9, 4, 7, 1])
    return Case(config, hf, ids, mask, types)


def max_diff_real(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest absolute difference over non-pad positions of [B, T, ...] tensors."""
    keep = mask.bool()
    return (ours[keep] - theirs[keep]).abs().max().item()


def identity_branch(config: TrunkConfig, layers: list[dict[str, torch.Tensor]]) -> Branch:
    """A tagging branch over ``layers`` whose head is the identity: its logits are the
    hidden state after its last layer."""
    h = config.hidden_size
    branch = Branch(config, len(layers), HeadSpec("tagging", tuple(f"u{i}" for i in range(h))))
    for layer, tensors in zip(branch.layers, layers, strict=True):
        layer.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        branch.head.weight.copy_(torch.eye(h))
        branch.head.bias.zero_()
    return branch.eval()


# -- 1. the trunk reproduces HF -------------------------------------------------------------


def test_trunk_matches_hf_at_every_depth(case: Case) -> None:
    theirs = case.hf_states()
    trunk = case.trunk()
    assert set(trunk.state_dict()) == {f"embeddings.{k}" for k in embedding_shapes(case.config)} | {
        f"layers.{i}.{k}" for i in range(N_LAYERS) for k in layer_shapes(case.config)
    }
    with torch.no_grad():
        ours = trunk(case.input_ids, case.mask, case.token_type_ids, depths=range(N_LAYERS + 1))
    assert sorted(ours) == list(range(N_LAYERS + 1))
    for depth in range(N_LAYERS + 1):
        assert max_diff_real(ours[depth], theirs[depth], case.mask) <= TOL, f"depth {depth}"


def test_trunk_single_depths_and_partial_trunk(case: Case) -> None:
    theirs = case.hf_states()
    full, partial = case.trunk(), case.trunk(depth=2)
    assert partial.depth == 2 and len(partial.layers) == 2
    with torch.no_grad():
        for depth in range(N_LAYERS + 1):
            out = full(case.input_ids, case.mask, case.token_type_ids, depths=[depth])
            assert list(out) == [depth]
            assert max_diff_real(out[depth], theirs[depth], case.mask) <= TOL
        out = partial(case.input_ids, case.mask, case.token_type_ids)  # default: full depth
        assert list(out) == [2]
        assert max_diff_real(out[2], theirs[2], case.mask) <= TOL
    with pytest.raises(ValueError, match="depth 3"):
        partial(case.input_ids, case.mask, depths=[3])


def test_trunk_runs_each_layer_once_and_stops_at_the_deepest_request(case: Case) -> None:
    trunk = case.trunk()
    calls = [0] * N_LAYERS
    for i, layer in enumerate(trunk.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        trunk(case.input_ids, case.mask, case.token_type_ids, depths=[0, 2, 1, 2])
    assert calls == [1, 1, 0, 0]


def embedding_output(trunk: Trunk, ids: torch.Tensor, types: torch.Tensor | None = None):
    """The trunk's hidden state at depth 0 (its embeddings) for unpadded ``ids``."""
    return trunk(ids, torch.ones_like(ids), types, depths=[0])[0]


def test_embeddings_default_token_types_are_zero(case: Case) -> None:
    trunk = case.trunk(depth=0)
    zeros = torch.zeros_like(case.input_ids)
    assert torch.equal(
        embedding_output(trunk, case.input_ids), embedding_output(trunk, case.input_ids, zeros)
    )


def test_roberta_positions_skip_padding() -> None:
    torch.manual_seed(0)
    hf_config, model_class = _roberta()
    hf = model_class(hf_config, add_pooling_layer=False).eval()
    config = TrunkConfig.from_hf(hf_config.to_dict())
    trunk = Trunk.from_tensors(
        config,
        {k.removeprefix("embeddings."): v for k, v in hf.state_dict().items() if "embed" in k},
        [],
    )
    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])
    with torch.no_grad():
        ours = embedding_output(trunk, ids)
        expected = hf.embeddings(input_ids=ids)
    assert (ours - expected).abs().max().item() <= TOL
    # a real token sits at position pad+1+index: moving padding does not shift it
    with torch.no_grad():
        assert torch.allclose(embedding_output(trunk, ids[:, :4]), ours[:, :4], atol=TOL)


# -- 2. a branch is a stack of layers -------------------------------------------------------


@pytest.mark.parametrize(
    "kind, labels",
    [
        ("classification", ("a", "b", "c")),
        ("multilabel", ("x",)),
        ("regression", ()),
        ("tagging", ("O", "B", "I")),
    ],
)
@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_branch_state_dict_names(kind: str, labels: tuple[str, ...], num_layers: int) -> None:
    config = TrunkConfig("bert", **SMALL)
    head = HeadSpec(kind, labels)  # type: ignore[arg-type]
    branch = Branch(config, num_layers, head)
    h = config.hidden_size
    expected = {
        f"layers.{j}.{name}": shape
        for j in range(num_layers)
        for name, shape in layer_shapes(config).items()
    }
    if kind != "tagging":
        expected |= {f"pooler.{name}": shape for name, shape in pooler_shapes(config).items()}
    expected |= {"head.weight": (head.num_outputs, h), "head.bias": (head.num_outputs,)}
    state = branch.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert (branch.pooler is None) == (kind == "tagging")
    # the same names load back strictly into a fresh branch
    fresh = Branch(config, num_layers, head)
    fresh.load_state_dict({k: torch.randn_like(v) for k, v in state.items()}, strict=True)


def test_branch_layers_reproduce_hf_layers(case: Case) -> None:
    theirs = case.hf_states()
    _, layers = case.tensors()
    with torch.no_grad():
        for i in range(N_LAYERS):
            one = identity_branch(case.config, [layers[i]])
            ours = one(theirs[i], case.mask)
            assert max_diff_real(ours, theirs[i + 1], case.mask) <= TOL, f"layer {i}"
            layer = case.trunk().layers[i]
            keep = case.mask[:, None, None, :].float()  # an additive mask, as HF's eager path
            alone = layer(theirs[i], (1.0 - keep) * torch.finfo(torch.float32).min)
            assert max_diff_real(alone, theirs[i + 1], case.mask) <= TOL
        two = identity_branch(case.config, layers[1:3])
        assert max_diff_real(two(theirs[1], case.mask), theirs[3], case.mask) <= TOL
        none = identity_branch(case.config, [])
        assert max_diff_real(none(theirs[2], case.mask), theirs[2], case.mask) <= TOL


def test_branch_pooler_and_head_match_hf_formula(case: Case) -> None:
    theirs = case.hf_states()
    branch = Branch(case.config, 0, HeadSpec("classification", ("a", "b"))).eval()
    with torch.no_grad():
        pooled = torch.tanh(branch.pooler.dense(theirs[N_LAYERS][:, 0]))
        expected = branch.head(pooled)
        assert torch.equal(branch(theirs[N_LAYERS], case.mask), expected)


def test_branch_dropout_only_in_training() -> None:
    config = TrunkConfig("bert", **SMALL)
    branch = Branch(config, 2, HeadSpec("classification", ("a", "b")), dropout=0.1)
    hidden, mask = torch.randn(3, 5, 32), torch.ones(3, 5, dtype=torch.long)
    branch.train()
    torch.manual_seed(1)
    first = branch(hidden, mask)
    second = branch(hidden, mask)
    assert not torch.equal(first, second)
    first.sum().backward()
    assert all(p.grad is not None for p in branch.parameters())
    branch.eval()
    with torch.no_grad():
        assert torch.equal(branch(hidden, mask), branch(hidden, mask))


# -- 3. the merged network ------------------------------------------------------------------

# task -> (fork depth, branch layers, head): forks at 0, 2, 3 and N; every head kind; 0..2
TASKS = {
    "topic": (0, 2, HeadSpec("classification", ("news", "sport", "tech"))),
    "flags": (2, 1, HeadSpec("multilabel", ("toxic", "spam"))),
    "ner": (2, 2, HeadSpec("tagging", ("O", "B-PER", "I-PER"))),
    "score": (N_LAYERS, 0, HeadSpec("regression")),
    "style": (3, 1, HeadSpec("regression", ("formal", "fluent"))),
    "intent": (N_LAYERS, 1, HeadSpec("classification", ("ask", "tell"))),
}


def merged_model(case: Case) -> MultiTaskModel:
    """A MultiTaskModel of TASKS on the case's trunk, random branch weights, eval mode."""
    torch.manual_seed(2)
    branches = {}
    for task, (depth, size, head) in TASKS.items():
        branch = Branch(case.config, size, head)
        with torch.no_grad():  # non-trivial LayerNorm parameters
            for name, p in branch.named_parameters():
                if "LayerNorm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        branches[task] = (depth, branch)
    return MultiTaskModel(case.trunk(), branches).eval()


def test_merged_equals_standalone(case: Case) -> None:
    model = merged_model(case)
    assert model.tasks == sorted(TASKS)
    assert model.fork_depths == {task: spec[0] for task, spec in TASKS.items()}
    batch = (case.input_ids, case.mask, case.token_type_ids)
    with torch.no_grad():
        merged = model(*batch)
        assert list(merged) == sorted(TASKS)
        for task, (depth, _, head) in TASKS.items():
            alone = Standalone(model.trunk, depth, model.branches[task]).eval()(*batch)
            width = (len(case.mask), case.mask.shape[1]) if head.kind == "tagging" else (4,)
            assert merged[task].shape == (*width, head.num_outputs)
            assert (merged[task] - alone).abs().max().item() <= TOL, task


def test_merged_subset_returns_only_those_tasks(case: Case) -> None:
    model = merged_model(case)
    calls = [0] * N_LAYERS
    for i, layer in enumerate(model.trunk.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = (case.input_ids, case.mask, case.token_type_ids)
    with torch.no_grad():
        full = model(*batch)
        assert calls == [1] * N_LAYERS  # the trunk ran once for six tasks
        calls[:] = [0] * N_LAYERS
        subset = model(*batch, tasks=["ner", "topic"])
        assert calls == [1, 1, 0, 0]  # stopped at the deepest requested fork (2)
    assert sorted(subset) == ["ner", "topic"]
    for task, logits in subset.items():
        assert (logits - full[task]).abs().max().item() <= TOL
    with torch.no_grad():
        assert model(*batch, tasks=[]) == {}
    with pytest.raises(ValueError, match="'nope'"):
        model(*batch, tasks=["topic", "nope"])


@pytest.mark.parametrize(
    ("tasks", "rows"),
    [
        (None, None),
        (["ner", "topic"], None),
        (["intent", "score", "flags"], {"intent": [0, 2], "flags": [3]}),
        (["style"], {"style": [1]}),
    ],
    ids=["all", "two-forks", "some-rows", "one-row"],
)
def test_branch_timings_name_the_branches_run_and_change_no_output(
    case: Case, tasks: list[str] | None, rows: dict[str, list[int]] | None
) -> None:
    model = merged_model(case)
    batch = (case.input_ids, case.mask, case.token_type_ids)
    timings: dict[str, float] = {}
    with torch.no_grad():
        plain = model(*batch, tasks=tasks, rows=rows)
        timed = model(*batch, tasks=tasks, rows=rows, timings=timings)
    assert set(timings) == set(plain) == set(TASKS if tasks is None else tasks)
    assert all(isinstance(s, float) and 0 < s < 60 for s in timings.values())
    assert list(timed) == list(plain)
    for task, logits in plain.items():
        assert torch.equal(timed[task], logits), task


def test_padding_does_not_change_a_sentence(case: Case) -> None:
    model = merged_model(case)
    row, n = 2, int(case.mask[2].sum())  # a 7-token sentence in a batch padded to 9
    types = None if case.token_type_ids is None else case.token_type_ids[row : row + 1, :n]
    with torch.no_grad():
        batched = model(case.input_ids, case.mask, case.token_type_ids)
        alone = model(case.input_ids[row : row + 1, :n], case.mask[row : row + 1, :n], types)
    for task, (_, _, head) in TASKS.items():
        ours = batched[task][row]
        if head.kind == "tagging":
            ours = ours[:n]
        assert (ours - alone[task][0]).abs().max().item() <= TOL, task


def test_standalone_can_be_exported(case: Case) -> None:
    model = merged_model(case)
    alone = Standalone(model.trunk, 2, model.branches["ner"]).eval()
    batch = (case.input_ids, case.mask, case.token_type_ids)
    program = torch.export.export(alone, batch, strict=False)
    with torch.no_grad():
        assert torch.equal(program.module()(*batch), alone(*batch))


# -- 4. errors ------------------------------------------------------------------------------


def test_fork_deeper_than_trunk_is_refused() -> None:
    config = TrunkConfig("bert", **SMALL)
    trunk = Trunk(config, 2)
    ok = Branch(config, 1, HeadSpec("regression"))
    deep = Branch(config, 0, HeadSpec("classification", ("a", "b")))
    with pytest.raises(ValueError, match=r"task 'too-deep' forks at depth 3.*0\.\.2"):
        MultiTaskModel(trunk, {"fine": (2, ok), "too-deep": (3, deep)})
    with pytest.raises(ValueError, match="'negative'"):
        MultiTaskModel(trunk, {"negative": (-1, ok)})
    with pytest.raises(ValueError, match="fork depth 3"):
        Standalone(trunk, 3, deep)
    with pytest.raises(ValueError, match="trunk depth 5"):
        Trunk(config, 5)
