"""The Registry API end to end: real databases, real safetensors, real plugin files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import Checkpoints, make_branch_file
from helpers import snapshot, task_spec, write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.core.spec import HeadSpec
from mtreg.errors import (
    AlreadyExists,
    IncompatibleTrunk,
    InvalidCheckpoint,
    InvalidName,
    InvalidVersion,
    InvalidWeights,
    MtregError,
    NotFound,
)
from mtreg.registry.api import Registry

SENTIMENT = ("classification", ("neg", "pos"))
TOPIC = ("classification", ("a", "b", "c"))


class World:
    """A registry in tmp_path with one trunk and a plugin directory to write tasks into."""

    def __init__(self, tmp_path: Path, url: str, checkpoints: Checkpoints) -> None:
        self.tmp = tmp_path
        self.checkpoints = checkpoints
        self.url = url
        self.home = tmp_path / "home"
        self.plugins = tmp_path / "plugins"
        self.plugins.mkdir()
        self.trunk_dir = checkpoints.copy(tmp_path / "trunk", num_layers=3, seed=0)
        self.checkpoint = read_checkpoint(self.trunk_dir)
        self.registry = Registry(url=url, home=self.home, plugins_dirs=[self.plugins])
        self.registry.add_trunk("tiny", self.trunk_dir)

    def branch(
        self,
        task: str,
        version: str,
        depth: int = 2,
        layers: int = 1,
        head=SENTIMENT,
        seed: int = 0,
        checkpoint=None,
    ) -> Path:
        path = self.tmp / "weights" / f"{task}-{version}-{seed}.safetensors"
        path.parent.mkdir(exist_ok=True)
        return make_branch_file(
            path,
            checkpoint or self.checkpoint,
            task,
            version,
            depth,
            layers,
            HeadSpec(head[0], head[1]),
            seed=seed,
        )

    def plugin(self, module: str, *tasks: dict) -> None:
        write_plugin(self.plugins, module, list(tasks))
        self.registry.discover(refresh=True)

    def task(self, name: str, version: str, head=SENTIMENT, **branch) -> dict:
        return task_spec(name, self.branch(name, version, head=head, **branch), version, head)

    def snapshot(self) -> dict:
        return snapshot(self.url, self.home)


@pytest.fixture
def world(tmp_path: Path, db_url: str, checkpoints: Checkpoints):
    w = World(tmp_path, db_url, checkpoints)
    yield w
    w.registry.close()


def test_trunk_is_recorded_with_fingerprint_and_copied(world: World) -> None:
    record = world.registry.trunk("tiny")
    assert record.num_layers == 3
    assert record.fingerprint == world.checkpoint.fingerprint.to_dict()
    # The registry keeps its own copy: deleting the source folder breaks nothing.
    for sha in [record.objects["embeddings"], *record.objects["layers"]]:
        assert world.registry.objects.has(sha)
    assert [t.name for t in world.registry.trunks()] == ["tiny"]


@pytest.mark.parametrize(
    ("name", "error"), [("tiny", AlreadyExists), ("../x", InvalidName), ("Big", InvalidName)]
)
def test_trunk_add_refusals_change_nothing(world: World, name: str, error: type) -> None:
    before = world.snapshot()
    with pytest.raises(error):
        world.registry.add_trunk(name, world.trunk_dir)
    assert world.snapshot() == before


def test_trunk_add_refuses_a_folder_that_is_not_a_checkpoint(world: World) -> None:
    before = world.snapshot()
    with pytest.raises(InvalidCheckpoint):
        world.registry.add_trunk("other", world.tmp / "plugins")
    assert world.snapshot() == before


def test_register_builds_a_bundle_and_latest_follows(world: World) -> None:
    world.plugin(
        "p",
        world.task("sentiment", "1.0.0", depth=1),
        world.task("topic", "1.0.0", head=TOPIC, depth=3, layers=2),
    )
    changes = world.registry.register(all=True)
    assert [(t.task, t.change) for t in changes.tasks] == [
        ("sentiment", "added"),
        ("topic", "added"),
    ]
    (bundle,) = changes.bundles
    assert bundle.members == {"sentiment": "1.0.0", "topic": "1.0.0"}
    assert "latest" in bundle.aliases
    path = world.registry.bundle_path("latest")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["trunk"]["depth"] == 3
    assert sorted(p.name for p in (path / "trunk").iterdir()) == [
        "embeddings.safetensors",
        "layer_00.safetensors",
        "layer_01.safetensors",
        "layer_02.safetensors",
    ]
    assert manifest["cost"] == {"bundle_layers": 3 + 1 + 2, "one_model_per_task_layers": 6}
    tasks = {t.name: t for t in world.registry.tasks()}
    assert tasks["topic"].active_version == "1.0.0"
    assert world.registry.versions("topic")[0].fork_depth == 3


def test_same_version_same_weights_is_a_no_op(world: World) -> None:
    world.plugin("p", world.task("sentiment", "1.0.0"))
    world.registry.register(["sentiment"])
    before = world.snapshot()
    changes = world.registry.register(["sentiment"])
    assert changes.tasks[0].change == "unchanged"
    assert changes.bundles == []
    assert world.snapshot() == before


def test_upgrade_keeps_other_branches_byte_identical(world: World) -> None:
    world.plugin("p", world.task("sentiment", "1.0.0"), world.task("topic", "1.0.0", head=TOPIC))
    world.registry.register(all=True)
    old = world.registry.bundle_path("latest")
    world.plugin(
        "p", world.task("sentiment", "1.1.0", seed=5), world.task("topic", "1.0.0", head=TOPIC)
    )
    changes = world.registry.register(["sentiment"])
    assert changes.tasks[0].change == "upgraded" and changes.tasks[0].previous == "1.0.0"
    new = world.registry.bundle_path("latest")
    assert new != old and old.is_dir()
    same = "branches/topic.safetensors"
    assert (new / same).read_bytes() == (old / same).read_bytes()
    # Incremental: the unchanged branch is the same object, linked, not rewritten.
    assert (new / same).stat().st_ino == (old / same).stat().st_ino
    assert world.registry.diff(old.name, "latest") == {"sentiment": {"a": "1.0.0", "b": "1.1.0"}}


def test_bundles_are_deterministic(world: World, tmp_path: Path) -> None:
    world.plugin("p", world.task("sentiment", "1.0.0"), world.task("topic", "1.0.0", head=TOPIC))
    first = world.registry.register(all=True).bundles[0]
    # A second registry with the same trunk and members builds the same id and bytes.
    other = Registry(
        url=f"sqlite:///{tmp_path / 'other.db'}",
        home=tmp_path / "home2",
        plugins_dirs=[world.plugins],
    )
    other.add_trunk("tiny", world.trunk_dir)
    second = other.register(all=True).bundles[0]
    other.close()
    assert first.id == second.id
    a, b = world.home / "bundles" / first.id, tmp_path / "home2" / "bundles" / second.id
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_remove_rollback_and_history(world: World) -> None:
    world.plugin("p", world.task("sentiment", "1.0.0"))
    world.registry.register(["sentiment"])
    world.plugin("p", world.task("sentiment", "2.0.0", head=("classification", ("n", "p"))))
    world.registry.register(["sentiment"])
    world.registry.rollback("sentiment", "1.0.0")
    assert world.registry.task("sentiment").active_version == "1.0.0"
    assert world.registry.bundle("latest").members == {"sentiment": "1.0.0"}
    world.registry.remove("sentiment")
    assert world.registry.tasks() == []
    assert world.registry.task("sentiment").status == "removed"
    assert world.registry.bundle("latest").members == {}
    assert [v.version for v in world.registry.versions("sentiment")] == ["1.0.0", "2.0.0"]
    with pytest.raises(MtregError, match="already removed"):
        world.registry.remove("sentiment")
    with pytest.raises(NotFound, match=r"1\.0\.0, 2\.0\.0"):
        world.registry.rollback("sentiment", "3.0.0")
    kinds = [e.kind for e in world.registry.events(subject="sentiment")]
    assert kinds[:4] == ["task.remove", "task.rollback", "task.upgraded", "task.added"]


def test_dry_runs_write_nothing(world: World) -> None:
    world.plugin("p", world.task("sentiment", "1.0.0"))
    before = world.snapshot()
    changes = world.registry.register(["sentiment"], dry_run=True)
    assert changes.tasks[0].change == "added"
    assert world.snapshot() == before
    world.registry.register(["sentiment"])
    before = world.snapshot()
    world.registry.remove("sentiment", dry_run=True)
    world.registry.gc(dry_run=True)
    world.registry.sync(dry_run=True)
    assert world.snapshot() == before


def _refusal_cases():
    """(description, setup(world) -> task names to register, error type, message part)."""

    def missing_weights(w):
        w.plugin(
            "p",
            {
                "name": "t",
                "version": "1.0.0",
                "head": SENTIMENT,
                "weights": str(w.tmp / "nope.safetensors"),
                "trunk": "tiny",
            },
        )
        return ["t"]

    def truncated(w):
        spec = w.task("t", "1.0.0")
        path = Path(spec["weights"])
        path.write_bytes(path.read_bytes()[:-100])
        w.plugin("p", spec)
        return ["t"]

    def other_trunk(w):
        alien = read_checkpoint(w.checkpoints.copy(w.tmp / "alien", num_layers=3, seed=1))
        w.plugin("p", w.task("t", "1.0.0", checkpoint=alien))
        return ["t"]

    def wrong_labels(w):
        spec = w.task("t", "1.0.0")
        spec["head"] = ("classification", ("x", "y"))
        w.plugin("p", spec)
        return ["t"]

    def unknown_trunk(w):
        spec = w.task("t", "1.0.0")
        spec["trunk"] = "nosuch"
        w.plugin("p", spec)
        return ["t"]

    def not_greater(w):
        w.plugin("p", w.task("t", "1.2.0"))
        w.registry.register(["t"])
        w.plugin("p", w.task("t", "1.1.0", seed=3))
        return ["t"]

    def same_version_other_weights(w):
        w.plugin("p", w.task("t", "1.0.0"))
        w.registry.register(["t"])
        w.plugin("p", w.task("t", "1.0.0", seed=3))
        return ["t"]

    def labels_without_major(w):
        w.plugin("p", w.task("t", "1.0.0"))
        w.registry.register(["t"])
        w.plugin("p", w.task("t", "1.1.0", head=TOPIC))
        return ["t"]

    def duplicate_across_plugins(w):
        w.plugin("p", w.task("t", "1.0.0"))
        w.plugin("q", w.task("t", "1.0.0"))
        return ["t"]

    def broken_plugin(w):
        (w.plugins / "broken.py").write_text("import no_such_module\n")
        w.registry.discover(refresh=True)
        return ["broken-task"]

    def one_bad_spoils_all(w):
        w.plugin(
            "p",
            w.task("good", "1.0.0"),
            {
                "name": "bad",
                "version": "1.0.0",
                "head": SENTIMENT,
                "weights": str(w.tmp / "missing.safetensors"),
                "trunk": "tiny",
            },
        )
        return ["good", "bad"]

    return [
        ("missing weights", missing_weights, InvalidWeights, "not found"),
        ("truncated weights", truncated, InvalidWeights, "'t'"),
        ("trained on another trunk", other_trunk, IncompatibleTrunk, "embeddings"),
        ("label list differs from the file", wrong_labels, InvalidWeights, "label"),
        ("unknown trunk", unknown_trunk, NotFound, "mtreg trunk add"),
        ("version not greater", not_greater, InvalidVersion, "not greater"),
        ("same version, other weights", same_version_other_weights, AlreadyExists, "bump"),
        ("labels changed without major bump", labels_without_major, InvalidVersion, "major"),
        ("duplicate task across plugins", duplicate_across_plugins, MtregError, "both"),
        ("broken plugin", broken_plugin, NotFound, "broken-task"),
        ("all or nothing", one_bad_spoils_all, InvalidWeights, "'bad'"),
    ]


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [case[1:] for case in _refusal_cases()],
    ids=[case[0] for case in _refusal_cases()],
)
def test_every_refusal_leaves_the_registry_unchanged(
    world: World, setup, error: type, message: str
) -> None:
    names = setup(world)
    before = world.snapshot()
    with pytest.raises(error, match=message) as info:
        world.registry.register(names)
    assert "\n" not in str(info.value)
    assert world.snapshot() == before


def test_sync_registers_what_it_can_and_reports_the_rest(world: World) -> None:
    world.plugin(
        "p",
        world.task("good", "1.0.0"),
        {"name": "untrained", "version": "1.0.0", "head": SENTIMENT, "trunk": "tiny"},
    )
    (world.plugins / "broken.py").write_text("raise RuntimeError('boom')\n")
    world.registry.discover(refresh=True)
    changes = world.registry.sync()
    assert [(t.task, t.change) for t in changes.tasks] == [("good", "added")]
    refused = {r.task: r.reason for r in changes.refused}
    assert "boom" in " ".join(refused.values())
    assert [s.task for s in changes.skipped] == ["untrained"]
    assert len(changes.bundles) == 1


def test_alias_serving_moves_only_when_asked(world: World) -> None:
    world.plugin("p", world.task("sentiment", "1.0.0"))
    first = world.registry.register(["sentiment"], promote=True).bundles[0]
    assert set(first.aliases) == {"latest", "serving"}
    world.plugin("p", world.task("sentiment", "1.1.0", seed=4))
    second = world.registry.register(["sentiment"]).bundles[0]
    assert world.registry.bundle("serving").id == first.id
    assert world.registry.bundle("latest").id == second.id
    world.registry.set_alias("serving", second.id[:10])
    assert world.registry.bundle("serving").id == second.id
    with pytest.raises(NotFound, match="latest, serving"):
        world.registry.bundle("nosuch")


def test_gc_keeps_aliased_bundles_and_registered_weights(world: World) -> None:
    world.plugin("p", world.task("sentiment", "1.0.0"))
    first = world.registry.register(["sentiment"]).bundles[0]
    world.plugin("p", world.task("sentiment", "1.1.0", seed=4))
    world.registry.register(["sentiment"])
    orphan = world.registry.objects.root / ("0" * 64)
    orphan.write_bytes(b"left by a crash")
    removed = world.registry.gc()
    assert removed == {"bundles": [first.id], "objects": ["0" * 64]}
    assert not (world.home / "bundles" / first.id).exists()
    # Rolling back still works: the old version's weights were kept.
    world.registry.rollback("sentiment", "1.0.0")
    assert world.registry.bundle("latest").members == {"sentiment": "1.0.0"}
