"""The Hugging Face Hub through huggingface_hub, offline: trunks and teachers given as Hub
ids resolve through a cache folder the test builds in the Hub's layout (HF_HUB_OFFLINE=1),
exports carry a real model card, and --push-to-hub refuses what it cannot do in one line,
before anything is written. No test here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from factories import Checkpoints
from harness import CliPool, registry_state
from helpers import HUB_COMMIT, hub_cache, publish_tasks

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.hub import resolve
from mtreg.errors import MtregError

TASKS = [
    ("sentiment", ("classification", ("neg", "pos")), 1, 1, ("text",)),
    ("slots", ("tagging", ("O", "B-x", "I-x")), 0, 1, ("text",)),
]


@pytest.fixture
def offline(tmp_path: Path, checkpoints: Checkpoints) -> dict[str, str]:
    """An environment with a registry home, HF_HUB_OFFLINE=1 and a Hub cache holding the
    tiny trunk as ``acme/tiny-bert``."""
    hub_cache(tmp_path / "hub", "acme/tiny-bert", checkpoints.shared(2))
    return {
        **os.environ,
        "MTREG_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf-home"),
    }


@pytest.mark.slow
def test_a_trunk_is_added_from_the_hub_cache_offline(
    pool: CliPool, offline: dict[str, str], checkpoints: Checkpoints, tmp_path: Path
) -> None:
    assert pool.run(offline, "init").code == 0
    added = pool.run(offline, "trunk", "add", "tiny", "acme/tiny-bert", "--json")
    assert added.code == 0, added.stderr
    shown = pool.run(offline, "trunk", "show", "tiny", "--json")
    expected = read_checkpoint(checkpoints.shared(2)).fingerprint.to_dict()
    assert '"embeddings": "' + expected["embeddings"] + '"' in shown.stdout
    assert HUB_COMMIT in shown.stdout  # the source is the cached snapshot


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ("trunk", "add", "other", "acme/not-downloaded"),
        ("onboard", "toy", "--teacher", "acme/not-downloaded"),
    ],
    ids=["trunk add", "onboard --teacher"],
)
def test_an_id_missing_from_the_cache_offline_is_one_line(
    pool: CliPool, offline: dict[str, str], tmp_path: Path, argv: tuple[str, ...]
) -> None:
    from toy import PLUGIN

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toyplug.py").write_text(PLUGIN)
    env = {**offline, "MTREG_PLUGINS_PATH": str(tmp_path / "plugins")}
    assert pool.run(env, "init").code == 0
    assert pool.run(env, "trunk", "add", "tiny", "acme/tiny-bert").code == 0
    url, home = f"sqlite:///{tmp_path / 'home' / 'registry.db'}", str(tmp_path / "home")
    before = registry_state(url, home)
    result = pool.run(env, *argv)
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "acme/not-downloaded" in lines[0], result.stderr
    assert "HF_HUB_OFFLINE is set" in lines[0] and "hf download" in lines[0]
    assert registry_state(url, home) == before


def test_a_teacher_id_resolves_to_the_cached_snapshot(
    offline: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.setenv(key, offline[key])
    folder = resolve("acme/tiny-bert", "teacher")
    assert folder == tmp_path / "hub" / "models--acme--tiny-bert" / "snapshots" / HUB_COMMIT
    assert resolve("acme/tiny-bert@main", "teacher") == folder
    assert resolve(tmp_path, "teacher") == tmp_path  # a folder is used as it is
    with pytest.raises(MtregError, match="not in the Hugging Face cache"):
        resolve("acme/other", "teacher")


@pytest.fixture
def exported(tmp_path: Path, checkpoints: Checkpoints) -> tuple[Path, dict[str, str]]:
    """A registry (env) with the two TASKS registered on the tiny trunk."""
    from mtreg.registry.api import Registry

    folder = checkpoints.copy(tmp_path / "trunk", num_layers=2)
    with Registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}", tmp_path / "home") as reg:
        reg.plugins_dirs = (tmp_path / "plugins",)
        reg.add_trunk("tiny", folder)
        publish_tasks(
            tmp_path, read_checkpoint(folder), TASKS, {"sentiment": "1.0.0", "slots": "1.0.0"}
        )
        reg.discover(refresh=True)
        reg.register(all=True)
    env = {
        **os.environ,
        "MTREG_HOME": str(tmp_path / "home"),
        "MTREG_PLUGINS_PATH": str(tmp_path / "plugins"),
        "HF_HUB_OFFLINE": "1",
    }
    return tmp_path, env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "kind", "datasets"),
    [
        (("--format", "dir"), "mtreg", ["sentiment", "slots"]),
        (("--format", "hf", "--tasks", "slots"), "transformers", ["slots"]),
        (("--format", "onnx"), "mtreg", ["sentiment", "slots"]),
    ],
    ids=["dir", "hf", "onnx"],
)
def test_exports_carry_a_hub_model_card(
    pool: CliPool, exported, argv: tuple[str, ...], kind: str, datasets: list[str]
) -> None:
    from huggingface_hub import ModelCard

    tmp, env = exported
    out = tmp / "out"
    result = pool.run(env, "export", "--bundle", "latest", "--out", str(out), *argv)
    assert result.code == 0, result.stderr
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other" and card.data.library_name == kind
    assert card.data.datasets == datasets and card.data.metrics == ["accuracy"]
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {(name, "accuracy"): 0.5 for name in datasets}
    assert "| task | version | head |" in card.text  # the evaluation table
    if kind == "transformers":
        assert card.data.pipeline_tag == "token-classification"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("no-owner", "give a Hub repository id as owner/name"),
        ("acme/../x", "give a Hub repository id as owner/name"),
        ("acme/bundle", "HF_HUB_OFFLINE is set"),
    ],
)
def test_push_to_hub_refuses_before_writing(
    pool: CliPool, exported, repo: str, message: str
) -> None:
    tmp, env = exported
    out = tmp / "out"
    result = pool.run(env, "export", "--bundle", "latest", "--out", str(out), "--push-to-hub", repo)
    assert result.code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
