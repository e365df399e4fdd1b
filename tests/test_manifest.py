"""The typed bundle manifest: bundle ids pinned to the canonical bytes, round trips through
``manifest.json``, subsets, and immutability."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtreg.artifacts.manifest import MANIFEST, Manifest, read_manifest
from mtreg.registry.records import TaskVersionRecord


def _sha(char: str) -> str:
    return char * 64


CONFIG = {
    "model_type": "bert",
    "vocab_size": 90,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "pad_token_id": 0,
}
FINGERPRINT = {
    "tokenizer": _sha("1"),
    "config": _sha("2"),
    "embeddings": _sha("3"),
    "layers": [_sha("4"), _sha("5"), _sha("6")],
}
OBJECTS = {
    "embeddings": _sha("a"),
    "layers": [_sha("b"), _sha("c"), _sha("d")],
    "pooler": None,
    "tokenizer": {"tokenizer.json": _sha("e"), "vocab.txt": _sha("f")},
}
# (task, version, fork depth, branch layers, head kind, labels, inputs, max length, metrics)
MEMBERS = [
    ("topics", "2.0.0", 0, 2, "multilabel", ["a", "b", "c"], ["text"], 64, {"f1": 0.8125, "n": 3}),
    ("sentiment", "1.0.0", 2, 1, "classification", ["neg", "pos"], ["text"], 32, {"accuracy": 0.9}),
    ("para", "1.1.0-rc.1", 1, 1, "regression", [], ["text_a", "text_b"], 48, {}),
]
# The ids the dict-based manifest of the previous release gave these bundles: a change to
# the canonical bytes would change every existing bundle id.
BUNDLE_ID = "b3e3804f1d70a502ec85c8046b096afcb5b9c4563af45a01719ba63e3e7f1599"
SUBSET_ID = "63f9e596a8bcb4ac7643fec3587bc0f6c86b4fb42400254822041a4959badb88"


def _manifest() -> Manifest:
    records = [
        TaskVersionRecord(
            task=task,
            version=version,
            weights_sha256=_sha(str(7 + i)),
            fork_depth=depth,
            num_layers=layers,
            head_kind=kind,
            labels=labels,
            inputs=inputs,
            max_length=max_length,
            trunk="tiny",
            trunk_prefix={},
            metrics=metrics,
        )
        for i, (task, version, depth, layers, kind, labels, inputs, max_length, metrics) in (
            enumerate(MEMBERS)
        )
    ]
    entries = [record.manifest_entry() for record in records]
    return Manifest.build("tiny", CONFIG, FINGERPRINT, OBJECTS, entries)


def test_bundle_ids_are_those_of_the_previous_format() -> None:
    manifest = _manifest()
    assert manifest.bundle_id == BUNDLE_ID
    assert manifest.subset(["topics", "para"]).bundle_id == SUBSET_ID


def test_a_written_manifest_reads_back_equal_and_byte_identical(tmp_path: Path) -> None:
    manifest = _manifest()
    (tmp_path / MANIFEST).write_bytes(manifest.to_bytes())
    again = read_manifest(tmp_path / MANIFEST)
    assert again == manifest
    assert again.to_bytes() == (tmp_path / MANIFEST).read_bytes()
    assert again.bundle_id == BUNDLE_ID


def test_a_subset_keeps_its_tasks_files_and_the_trunk_up_to_their_deepest_fork() -> None:
    manifest = _manifest()
    subset = manifest.subset(["topics", "para"])
    assert list(subset.tasks) == ["para", "topics"]
    assert subset.trunk.depth == 1
    assert sorted(subset.files) == [
        "branches/para.safetensors",
        "branches/topics.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.txt",
        "trunk/embeddings.safetensors",
        "trunk/layer_00.safetensors",
    ]
    assert (subset.cost.bundle_layers, subset.cost.one_model_per_task_layers) == (1 + 3, 6)
    assert (manifest.cost.bundle_layers, manifest.cost.one_model_per_task_layers) == (2 + 4, 9)
    with pytest.raises(KeyError):
        manifest.subset(["nosuch"])


def test_a_manifest_cannot_be_changed_in_place() -> None:
    manifest = _manifest()
    with pytest.raises(TypeError):
        manifest.tasks["topics"] = manifest.tasks["para"]  # type: ignore[index]
    with pytest.raises(TypeError):
        manifest.files["trunk/embeddings.safetensors"] = _sha("0")  # type: ignore[index]
    with pytest.raises(TypeError):
        manifest.tasks["topics"].metrics["f1"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        manifest.trunk.depth = 0  # type: ignore[misc]
    # What to_dict returns is the caller's to change.
    data = manifest.to_dict()
    data["tasks"]["topics"]["metrics"]["f1"] = 1.0
    assert manifest.tasks["topics"].metrics["f1"] == 0.8125
