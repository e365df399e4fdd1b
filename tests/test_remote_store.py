"""Artifacts on object storage: a registry whose store is ``s3://`` (an S3 server the tests
start on 127.0.0.1: moto's ThreadedMotoServer, with IAM signatures checked), and machines
(homes) that share it, each with its own verified cache.

Registering publishes objects, then the bundle's manifest; another home materialises the
bundle from verified objects; two homes on one PostgreSQL registry register and serve with
hot reload. Faults (store unreachable, wrong credentials, missing bucket, a full cache disk,
an object deleted or altered in the bucket, two publishers at once, a publisher killed
mid-publish) each end in a one-line error or a correct result, never serve anything
half-published, and a rerun completes.

moto emulates S3: create-only writes (``If-None-Match: *``) and read-after-write consistency
are what it implements, and must be checked against the real store too (README, "Team
setup").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
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
from helpers import publish_tasks, snapshot

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.home import Home
from mtreg.artifacts.objects import open_store
from mtreg.artifacts.remote import RemoteStore
from mtreg.core.env import STORE_ENV
from mtreg.errors import MtregError
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import load_bundle

README = Path(__file__).resolve().parents[1] / "README.md"
BUCKET = "team"
TASK = [("sentiment", ("classification", ("neg", "pos")), 2, 1, ("text",))]
TEXT = "the movie was great"


@dataclass(frozen=True)
class S3:
    """The S3 server: its endpoint and the credentials of a user allowed everything."""

    endpoint: str
    key: str
    secret: str

    def env(self, **overrides: str) -> dict[str, str]:
        """The AWS variables an mtreg process reads (the endpoint: ``AWS_ENDPOINT_URL``)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            **overrides,
        }

    def client(self) -> Any:
        """A boto3 S3 client, to look at and tamper with the bucket as an operator would."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def keys(self, prefix: str) -> dict[str, str]:
        """Return every key under ``prefix`` with the sha256 of its bytes."""
        client, found = self.client(), {}
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
        for item in listing.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            found[item["Key"].removeprefix(prefix + "/")] = hashlib.sha256(body).hexdigest()
        return found


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """Start moto's S3 server on a free loopback port, with request signatures checked
    against an IAM user it creates, and the bucket ``team``."""
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="mtreg")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="mtreg", PolicyName="all", PolicyDocument=json.dumps(policy))
    created = iam.create_access_key(UserName="mtreg")["AccessKey"]
    # From here on moto checks every request's signature (wrong credentials are refused).
    unchecked, settings.INITIAL_NO_AUTH_ACTION_COUNT = settings.INITIAL_NO_AUTH_ACTION_COUNT, 0
    bucket = S3(endpoint, created["AccessKeyId"], created["SecretAccessKey"])
    bucket.client().create_bucket(Bucket=BUCKET)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in bucket.env().items():
            patch.setenv(name, value)
        yield bucket
    settings.INITIAL_NO_AUTH_ACTION_COUNT = unchecked
    server.stop()


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

    s3: S3
    team: Team
    tmp: Path
    db: str
    prefix: str

    @property
    def store(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def home(self, name: str) -> Path:
        return self.tmp / name

    def env(self, home: str, version: str = "1.0.0", **overrides: str) -> dict[str, str]:
        """The environment of an mtreg command on machine ``home``."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MTREG_", "AWS_"))}
        return {
            **base,
            **self.s3.env(),
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
def setup(s3: S3, team: Team, tmp_path: Path) -> Setup:
    return Setup(s3, team, tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", uuid.uuid4().hex)


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
    keys = setup.s3.keys(setup.prefix)
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
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with setup.registry("b") as b:
            assert load_bundle("serving", registry=b).predict([TEXT]) == outputs


@pytest.mark.slow
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
    assert setup.s3.keys(setup.prefix) == {
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


FAULTS = {
    "unreachable": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}, "cannot be reached"),
    "credentials": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "refused the credentials"),
    "bucket": ({"MTREG_STORE_URL": "s3://no-such-bucket/x"}, "does not exist"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_a_store_that_cannot_be_used_is_a_one_line_error_and_changes_nothing(
    setup: Setup, pool: CliPool, fault: str, closed_port: int
) -> None:
    setup.publish("a")
    overrides, words = FAULTS[fault]
    bad = {k: v.format(port=closed_port) for k, v in overrides.items()}
    before = snapshot(setup.db, setup.home("a")), setup.s3.keys(setup.prefix)
    writing = pool.run(setup.env("a", "2.0.0", **bad), "register", "sentiment")
    reading = pool.run(setup.env("cold", **bad), "predict", TEXT)
    for result in (writing, reading):
        one_line_error(result, words)
    assert (snapshot(setup.db, setup.home("a")), setup.s3.keys(setup.prefix)) == before
    assert cache_state(setup.home("cold"))["leftovers"] == []
    # The same commands with the store back complete.
    assert pool.run(setup.env("cold"), "predict", TEXT).code == 0
    assert pool.run(setup.env("a", "2.0.0"), "register", "sentiment").code == 0


def test_an_unknown_scheme_or_a_missing_extra_is_a_one_line_error(
    setup: Setup, pool: CliPool
) -> None:
    one_line_error(pool.run(setup.env("a", MTREG_STORE_URL="ftp://host/x"), "list"), "ftp://")
    env = setup.env("a", MTREG_STORE_URL="gs://bucket/x")
    assert pool.run(env, "init").code == 0
    result = pool.run(env, "trunk", "add", "tiny", str(setup.team.trunk))
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        one_line_error(result, "pip install 'mtreg[gcs]'")
    else:
        assert result.code == 1


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
    key, client = f"{setup.prefix}/objects/{branch}", setup.s3.client()
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if damage == "deleted":
        client.delete_object(Bucket=BUCKET, Key=key)
    else:
        client.put_object(Bucket=BUCKET, Key=key, Body=good[:-1] + bytes([good[-1] ^ 1]))

    cold = pool.run(setup.env("cold"), "predict", TEXT)
    one_line_error(cold, branch[:12], "missing" if damage == "deleted" else "damaged")
    state = cache_state(setup.home("cold"))
    assert branch not in state["objects"] and state["leftovers"] == [] and state["bundles"] == []
    assert predicted(pool.run(setup.env("warm"), "predict", TEXT)) == warm

    # Put back from the warm machine's verified copy, the cold machine's rerun completes.
    client.put_object(
        Bucket=BUCKET, Key=key, Body=(setup.home("warm") / "objects" / branch).read_bytes()
    )
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
    client = setup.s3.client()
    keys = {sha: f"{setup.prefix}/objects/{sha}" for sha in (branch, layer)}
    good = client.get_object(Bucket=BUCKET, Key=keys[branch])["Body"].read()
    client.put_object(Bucket=BUCKET, Key=keys[branch], Body=good[:-1] + bytes([good[-1] ^ 1]))
    client.delete_object(Bucket=BUCKET, Key=keys[layer])
    client.put_object(Bucket=BUCKET, Key=f"{setup.prefix}/manifests/{ident}", Body=b"{}")
    bucket = setup.s3.keys(setup.prefix)

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
    assert report["checked"]["remote"] >= 4 and setup.s3.keys(setup.prefix) == bucket

    repaired = pool.run(setup.env(repairer), "verify", "--remote", "--repair")
    assert repaired.code == 0, repaired.stderr + repaired.stdout
    assert repaired.stdout.count("repaired") == 3 and "DAMAGED" not in repaired.stdout
    fixed = setup.s3.keys(setup.prefix)
    assert fixed[f"objects/{branch}"] == branch and fixed[f"objects/{layer}"] == layer
    assert fixed[f"manifests/{ident}"] == ident
    assert pool.run(setup.env("a"), "verify", "--remote").code == 0
    assert predicted(pool.run(setup.env("cold"), "predict", TEXT)) == warm


def test_verify_remote_without_a_remote_store_is_a_one_line_error(
    setup: Setup, pool: CliPool
) -> None:
    local = setup.env("a", MTREG_STORE_URL=str(setup.tmp / "objects"))
    one_line_error(pool.run(local, "verify", "--remote"), "is not remote", "--remote")


def _namespace_unavailable() -> str | None:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"
    if shutil.which("unshare") is None:
        return "no `unshare` command here"
    done = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=30)
    return None if done.returncode == 0 else "cannot mount a tmpfs in a private namespace"


@pytest.mark.slow
def test_a_full_cache_disk_is_a_one_line_error_and_a_rerun_with_room_completes(
    setup: Setup, pool: CliPool
) -> None:
    reason = _namespace_unavailable()
    if reason:
        pytest.skip(reason)
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
mount -o remount,size=64m {mnt}
{predict} >{out}/room.out 2>{out}/room.err; echo $? >{out}/room.code
"""
    done = subprocess.run(
        ["unshare", "-m", "bash", "-c", script],
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
    assert setup.s3.keys(setup.prefix)[f"manifests/{serving.id}"] == serving.id
    cold = predicted(pool.run(setup.env("cold"), "predict", TEXT))
    assert cold == predicted(pool.run(setup.env("a"), "predict", TEXT))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["objects.stored", "bundle.renamed", "write.before_commit"])
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
    manifests = [k for k in setup.s3.keys(setup.prefix) if k.startswith("manifests/")]
    assert manifests == [f"manifests/{new.id}"]
    with setup.registry("a") as a:
        assert a.gc(dry_run=True) == {"bundles": [], "objects": []}


# -- the README's team setup ---------------------------------------------------------------------


def _team_setup_script(setup: Setup) -> str:
    """The README's team setup block, made to run here: the settings point at this test's
    database, bucket and server; machine b serves from its own home; no pip, no serve."""
    (block,) = re.findall(r"^```bash\n(# Team setup.*?)^```", README.read_text(), re.M | re.S)
    values = {
        "MTREG_DATABASE_URL": setup.db,
        "MTREG_STORE_URL": setup.store,
        "AWS_ACCESS_KEY_ID": f"{setup.s3.key} AWS_SECRET_ACCESS_KEY={setup.s3.secret}",
        "AWS_ENDPOINT_URL": setup.s3.endpoint,
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
def test_the_readme_team_setup_runs_as_written(setup: Setup) -> None:
    env = setup.env("unused")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("MTREG_HOME", "MTREG_DATABASE_URL", "MTREG_STORE_URL"):
        env.pop(name)
    done = subprocess.run(
        ["bash", "-c", _team_setup_script(setup)],
        env={k: v for k, v in env.items() if not k.startswith("AWS_")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["predictions"]["sentiment"]["label"] in ("neg", "pos")
    assert (setup.home("b") / "bundles").is_dir() and not (setup.home("b") / "registry.db").exists()
