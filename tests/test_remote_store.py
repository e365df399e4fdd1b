"""Artifacts on object storage: a registry whose store is ``s3://``, ``gs://`` or ``az://``
(servers the tests start on 127.0.0.1: moto's S3 with IAM signatures checked,
fake-gcs-server, Azurite; tests/object_stores.py), and machines (homes) that share it,
each with its own verified cache.

Registering publishes objects, then the bundle's manifest; another home materialises the
bundle from verified objects; two homes on one PostgreSQL registry register and serve with
hot reload. Faults (store unreachable, wrong credentials, missing bucket, a full cache disk,
an object deleted or altered in the bucket, two publishers at once, a publisher killed
mid-publish) each end in a one-line error or a correct result, never serve anything
half-published, and a rerun completes. Create-only writes are refused by each server
itself (S3 and Azure ``If-None-Match: *``, GCS ``ifGenerationMatch=0``).

The servers emulate the stores: consistency, IAM policies and the real services' retries
must be checked against the real stores too (README, "Team setup").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import Checkpoints
from harness import CliPool, Databases, Result, Step, free_socket, start_serve
from helpers import publish_tasks, require_namespaces, snapshot, unshare
from object_stores import STORE_VARIABLES as VARIABLES
from object_stores import ObjectServer, object_server

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.home import Home
from mtreg.artifacts.objects import open_store
from mtreg.artifacts.remote import RemoteStore
from mtreg.core.env import STORE_ENV
from mtreg.errors import MtregError
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import load_bundle

README = Path(__file__).resolve().parents[1] / "README.md"
TASK = [("sentiment", ("classification", ("neg", "pos")), 2, 1, ("text",))]
TEXT = "the movie was great"


# The tests of what each store's library does differently (publishing and reading objects,
# create-only writes, refusals and missing keys, streamed digests, racing publishers) run on
# all three servers; the others (settings, the local disk, two machines sharing a registry,
# killed processes, the README's S3 setup) exercise mtreg's side alone, on S3.
SCHEMES = ["s3", "gs", "az"]
S3_ONLY = pytest.mark.parametrize("server", ["s3"], indirect=True)


@pytest.fixture(scope="module", params=SCHEMES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ObjectServer]:
    """The object-storage server of one scheme, on 127.0.0.1 (tests/object_stores.py)."""
    with object_server(request.param, tmp_path_factory.mktemp(request.param)) as started:
        yield started


class Team:
    """Weight files and plugins shared by the tests: trunk ``tiny``, task ``sentiment`` at
    1.0.0 (plugins/) and 2.0.0 (plugins-v2/)."""

    def __init__(self, root: Path, checkpoints: Checkpoints) -> None:
        self.root = root
        self.trunk = checkpoints.copy(root / "trunk", num_layers=3)
        checkpoint = read_checkpoint(self.trunk)
        publish_tasks(root, checkpoint, TASK, {"sentiment": "1.0.0"})
        publish_tasks(root / "v2", checkpoint, TASK, {"sentiment": "2.0.0"}, seed=7)
        self.plugins = {"1.0.0": root / "plugins", "2.0.0": root / "v2" / "plugins"}


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Team:
    return Team(tmp_path_factory.mktemp("team"), checkpoints)


@dataclass
class Setup:
    """One registry of a test: its database, its store prefix, and machine homes."""

    server: ObjectServer
    team: Team
    tmp: Path
    db: str
    prefix: str

    @property
    def store(self) -> str:
        return self.server.url(self.prefix)

    def home(self, name: str) -> Path:
        return self.tmp / name

    def env(self, home: str, version: str = "1.0.0", **overrides: str) -> dict[str, str]:
        """The environment of an mtreg command on machine ``home``."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MTREG_", *VARIABLES))}
        return {
            **base,
            **self.server.env(),
            "MTREG_HOME": str(self.home(home)),
            "MTREG_DATABASE_URL": self.db,
            "MTREG_STORE_URL": self.store,
            "MTREG_PLUGINS_PATH": str(self.team.plugins[version]),
            **overrides,
        }

    def registry(self, home: str, version: str = "1.0.0") -> Registry:
        """A Registry on machine ``home`` (in this process)."""
        return Registry(self.db, self.home(home), [self.team.plugins[version]], store=self.store)

    def publish(self, home: str = "a") -> str:
        """Add the trunk and register sentiment 1.0.0 as ``serving`` from ``home``; return
        the bundle id."""
        with self.registry(home) as registry:
            registry.add_trunk("tiny", self.team.trunk)
            return registry.register(["sentiment"], promote=True).bundles[0].id


@pytest.fixture
def setup(server: ObjectServer, team: Team, tmp_path: Path) -> Setup:
    return Setup(server, team, tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", uuid.uuid4().hex)


def one_line_error(result: Result, *words: str) -> None:
    """Assert ``result`` is exit code 1 and one line of stderr holding ``words``."""
    assert result.code == 1, (result.code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def predicted(result: Result) -> dict[str, Any]:
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def cache_state(home: Path) -> dict[str, Any]:
    """Return what a machine's cache holds: objects (each checked against its name),
    leftovers of downloads, bundle directories."""
    objects = home / "objects"
    names = sorted(p.name for p in objects.iterdir()) if objects.is_dir() else []
    for name in names:
        if not name.startswith("."):
            assert hashlib.sha256((objects / name).read_bytes()).hexdigest() == name
    bundles = home / "bundles"
    return {
        "objects": [n for n in names if not n.startswith(".")],
        "leftovers": [n for n in names if n.startswith(".")],
        "bundles": sorted(p.name for p in bundles.iterdir()) if bundles.is_dir() else [],
    }


# -- publishing and loading through the bucket ------------------------------------------------


def test_registering_publishes_objects_then_the_manifest_and_another_home_loads_it(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    ident = setup.publish("a")
    keys = setup.server.keys(setup.prefix)
    with setup.registry("a") as a:
        bundle = a.bundle("serving")
        expected = a.bundle_path("serving")
        outputs = load_bundle("serving", registry=a).predict([TEXT])
    assert bundle.id == ident
    # Every object is stored under its own hash, and the manifest under the bundle id.
    assert keys[f"manifests/{ident}"] == ident
    assert {f"objects/{sha}" for sha in bundle.manifest.files.values()} <= set(keys)
    assert all(keys[k] == k.removeprefix("objects/") for k in keys if k.startswith("objects/"))

    with setup.registry("b") as b:
        cold = load_bundle("serving", registry=b)
        path = b.bundle_path("serving")
    assert cold.bundle_id == ident and cold.predict([TEXT]) == outputs
    assert (path / "manifest.json").read_bytes() == (expected / "manifest.json").read_bytes()
    state = cache_state(setup.home("b"))
    assert state["leftovers"] == [] and state["bundles"] == [ident]
    assert set(bundle.manifest.files.values()) <= set(state["objects"])

    # A warm start reads nothing from the store: it works with the store unreachable.
    with free_socket() as closed:
        for name, value in setup.server.faults["unreachable"][0].items():
            monkeypatch.setenv(name, value.format(port=closed.getsockname()[1]))
        with setup.registry("b") as b:
            assert load_bundle("serving", registry=b).predict([TEXT]) == outputs


@pytest.mark.slow
@S3_ONLY
def test_bundle_show_says_whether_this_machine_fetched_the_bundle(
    setup: Setup, pool: CliPool
) -> None:
    ident = setup.publish("a")
    path = setup.home("b") / "bundles" / ident

    def shown(home: str) -> tuple[dict[str, Any], str]:
        as_json = pool.run(setup.env(home), "bundle", "show", "serving", "--json")
        text = pool.run(setup.env(home), "bundle", "show", "serving")
        assert as_json.code == 0 and text.code == 0, as_json.stderr + text.stderr
        return json.loads(as_json.stdout), text.stdout

    cold, text = shown("b")
    assert (cold["fetched"], cold["store"], cold["path"]) == (False, setup.store, str(path))
    assert "not fetched on this machine" in text and setup.store in text
    assert not path.exists()  # showing it fetched nothing

    assert pool.run(setup.env("b"), "predict", TEXT).code == 0
    warm, text = shown("b")
    assert warm["fetched"] and (path / "manifest.json").is_file()
    assert "not fetched" not in text and str(path) in text
    assert shown("a")[0]["fetched"]  # the publisher wrote it as it registered


def test_create_only_writes_let_exactly_one_of_two_writers_create_an_object(
    setup: Setup, tmp_path: Path
) -> None:
    source = tmp_path / "object"
    source.write_bytes(b"same bytes")
    stores = [RemoteStore(setup.store) for _ in range(8)]
    created: list[bool] = []
    threads = [
        threading.Thread(target=lambda s=s: created.append(s.upload("objects", "x" * 64, source)))
        for s in stores
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(created) == [False] * 7 + [True]
    # The server refuses (s3fs, gcsfs and adlfs do not look first): a later write, even of
    # other bytes, changes nothing.
    other = tmp_path / "other"
    other.write_bytes(b"other bytes")
    assert RemoteStore(setup.store).upload("objects", "x" * 64, other) is False
    assert setup.server.keys(setup.prefix) == {
        "objects/" + "x" * 64: hashlib.sha256(b"same bytes").hexdigest()
    }


def test_the_store_url_comes_from_the_option_else_the_environment_else_the_home(
    team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Home(tmp_path / "home")
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert home.store_url() is None
    assert open_store(None, home.objects).root == home.objects
    monkeypatch.setenv(STORE_ENV, "s3://team/env")
    assert home.store_url() == "s3://team/env" and home.store_url("gs://b/x") == "gs://b/x"
    remote = open_store("s3://team/env/", home.objects)
    assert remote.root == home.objects and remote.location == "s3://team/env"
    for folder in (str(tmp_path / "objects"), f"file://{tmp_path / 'objects'}"):
        local = open_store(folder, home.objects)
        assert local.remote is None and local.root == tmp_path / "objects"
    for bad in ("ftp://host/x", "s3://", "memory://x"):
        with pytest.raises(MtregError, match="store URL"):
            open_store(bad, home.objects)

    # A local folder as the store: objects go there, bundles stay in the home.
    monkeypatch.delenv(STORE_ENV)
    shared = tmp_path / "shared-objects"
    db = f"sqlite:///{tmp_path / 'r.db'}"
    with Registry(db, home.root, [team.plugins["1.0.0"]], store=str(shared)) as registry:
        registry.add_trunk("tiny", team.trunk)
        bundle = registry.register(["sentiment"]).bundles[0]
        assert set(bundle.manifest.files.values()) <= set(registry.objects.list())
        assert load_bundle("latest", registry=registry).predict([TEXT])
    assert sorted(p.name for p in shared.iterdir()) == registry.objects.list()
    assert not home.objects.exists() and (home.bundle(bundle.id) / "manifest.json").is_file()


# -- two machines, one registry -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@S3_ONLY
def test_two_machines_one_registry_one_registers_the_other_serves_and_hot_reloads(
    setup: Setup, pool: CliPool
) -> None:
    databases = Databases("postgres", setup.tmp)
    setup.db = databases.new()
    try:
        for argv in (["init"], ["trunk", "add", "tiny", str(setup.team.trunk)]):
            assert pool.run(setup.env("a"), *argv).code == 0
        assert pool.run(setup.env("a"), "register", "sentiment", "--promote").code == 0
        server, url = start_serve(
            "--bundle", "serving", "--poll-seconds", "0.2", env=setup.env("b")
        )
        try:
            first = httpx.get(f"{url}/v1/tasks").json()
            assert [t["version"] for t in first["tasks"]] == ["1.0.0"]
            answer = httpx.post(f"{url}/v1/predict", json={"inputs": [TEXT]}).json()
            assert answer["bundle"] == first["bundle"]

            upgrade = pool.run(setup.env("a", "2.0.0"), "register", "sentiment", "--promote")
            assert upgrade.code == 0, upgrade.stderr
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/v1/tasks").json()["tasks"][0]["version"] != "2.0.0":
                assert time.monotonic() < deadline, "machine b never reloaded"
                time.sleep(0.2)
            served = httpx.post(f"{url}/v1/predict", json={"inputs": [TEXT]}).json()
        finally:
            server.terminate()
            server.communicate(timeout=30)
        with setup.registry("a") as a:
            serving = a.bundle("serving")
            expected = load_bundle("serving", registry=a).predict([TEXT])
        # The served id is the hash of what machine b serves, and what a serves too.
        assert served["bundle"] == serving.id != first["bundle"]
        assert served["results"][0]["sentiment"]["label"] == expected[0]["sentiment"]["label"]
        state = cache_state(setup.home("b"))
        assert serving.id in state["bundles"] and state["leftovers"] == []
        assert not (setup.home("b") / "registry.db").exists()
    finally:
        databases.drop()


# -- the store refusing, unreachable or missing ------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    with free_socket() as sock:
        yield sock.getsockname()[1]


# fake-gcs-server checks no credentials: a wrong one cannot be tried on gs://.
FAULTS = [(s, f) for s in SCHEMES for f in ("unreachable", "credentials", "bucket")]
FAULTS.remove(("gs", "credentials"))


@pytest.mark.slow
@pytest.mark.parametrize(("server", "fault"), FAULTS, indirect=["server"])
def test_a_store_that_cannot_be_used_is_a_one_line_error_and_changes_nothing(
    setup: Setup, pool: CliPool, fault: str, closed_port: int
) -> None:
    setup.publish("a")
    overrides, words = setup.server.faults[fault]
    bad = {k: v.format(port=closed_port) for k, v in overrides.items()}
    before = snapshot(setup.db, setup.home("a")), setup.server.keys(setup.prefix)
    # Both at once: gcsfs retries an unreachable endpoint 6 times with backoff (~40 s).
    writing, reading = (
        job[0]
        for job in pool.jobs(
            [
                [Step(setup.env("a", "2.0.0", **bad), ("register", "sentiment"))],
                [Step(setup.env("cold", **bad), ("predict", TEXT))],
            ],
            timeout=600,
        )
    )
    for result in (writing, reading):
        one_line_error(result, words)
    assert (snapshot(setup.db, setup.home("a")), setup.server.keys(setup.prefix)) == before
    assert cache_state(setup.home("cold"))["leftovers"] == []
    # The same commands with the store back complete.
    assert pool.run(setup.env("cold"), "predict", TEXT).code == 0
    assert pool.run(setup.env("a", "2.0.0"), "register", "sentiment").code == 0


@S3_ONLY
def test_an_unknown_scheme_is_a_one_line_error(setup: Setup, pool: CliPool) -> None:
    # A missing gcsfs or adlfs (its `pip install 'mtreg[EXTRA]'` line): tests/test_extras.py.
    one_line_error(pool.run(setup.env("a", MTREG_STORE_URL="ftp://host/x"), "list"), "ftp://")


# -- objects damaged in the bucket, and a full cache disk -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "altered"])
def test_an_object_damaged_in_the_bucket_is_refused_cold_and_a_warm_cache_still_serves(
    setup: Setup, pool: CliPool, damage: str
) -> None:
    ident = setup.publish("a")
    warm = predicted(pool.run(setup.env("warm"), "predict", TEXT))
    with setup.registry("a") as a:
        branch = a.bundle(ident).manifest.tasks["sentiment"].sha256
    key, bucket = f"{setup.prefix}/objects/{branch}", setup.server
    good = bucket.read(key)
    if damage == "deleted":
        bucket.delete(key)
    else:
        bucket.write(key, good[:-1] + bytes([good[-1] ^ 1]))

    cold = pool.run(setup.env("cold"), "predict", TEXT)
    one_line_error(cold, branch[:12], "missing" if damage == "deleted" else "damaged")
    state = cache_state(setup.home("cold"))
    assert branch not in state["objects"] and state["leftovers"] == [] and state["bundles"] == []
    assert predicted(pool.run(setup.env("warm"), "predict", TEXT)) == warm

    # Put back from the warm machine's verified copy, the cold machine's rerun completes.
    bucket.write(key, (setup.home("warm") / "objects" / branch).read_bytes())
    assert predicted(pool.run(setup.env("cold"), "predict", TEXT)) == warm


@pytest.mark.slow
@pytest.mark.parametrize("repairer", ["warm", "fresh"])
def test_verify_remote_finds_objects_damaged_in_the_bucket_and_repair_restores_them(
    setup: Setup, pool: CliPool, repairer: str
) -> None:
    """The bucket's copies are hashed only with --remote; --repair puts good bytes back
    from a verified cached copy (``warm``) or, on a machine with no cache (``fresh``), from
    the trunk's source folder and the plugin's weights file; a published manifest from
    the database's record."""
    ident = setup.publish("a")
    warm = predicted(pool.run(setup.env("warm"), "predict", TEXT))
    with setup.registry("a") as a:
        branch = a.bundle(ident).manifest.tasks["sentiment"].sha256
        layer = a.trunk("tiny").objects["layers"][0]
    server = setup.server
    keys = {sha: f"{setup.prefix}/objects/{sha}" for sha in (branch, layer)}
    good = server.read(keys[branch])
    server.write(keys[branch], good[:-1] + bytes([good[-1] ^ 1]))
    server.delete(keys[layer])
    server.write(f"{setup.prefix}/manifests/{ident}", b"{}")
    bucket = server.keys(setup.prefix)

    # Without --remote only this machine's (intact) cache is read.
    assert pool.run(setup.env(repairer), "verify").code == 0
    found = pool.run(setup.env(repairer), "verify", "--remote", "--json")
    one_line_error(found, "3 damaged item(s)", "mtreg verify --remote --repair")
    report = json.loads(found.stdout)
    problems = {(f["kind"], f["name"]): f["problem"] for f in report["findings"]}
    assert set(problems) == {("remote", branch), ("remote", layer), ("published", ident)}
    assert "damaged in the store" in problems["remote", branch]
    assert "missing" in problems["remote", layer]
    assert "damaged in the store" in problems["published", ident]
    assert report["checked"]["remote"] >= 4 and setup.server.keys(setup.prefix) == bucket

    repaired = pool.run(setup.env(repairer), "verify", "--remote", "--repair")
    assert repaired.code == 0, repaired.stderr + repaired.stdout
    assert repaired.stdout.count("repaired") == 3 and "DAMAGED" not in repaired.stdout
    fixed = setup.server.keys(setup.prefix)
    assert fixed[f"objects/{branch}"] == branch and fixed[f"objects/{layer}"] == layer
    assert fixed[f"manifests/{ident}"] == ident
    assert pool.run(setup.env("a"), "verify", "--remote").code == 0
    assert predicted(pool.run(setup.env("cold"), "predict", TEXT)) == warm


@S3_ONLY
def test_verify_remote_without_a_remote_store_is_a_one_line_error(
    setup: Setup, pool: CliPool
) -> None:
    local = setup.env("a", MTREG_STORE_URL=str(setup.tmp / "objects"))
    one_line_error(pool.run(local, "verify", "--remote"), "is not remote", "--remote")


@pytest.mark.slow
@S3_ONLY
def test_a_full_cache_disk_is_a_one_line_error_and_a_rerun_with_room_completes(
    setup: Setup, pool: CliPool
) -> None:
    require_namespaces()
    setup.publish("a")
    expected = predicted(pool.run(setup.env("warm"), "predict", TEXT))
    mnt, out = setup.tmp / "mnt", setup.tmp / "out"
    mnt.mkdir()
    out.mkdir()
    predict = shlex.join([sys.executable, "-m", "mtreg", "predict", TEXT])
    # The cache is on a tmpfs too small for the trunk's objects; then it is given room.
    script = f"""
mount -t tmpfs -o size=24k tmpfs {mnt}
{predict} >{out}/full.out 2>{out}/full.err; echo $? >{out}/full.code
ls -A {mnt}/objects >{out}/listing 2>/dev/null; ls -A {mnt}/bundles >>{out}/listing 2>/dev/null
mount -o remount,size=64m tmpfs {mnt}
{predict} >{out}/room.out 2>{out}/room.err; echo $? >{out}/room.code
"""
    done = subprocess.run(
        [*unshare("--mount"), "bash", "-c", script],
        env=setup.env(str(mnt)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    full = Result(int((out / "full.code").read_text()), "", (out / "full.err").read_text())
    one_line_error(full, "No space left on device", "free space")
    listing = (out / "listing").read_text().split()
    assert not [n for n in listing if n.startswith((".fetching-", ".tmp-"))], listing
    assert int((out / "room.code").read_text()) == 0, (out / "room.err").read_text()
    assert json.loads((out / "room.out").read_text()) == expected


# -- publishers racing, and one killed mid-publish ----------------------------------------------


@pytest.mark.slow
def test_two_machines_publishing_the_same_bundle_at_once_end_with_one_good_bundle(
    setup: Setup, pool: CliPool
) -> None:
    with setup.registry("a") as a:
        a.add_trunk("tiny", setup.team.trunk)
    jobs = [[Step(setup.env(home), ("register", "sentiment", "--promote"))] for home in "ab"]
    results = [job[0] for job in pool.jobs(jobs)]
    for result in results:
        assert result.code == 0 or len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert any(r.code == 0 for r in results)
    with setup.registry("a") as a:
        serving = a.bundle("serving")
        assert [b.id for b in a.bundles()] == [serving.id]
    assert setup.server.keys(setup.prefix)[f"manifests/{serving.id}"] == serving.id
    cold = predicted(pool.run(setup.env("cold"), "predict", TEXT))
    assert cold == predicted(pool.run(setup.env("a"), "predict", TEXT))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["objects.stored", "bundle.renamed", "write.before_commit"])
@S3_ONLY
def test_a_publisher_killed_mid_publish_serves_nothing_new_and_a_rerun_completes(
    setup: Setup, pool: CliPool, point: str
) -> None:
    old = setup.publish("a")
    before = predicted(pool.run(setup.env("cold-before"), "predict", TEXT))
    killed = pool.run(
        setup.env("a", "2.0.0", MTREG_FAULT=point), "register", "sentiment", "--promote"
    )
    assert killed.code == -9, killed.stderr
    # Nothing of the half-published bundle is served, on a warm or a cold machine.
    with setup.registry("a") as a:
        assert a.bundle("serving").id == old and [b.id for b in a.bundles()] == [old]
    assert predicted(pool.run(setup.env("cold-before"), "predict", TEXT)) == before
    assert predicted(pool.run(setup.env("cold"), "predict", TEXT)) == before

    rerun = pool.run(setup.env("a", "2.0.0"), "register", "sentiment", "--promote")
    assert rerun.code == 0, rerun.stderr
    with setup.registry("a") as a:
        new = a.bundle("serving")
        assert new.id != old and new.members == {"sentiment": "2.0.0"}
    after = predicted(pool.run(setup.env("cold-after"), "predict", TEXT))
    assert after != before
    # gc withdraws the old bundle's manifest, and leaves nothing more to collect.
    assert pool.run(setup.env("a"), "gc").code == 0
    manifests = [k for k in setup.server.keys(setup.prefix) if k.startswith("manifests/")]
    assert manifests == [f"manifests/{new.id}"]
    with setup.registry("a") as a:
        assert a.gc(dry_run=True) == {"bundles": [], "objects": []}


# -- the README's team setup ---------------------------------------------------------------------


def _team_setup_script(setup: Setup) -> str:
    """The README's team setup block, made to run here: the settings point at this test's
    database, bucket and server; machine b serves from its own home; no pip, no serve."""
    (block,) = re.findall(r"^```bash\n(# Team setup.*?)^```", README.read_text(), re.M | re.S)
    aws = setup.server.variables
    values = {
        "MTREG_DATABASE_URL": setup.db,
        "MTREG_STORE_URL": setup.store,
        "AWS_ACCESS_KEY_ID": (
            f"{aws['AWS_ACCESS_KEY_ID']} AWS_SECRET_ACCESS_KEY={aws['AWS_SECRET_ACCESS_KEY']}"
        ),
        "AWS_ENDPOINT_URL": aws["AWS_ENDPOINT_URL"],
    }
    lines = [f"set -e; export MTREG_HOME={setup.home('a')} MINILM={setup.team.trunk}"]
    for line in block.splitlines():
        setting = re.match(r"export (\w+)=", line)
        if setting:
            line = f"export {setting.group(1)}={values[setting.group(1)]}"
        elif line.startswith("# On each serving machine"):
            line = f"export MTREG_HOME={setup.home('b')}"
        elif line.startswith(("pip install", "mtreg serve")):
            continue
        lines.append(line.replace("trunk add minilm", "trunk add tiny"))
    return "\n".join(lines)


@pytest.mark.slow
@S3_ONLY
def test_the_readme_team_setup_runs_as_written(setup: Setup) -> None:
    env = setup.env("unused")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("MTREG_HOME", "MTREG_DATABASE_URL", "MTREG_STORE_URL"):
        env.pop(name)
    done = subprocess.run(
        ["bash", "-c", _team_setup_script(setup)],
        env={k: v for k, v in env.items() if not k.startswith(VARIABLES)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["predictions"]["sentiment"]["label"] in ("neg", "pos")
    assert (setup.home("b") / "bundles").is_dir() and not (setup.home("b") / "registry.db").exists()
