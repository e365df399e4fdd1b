"""A model card names the trunk's Hub id as ``base_model``: the id a trunk was added by
(offline, from a Hub cache the test builds), else the checkpoint's ``_name_or_path`` when it
is a Hub id. It is provenance only: fingerprints and the compatibility rule ignore it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import Checkpoints
from helpers import hub_cache, publish_tasks

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.registry.api import Registry
from mtreg.runtime.export import export_dir, export_hf

TASKS = [("sentiment", ("classification", ("neg", "pos")), 1, 1, ("text",))]


def _card(folder: Path) -> object:
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data


def _registered(tmp: Path, source: str | Path) -> Registry:
    """A registry in ``tmp`` with trunk ``tiny`` added from ``source`` and task
    ``sentiment`` registered on it (the caller closes it)."""
    registry = Registry(f"sqlite:///{tmp / 'home' / 'registry.db'}", tmp / "home")
    registry.plugins_dirs = (tmp / "plugins",)
    registry.add_trunk("tiny", source)
    checkpoint = read_checkpoint(Path(registry.trunk("tiny").source))
    publish_tasks(tmp, checkpoint, TASKS, {"sentiment": "1.0.0"})
    registry.discover(refresh=True)
    registry.register(all=True)
    return registry


@pytest.mark.slow
def test_a_trunk_added_by_hub_id_names_it_in_every_card(
    tmp_path: Path, checkpoints: Checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_cache(tmp_path / "hub", "acme/tiny-bert", checkpoints.shared(2))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with _registered(tmp_path, "acme/tiny-bert@main") as registry:
        trunk = registry.trunk("tiny")
        assert trunk.config["base_model"] == "acme/tiny-bert"  # the id, not the revision
        direct = read_checkpoint(checkpoints.shared(2)).fingerprint.to_dict()
        assert trunk.fingerprint == direct  # provenance is not architecture
        bundle = registry.bundle_path("latest")
        assert _card(bundle).base_model == "acme/tiny-bert"
        export_dir(bundle, tmp_path / "dir")
        export_hf(bundle, tmp_path / "hf", "sentiment")
    for out in ("dir", "hf"):
        assert _card(tmp_path / out).base_model == "acme/tiny-bert", out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name_or_path", "expected"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("/tmp/some/local/folder", None),  # where it was saved from, not a Hub id
    ],
    ids=["hub-id", "local-path"],
)
def test_a_folder_trunk_takes_its_name_or_path_when_it_is_a_hub_id(
    tmp_path: Path, checkpoints: Checkpoints, name_or_path: str, expected: str | None
) -> None:
    folder = checkpoints.copy(tmp_path / "trunk", num_layers=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    with _registered(tmp_path, folder) as registry:
        assert registry.trunk("tiny").config.get("base_model") == expected
        assert _card(registry.bundle_path("latest")).base_model == expected
