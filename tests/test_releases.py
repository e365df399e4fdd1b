"""Per-task releases: a candidate version beside the stable one in one bundle (canary split,
shadow, pins), promoted or rolled back without touching other tasks, on SQLite and
PostgreSQL, through the Python API, the CLI and the server's routing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from factories import Checkpoints
from harness import Databases, in_thread, registry_state, start_serve
from helpers import publish_tasks

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.manifest import Manifest, read_manifest
from mtreg.artifacts.release import Release, candidate_key
from mtreg.errors import MtregError, NotFound
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import LoadedBundle, load_bundle
from mtreg.runtime.inference import Row
from mtreg.serving.app import create_app
from mtreg.serving.config import ServeConfig
from mtreg.serving.metrics import ServeMetrics
from mtreg.serving.plan import BadRequest, answers, in_canary, plan_rows
from mtreg.serving.reload import Reloader, Served, load_served

TWO = ("classification", ("neg", "pos"))
THREE = ("classification", ("neg", "neu", "pos"))
# (task, head, fork depth, branch layers, inputs)
SENTIMENT = ("sentiment", TWO, 2, 1, ("text",))
TOPIC = ("topic", ("classification", ("a", "b", "c")), 1, 1, ("text",))
TEXTS = ["the movie was great", "slow service and bad price", "how do i reset my password"]


@dataclass
class World:
    """A registry (kept closed) whose ``sentiment`` has versions 1.0.0 (stable), 2.0.0 (same
    head, other weights) and 3.0.0 (three labels), beside ``topic`` 1.0.0; ``serving`` and
    ``latest`` name the bundle of the stable versions; ``solo`` is the bundle where 2.0.0
    was the stable version."""

    databases: Databases
    url: str
    home: Path
    plugins: Path
    solo: str

    def fresh(self, tmp: Path) -> Registry:
        """Return a registry on a copy of the world's database and home."""
        home = tmp / "home"
        shutil.copytree(self.home, home, symlinks=True)
        return Registry(url=self.databases.copy(self.url), home=home, plugins_dirs=[self.plugins])


@pytest.fixture(scope="module")
def world(
    databases: Databases, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> World:
    tmp = tmp_path_factory.mktemp("releases")
    trunk = checkpoints.copy(tmp / "trunk", num_layers=3, seed=0)
    checkpoint, url, home = read_checkpoint(trunk), databases.new(), tmp / "home"
    with Registry(url=url, home=home, plugins_dirs=[tmp / "plugins"]) as registry:
        registry.add_trunk("tiny", trunk)
        steps = [("1.0.0", TWO), ("2.0.0", TWO), ("3.0.0", THREE)]
        for seed, (version, head) in enumerate(steps):
            tasks = [(*SENTIMENT[:1], head, *SENTIMENT[2:]), TOPIC]
            publish_tasks(tmp, checkpoint, tasks, {"sentiment": version, "topic": "1.0.0"}, seed)
            registry.discover(refresh=True)
            changes = registry.register(["sentiment", "topic"] if seed == 0 else ["sentiment"])
            if version == "2.0.0":
                solo = changes.bundles[0].id
        registry.rollback("sentiment", "1.0.0")
        registry.set_alias("serving", "latest")
    return World(databases, url, home, tmp / "plugins", solo)


@pytest.fixture
def registry(world: World, tmp_path: Path) -> Iterator[Registry]:
    with world.fresh(tmp_path) as fresh:
        yield fresh


def _logits(bundle: LoadedBundle, branch: str) -> torch.Tensor:
    """The logits of one branch over TEXTS (one forward pass, as the server runs it)."""
    rows = [Row(text, (branch,), True) for text in TEXTS]
    return torch.tensor([result[branch]["logits"] for result in bundle.run(rows)])


def test_canary_promote_and_rollback_leave_other_tasks_bit_identical(
    registry: Registry, world: World
) -> None:
    before = load_bundle("serving", registry=registry)
    topic = _logits(before, "topic")
    stable = _logits(before, "sentiment")
    solo = _logits(load_bundle(world.solo, registry=registry), "sentiment")

    started = registry.release("sentiment", "2.0", canary=30, key_field="user")
    assert (started.stable, started.candidate, started.percent) == ("1.0.0", "2.0.0", 30.0)
    assert started.bundle is not None and set(started.bundle.aliases) == {"latest", "serving"}
    release = started.bundle.manifest.releases["sentiment"]
    assert (release.mode, release.key_field, release.candidate.version) == (
        "canary",
        "user",
        "2.0.0",
    )
    canary = load_bundle("serving", registry=registry)
    assert canary.branch("sentiment", "2.0.0") == candidate_key("sentiment")
    assert canary.branch("sentiment") == canary.branch("sentiment", "1.0.0") == "sentiment"
    assert torch.equal(_logits(canary, "topic"), topic)
    assert torch.equal(_logits(canary, "sentiment"), stable)
    # The candidate branch answers as version 2.0.0 does when it is the stable one.
    assert torch.allclose(_logits(canary, candidate_key("sentiment")), solo, atol=1e-6)

    promoted = registry.release("sentiment", promote=True)
    assert (promoted.stable, promoted.previous, promoted.candidate) == ("2.0.0", "1.0.0", None)
    assert registry.task("sentiment").active_version == "2.0.0"
    assert registry.releases() == []
    after = load_bundle("serving", registry=registry)
    assert after.releases == {}
    assert torch.equal(_logits(after, "topic"), topic)
    assert torch.allclose(_logits(after, "sentiment"), solo, atol=1e-6)

    undone = registry.release("sentiment", rollback=True)
    assert (undone.stable, undone.previous) == ("1.0.0", "2.0.0")
    back = load_bundle("serving", registry=registry)
    assert back.manifest.bundle_id == before.manifest.bundle_id
    assert torch.equal(_logits(back, "topic"), topic)
    history = [(e.kind, e.detail["stable"]) for e in registry.release_history("sentiment")]
    assert history == [
        ("release.rollback", "1.0.0"),
        ("release.promote", "2.0.0"),
        ("release.canary", "1.0.0"),
    ]


def test_shadow_and_pinned_candidates_may_differ_in_head_a_split_may_not(
    registry: Registry,
) -> None:
    with pytest.raises(MtregError, match="a split would mix their answers"):
        registry.release("sentiment", "3.0.0", canary=5)
    shadow = registry.release("sentiment", "3.0.0", shadow=True)
    assert shadow.mode == "shadow" and shadow.bundle is not None
    bundle = load_bundle("latest", registry=registry)
    assert bundle.releases["sentiment"].candidate.head.labels == ("neg", "neu", "pos")
    pinned = registry.release("sentiment", "3.0.0", canary=0)
    assert pinned.mode == "canary" and pinned.percent == 0
    (record,) = registry.releases("sentiment")
    assert (record.candidate.version, record.mode, record.inert) == ("3.0.0", "canary", None)
    assert registry.release("sentiment", rollback=True, dry_run=True).ended == "3.0.0"
    # Rolled back by hand to the candidate's version: the release goes inert, not in the way.
    registry.rollback("sentiment", "3.0.0")
    assert registry.releases()[0].inert == "the candidate is the stable version"
    assert registry.bundle("latest").manifest.releases == {}


@pytest.mark.parametrize(
    ("args", "options", "error", "message"),
    [
        (("nope", "2.0.0"), {"canary": 5}, NotFound, "task 'nope' is not registered"),
        (("../x", "2.0.0"), {"canary": 5}, MtregError, "invalid task name '../x'"),
        (("sentiment", "9.9.9"), {"canary": 5}, NotFound, "registered versions are 1.0.0"),
        (("sentiment", "1.0.0"), {"canary": 5}, MtregError, "is the stable version already"),
        (("sentiment", "2.0.0"), {"canary": 101}, MtregError, "in 0..100, got 101"),
        (("sentiment", "2.0.0"), {"canary": -1}, MtregError, "in 0..100, got -1"),
        (("sentiment", "2.0.0"), {"canary": float("nan")}, MtregError, "in 0..100"),
        (("sentiment", "2.0.0"), {}, MtregError, "say what to do"),
        (("sentiment", "2.0.0"), {"canary": 5, "shadow": True}, MtregError, "say what to do"),
        (("sentiment",), {"canary": 5}, MtregError, "needs the candidate VERSION"),
        (("sentiment", "2.0.0"), {"promote": True}, MtregError, "takes no VERSION"),
        (("sentiment", "2.0.0"), {"shadow": True, "key_field": "u"}, MtregError, "goes with"),
        (("sentiment", "2.0.0"), {"canary": 5, "key_field": "../x"}, MtregError, "key field"),
        (("sentiment",), {"promote": True}, MtregError, "no release under way to promote"),
        (("sentiment",), {"rollback": True}, MtregError, "nothing to roll back"),
        (("sentiment", "3.0.0"), {"canary": 50}, MtregError, "a split would mix"),
    ],
)
def test_refusals_change_nothing(
    registry: Registry, args: tuple, options: dict, error: type, message: str
) -> None:
    state = registry_state(registry.url, str(registry.home.root))
    for dry_run in (True, False):
        with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
            registry.release(*args, dry_run=dry_run, **options)
    assert registry_state(registry.url, str(registry.home.root)) == state


def test_dry_run_says_what_would_happen_and_writes_nothing(registry: Registry) -> None:
    state = registry_state(registry.url, str(registry.home.root))
    outcome = registry.release("sentiment", "2.0.0", canary=5, dry_run=True)
    assert (outcome.dry_run, outcome.candidate, outcome.bundle) == (True, "2.0.0", None)
    registry.release("sentiment", "2.0.0", canary=5)
    promoted = registry.release("sentiment", promote=True, dry_run=True)
    assert promoted.stable == "2.0.0" and registry.task("sentiment").active_version == "1.0.0"
    assert len(registry.releases()) == 1
    registry.release("sentiment", rollback=True)
    assert registry_state(registry.url, str(registry.home.root))["aliases"] == state["aliases"]


@pytest.mark.slow
def test_cli_release_and_releases(pool, world: World, tmp_path: Path) -> None:
    with world.fresh(tmp_path) as registry:
        url, home = registry.url, str(registry.home.root)
    env = {"MTREG_DATABASE_URL": url, "MTREG_HOME": home, "MTREG_PLUGINS_PATH": ""}
    state = registry_state(url, home)
    for argv, message in [
        (("release", "sentiment", "2.0.0", "--canary", "lots"), "got 'lots'"),
        (("release", "sentiment", "2.0.0", "--canary", "150", "--json"), "in 0..100"),
        (("release", "sentiment", "3.0.0", "--canary", "5"), "a split would mix"),
        (("releases", "nope"), "task 'nope' is not registered"),
    ]:
        result = pool.run(env, *argv)
        assert result.code == 1, result
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert registry_state(url, home) == state
    dry = pool.run(env, "release", "sentiment", "2.0.0", "--canary", "5", "--dry-run")
    assert dry.code == 0 and "would release 2.0.0 to answer 5% of requests" in dry.stdout
    done = pool.run(env, "release", "sentiment", "2.0.0", "--canary", "5", "--key-field", "user")
    assert done.code == 0, done.stderr
    assert "sticky by user" in done.stdout and "(latest, serving)" in done.stdout
    listed = pool.run(env, "releases", "--json")
    data = json.loads(listed.stdout)
    assert [(r["task"], r["candidate"], r["percent"]) for r in data["releases"]] == [
        ("sentiment", "2.0.0", 5.0)
    ]
    assert [e["kind"] for e in data["history"]] == ["release.canary"]
    table = pool.run(env, "releases").stdout
    assert "sentiment  2.0.0      canary  5%" in table and "live" in table


# -- routing --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedBundle]:
    """The bundle of a 30% canary of sentiment 2.0.0, sticky by ``user``."""
    with world.fresh(tmp_path_factory.mktemp("routing")) as registry:
        registry.release("sentiment", "2.0.0", canary=30, key_field="user")
        yield load_bundle("latest", registry=registry)


@pytest.mark.parametrize("percent", [0, 5, 30, 100])
def test_a_sticky_split_sends_the_same_key_to_the_same_version(
    released: LoadedBundle, percent: float
) -> None:
    release = Release(
        candidate=released.releases["sentiment"].candidate, mode="canary", percent=percent
    )
    keys = [f"user-{n}" for n in range(2000)]
    chosen = [in_canary(release, key) for key in keys]
    assert chosen == [in_canary(release, key) for key in keys]
    assert abs(sum(chosen) / len(keys) * 100 - percent) < 3
    # Raising the share only moves keys to the candidate.
    wider = Release(candidate=release.candidate, mode="canary", percent=min(100, percent + 10))
    assert all(in_canary(wider, k) for k, c in zip(keys, chosen, strict=True) if c)


def test_rows_route_by_key_field_request_key_and_pin(released: LoadedBundle) -> None:
    cand = candidate_key("sentiment")
    items = [{"text": TEXTS[0], "user": f"u{n}"} for n in range(200)]
    rows = plan_rows(released, items, ["sentiment", "topic"], 1000)
    routed = [row.tasks for row in rows]
    assert {r for r in routed} == {(cand, "topic"), ("sentiment", "topic")}
    assert routed == [r.tasks for r in plan_rows(released, items, ["sentiment", "topic"], 1000)]
    keyed = plan_rows(released, TEXTS, ["sentiment"], 1000, key="same")
    assert len({row.tasks for row in keyed}) == 1
    pinned = plan_rows(released, items[:5], None, 1000, versions={"sentiment": "2.0.0"})
    assert all(row.tasks == (cand, "topic") for row in pinned)
    results = released.run(pinned)
    answered = answers(released, results)
    assert [a["sentiment"]["version"] for a in answered] == ["2.0.0"] * 5
    assert "version" not in answered[0]["topic"]
    assert answered[0]["sentiment"]["label"] == results[0][cand]["label"]


@pytest.mark.parametrize(
    ("versions", "tasks", "message"),
    [
        (
            {"sentiment": "9.0.0"},
            None,
            "has no version '9.0.0' in this bundle: it serves 1.0.0, 2.0.0",
        ),
        ({"nope": "1.0.0"}, None, "task 'nope' is not in this bundle"),
        ({"sentiment": "2.0.0"}, ["topic"], "which the request does not ask for"),
    ],
)
def test_a_bad_pin_is_a_bad_request(
    released: LoadedBundle, versions: dict, tasks: list | None, message: str
) -> None:
    with pytest.raises(BadRequest, match=message.replace(".", r"\.")):
        plan_rows(released, TEXTS, tasks, 1000, versions=versions)


def test_shadow_runs_the_candidate_and_counts_agreement(world: World, tmp_path: Path) -> None:
    with world.fresh(tmp_path) as registry:
        registry.release("sentiment", "2.0.0", shadow=True)
        bundle = load_bundle("latest", registry=registry)
    rows = plan_rows(bundle, TEXTS, ["sentiment"], 1000)
    assert all(row.tasks == ("sentiment", candidate_key("sentiment")) for row in rows)
    metrics = ServeMetrics()
    answered = answers(bundle, bundle.run(rows), metrics, seconds=0.02)
    plain = bundle.predict(TEXTS, ["sentiment"])
    assert [a["sentiment"]["label"] for a in answered] == [p["sentiment"]["label"] for p in plain]
    assert all(a["sentiment"]["version"] == "1.0.0" for a in answered)
    text = metrics.render().decode()
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mtreg_serve_shadow_rows_total{") and 'version="2.0.0"' in line
    ]
    assert sum(counted) == len(TEXTS)
    timed = 'mtreg_serve_task_request_seconds_count{task="sentiment",version="2.0.0"} 1.0'
    assert timed in text


def _samples(text: str, name: str) -> dict[tuple[str, str], float]:
    """Return (task, version) -> value of metric ``name``'s samples in a /metrics text."""
    pattern = re.compile(rf'^{name}{{task="([^"]+)",version="([^"]+)"}} (\S+)$', re.M)
    return {(task, version): float(value) for task, version, value in pattern.findall(text)}


@pytest.mark.slow
def test_a_served_shadow_reports_branch_time_per_version(world: World, tmp_path: Path) -> None:
    with world.fresh(tmp_path) as registry:
        registry.release("sentiment", "2.0.0", shadow=True)
        bundle = load_bundle("latest", registry=registry)
    app = create_app(ServeConfig(bundle=str(bundle.path)), Served(bundle, "x" * 64))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    # One request at a time, so each runs as a micro-batch of its own.
    requests = [(TEXTS, ["sentiment"])] * 3 + [(TEXTS[:2], ["sentiment", "topic"])]
    with in_thread(server) as url:
        for inputs, tasks in requests:
            body = {"inputs": inputs, "tasks": tasks}
            answer = httpx.post(f"{url}/v1/predict", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            assert {r["sentiment"]["version"] for r in answer.json()["results"]} == {"1.0.0"}
        text = httpx.get(f"{url}/metrics", timeout=30).text
    sentiment_rows = sum(len(inputs) for inputs, _ in requests)
    rows = {("sentiment", "1.0.0"): sentiment_rows, ("sentiment", "2.0.0"): sentiment_rows}
    rows[("topic", "1.0.0")] = 2
    batches = {("sentiment", "1.0.0"): 4, ("sentiment", "2.0.0"): 4, ("topic", "1.0.0"): 1}
    assert _samples(text, "mtreg_serve_branch_rows_total") == rows
    assert _samples(text, "mtreg_serve_branch_seconds_count") == batches
    seconds = _samples(text, "mtreg_serve_branch_seconds_sum")
    assert set(seconds) == set(batches) and all(s > 0 for s in seconds.values())
    shadowed = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mtreg_serve_shadow_rows_total{")
    ]
    assert sum(shadowed) == rows[("sentiment", "2.0.0")]


def test_the_server_reloads_a_release_and_keeps_serving_when_it_fails_to_load(
    world: World, tmp_path: Path
) -> None:
    with world.fresh(tmp_path) as registry:
        current = [load_served("serving", None, "torch", registry)]
        reloader = Reloader(
            "serving", None, "torch", lambda: registry, lambda: current[0],
            current.append, ServeMetrics(), 60,
        )  # fmt: skip
        registry.release("sentiment", "2.0.0", canary=10)
        assert reloader.check(registry) and current[-1].bundle.releases
        served = current[-1]
        broken = registry.release("sentiment", "2.0.0", canary=20).bundle
        assert broken is not None
        (registry.home.bundle(broken.id) / "candidates" / "sentiment.safetensors").unlink()
        assert not reloader.check(registry)
        assert current[-1] is served


def test_v1_predict_pins_a_version_and_refuses_a_bad_pin(released: LoadedBundle) -> None:
    app = create_app(ServeConfig(bundle=str(released.path)), Served(released, "x" * 64))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    with in_thread(server) as url:
        body = {"inputs": TEXTS, "tasks": ["sentiment"], "versions": {"sentiment": "2.0.0"}}
        ok = httpx.post(f"{url}/v1/predict", json=body, timeout=30)
        assert ok.status_code == 200, ok.text
        assert {r["sentiment"]["version"] for r in ok.json()["results"]} == {"2.0.0"}
        bad = httpx.post(
            f"{url}/v1/predict", json={**body, "versions": {"sentiment": "7.0.0"}}, timeout=30
        )
        assert bad.status_code == 422 and "has no version '7.0.0'" in bad.json()["detail"]
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'task="sentiment",version="2.0.0"' in metrics


# -- the manifest ---------------------------------------------------------------------------


def test_a_release_round_trips_and_leaves_other_bundles_ids_alone(released: LoadedBundle) -> None:
    manifest = released.manifest
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert Manifest.from_dict(manifest.to_dict()).bundle_id == manifest.bundle_id
    without = Manifest(manifest.trunk, manifest.tasks, manifest.files)
    assert "releases" not in without.to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["candidate"]["head"].update(labels=["x", "y", "z"]), "a split would mix"),
        (lambda r: r["candidate"].update(inputs=["question"]), "only --canary 0"),
        (lambda r: r.update(percent=140), r"in 0\.\.100"),
        (lambda r: r.update(percent=True), r"in 0\.\.100"),
        (lambda r: r.update(mode="blue"), "release mode must be one of canary, shadow"),
        (lambda r: r.update(key_field="../u"), "invalid key field name '../u'"),
        (lambda r: r["candidate"].update(file="candidates/x.safetensors"), "not listed"),
        (lambda r: r["candidate"].update(version="latest"), "invalid version"),
        (lambda r: r.pop("mode"), "is malformed"),
    ],
)
def test_a_hostile_release_in_a_manifest_is_one_clear_error(
    released: LoadedBundle, tmp_path: Path, edit: Any, message: str
) -> None:
    data = released.manifest.to_dict()
    edit(data["releases"]["sentiment"])
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MtregError, match=message) as refused:
        read_manifest(tmp_path / "manifest.json")
    assert "\n" not in str(refused.value)


# -- the README -----------------------------------------------------------------------------


def _readme_block(first: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [
        b for b in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S) if b.startswith(first)
    ]
    return block


def _json_documents(text: str) -> list[dict]:
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        document, at = decoder.raw_decode(text, at)
        found.append(document)
        while at < len(text) and text[at].isspace():
            at += 1
    return found


@pytest.mark.slow
@pytest.mark.parametrize("databases", ["sqlite"], indirect=True)  # as harness.SQLITE_ONLY
def test_readme_release_commands_run_as_written(world: World, tmp_path: Path) -> None:
    with world.fresh(tmp_path) as registry:
        url, home = registry.url, str(registry.home.root)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MTREG_")},
        "MTREG_DATABASE_URL": url,
        "MTREG_HOME": home,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    script = _readme_block("# Releasing a task")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with Registry(url=url, home=home) as registry:
        assert registry.task("sentiment").active_version == "1.0.0"
        kinds = [e.kind for e in reversed(registry.release_history("sentiment"))]
        assert kinds == [
            f"release.{k}" for k in ("canary", "canary", "shadow", "promote", "rollback")
        ]
        registry.release("sentiment", "2.0.0", canary=5, key_field="user")
    process, base = start_serve(env=env)
    try:
        curl = _readme_block("# With a release under way").replace("localhost:8080", base[7:])
        answered = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
        pinned, keyed = _json_documents(answered.stdout)
        assert pinned["results"][0]["sentiment"]["version"] == "2.0.0", pinned
        assert keyed["results"][0]["sentiment"]["version"] in ("1.0.0", "2.0.0"), keyed
    finally:
        process.terminate()
        process.communicate(timeout=30)
