"""Integrity end to end (issue 16): every file that decides an answer is hashed, and a
tampered one is refused at load with one line naming it, through the real ``mtreg predict``
and the Python API; ``mtreg verify`` finds it, ``--repair`` restores what a good source
allows, and the answers after repair are the answers before. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from factories import Checkpoints, make_branch_file
from harness import CliPool, Databases, Result
from helpers import snapshot, task_spec, write_plugin

from mtreg.artifacts.bundle_dir import remove_bundle_dir
from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.core.spec import HeadSpec
from mtreg.errors import Damaged
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import load_bundle
from mtreg.serving.reload import load_served

pytestmark = pytest.mark.slow

TEXTS = ["the film was great", "i want a refund now"]
SENTIMENT = ("classification", ("neg", "pos"))
TOPICS = ("multilabel", ("a", "b", "c"))


@dataclass
class World:
    """A registry with trunk ``tiny`` and tasks ``sentiment`` (fork 2) and ``topics``
    (fork 1), promoted to ``serving``; ``answers`` are ``mtreg predict``'s before any damage."""

    tmp: Path
    url: str
    home: Path
    plugins: Path
    answers: list[dict[str, Any]] | None = None

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MTREG_")}
        return {
            **base,
            "MTREG_HOME": str(self.home),
            "MTREG_DATABASE_URL": self.url,
            "MTREG_PLUGINS_PATH": str(self.plugins),
            "OMP_NUM_THREADS": "1",
        }

    def registry(self) -> Registry:
        return Registry(url=self.url, home=self.home, plugins_dirs=[self.plugins])

    def bundle_dir(self) -> Path:
        with self.registry() as registry:
            return registry.bundle_path("serving")


@pytest.fixture(scope="module")
def world(
    databases: Databases,
    checkpoints: Checkpoints,
    tmp_path_factory: pytest.TempPathFactory,
    pool: CliPool,
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("integrity")
    trunk = checkpoints.copy(tmp / "trunk", num_layers=3)
    checkpoint = read_checkpoint(trunk)
    specs = []
    for name, head, depth in (("sentiment", SENTIMENT, 2), ("topics", TOPICS, 1)):
        weights = make_branch_file(
            tmp / "weights" / f"{name}.safetensors", checkpoint, name, "1.0.0", depth, 1,
            HeadSpec(*head), seed=len(name),
        )  # fmt: skip
        specs.append(task_spec(name, weights, "1.0.0", head))
    w = World(tmp, databases.new(), tmp / "home", tmp / "plugins")
    write_plugin(w.plugins, "p", specs)
    with w.registry() as registry:
        registry.add_trunk("tiny", trunk)
        registry.register(["sentiment", "topics"], promote=True)
    w.answers = _predict(pool, w, "serving")
    yield w


def _predict(pool: CliPool, w: World, ref: str, *more: str) -> list[dict[str, Any]]:
    results = [pool.run(w.env(), "predict", "--bundle", ref, *more, text) for text in TEXTS]
    assert all(r.code == 0 for r in results), [r.stderr for r in results]
    return [json.loads(r.stdout)["predictions"] for r in results]


def _one_line_error(result: Result, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- tampering with a registry bundle, one case per file kind ----------------------------------


def _in_place(path: Path, change: Callable[[bytes], bytes]) -> None:
    """Rewrite ``path`` in place (same inode, as an editor saving over it does): through a
    bundle's hard link this also changes the object every bundle shares."""
    path.chmod(0o644)
    data = change(path.read_bytes())
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate()


def _flip_last_byte(path: Path) -> None:
    _in_place(path, lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]))


def _edit_manifest(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    text = json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    path.chmod(0o644)
    path.write_text(text)


def _swap_labels(data: dict[str, Any]) -> None:
    labels = data["tasks"]["sentiment"]["head"]["labels"]
    labels.reverse()


def _shallower(data: dict[str, Any]) -> None:
    data["tasks"]["sentiment"]["fork_depth"] = 1


def _new_metric(data: dict[str, Any]) -> None:
    data["tasks"]["sentiment"]["metrics"]["accuracy"] = 0.99


def _tokenizer_file(root: Path) -> Path:
    names = sorted(p for p in (root / "tokenizer").iterdir())
    return names[0]


def _extra_tokenizer_file(root: Path) -> Path:
    extra = root / "tokenizer" / "added_tokens.json"
    extra.write_text('{"zzz": 999}\n')
    return extra


def _remove_tokenizer_file(root: Path) -> Path:
    victim = _tokenizer_file(root)
    victim.unlink()
    return victim


# (case, tamper(bundle dir) -> the file the error names, the kinds verify reports)
CASES: list[tuple[str, Callable[[Path], str], set[str]]] = [
    ("manifest-labels", lambda r: _edit_manifest(r, _swap_labels) or "manifest.json", {"bundle"}),
    ("manifest-fork-depth", lambda r: _edit_manifest(r, _shallower) or "manifest.json", {"bundle"}),
    ("manifest-hash", lambda r: _edit_manifest(r, _new_metric) or "manifest.json", {"bundle"}),
    (
        "embeddings",
        lambda r: _flip_last_byte(r / "trunk/embeddings.safetensors") or "embeddings",
        {"object", "bundle"},
    ),
    (
        "trunk-layer",
        lambda r: _flip_last_byte(r / "trunk/layer_01.safetensors") or "layer_01",
        {"object", "bundle"},
    ),
    (
        "branch",
        lambda r: _flip_last_byte(r / "branches/sentiment.safetensors") or "sentiment",
        {"object", "bundle"},
    ),
    (
        "tokenizer-changed",
        lambda r: (
            _in_place(_tokenizer_file(r), lambda data: data + b"\n") or _tokenizer_file(r).name
        ),
        {"object", "bundle"},
    ),
    ("tokenizer-extra", lambda r: _extra_tokenizer_file(r).name, {"bundle"}),
    ("tokenizer-missing", lambda r: _remove_tokenizer_file(r).name, {"bundle"}),
    ("bundle-removed", lambda r: shutil.rmtree(r) or "manifest.json", {"bundle"}),
]


@pytest.mark.parametrize(("case", "tamper", "kinds"), CASES, ids=[c[0] for c in CASES])
def test_tampering_is_refused_found_and_repaired(
    pool: CliPool, world: World, case: str, tamper: Callable[[Path], str], kinds: set[str]
) -> None:
    root = world.bundle_dir()
    named = tamper(root)
    refused = pool.run(world.env(), "predict", "--bundle", "serving", TEXTS[0])
    _one_line_error(refused, named, "mtreg verify --repair")
    with world.registry() as registry, pytest.raises(Damaged, match=named.replace(".", r"\.")):
        load_bundle("serving", registry=registry)

    before = snapshot(world.url, world.home)
    found = pool.run(world.env(), "verify", "--json")
    _one_line_error(found, "damaged item(s)", "mtreg verify --repair")
    report = json.loads(found.stdout)
    assert not report["ok"]
    assert {f["kind"] for f in report["findings"]} == kinds
    assert all(not f["repaired"] for f in report["findings"])
    assert snapshot(world.url, world.home) == before  # verify alone changes nothing

    repaired = pool.run(world.env(), "verify", "--repair")
    assert repaired.code == 0, repaired.stderr + repaired.stdout
    assert "repaired" in repaired.stdout and "DAMAGED" not in repaired.stdout
    assert pool.run(world.env(), "verify").code == 0
    assert _predict(pool, world, "serving") == world.answers


def test_an_object_without_a_good_source_is_reported_with_what_to_do(
    pool: CliPool, world: World
) -> None:
    weights = world.tmp / "weights" / "topics.safetensors"
    hidden = weights.with_suffix(".hidden")
    weights.rename(hidden)
    try:
        _flip_last_byte(world.bundle_dir() / "branches/topics.safetensors")
        with world.registry() as registry:
            report = registry.verify(repair=True)
        assert not report.ok
        left = {f.kind: f for f in report.damaged}
        assert set(left) == {"object", "bundle"}
        assert "put the branch file of topics 1.0.0 back" in left["object"].todo
        assert "repair its objects first" in left["bundle"].todo
        failed = pool.run(world.env(), "verify", "--repair")
        _one_line_error(failed, "damaged item(s)", "see TO DO above")
    finally:
        hidden.rename(weights)
    with world.registry() as registry:
        assert registry.verify(repair=True).ok
    assert _predict(pool, world, "serving") == world.answers


def test_bundle_show_says_when_a_bundle_folder_is_missing_and_repair_rebuilds_it(
    pool: CliPool, world: World
) -> None:
    root = world.bundle_dir()
    remove_bundle_dir(root)
    shown = pool.run(world.env(), "bundle", "show", "serving")
    assert shown.code == 0, shown.stderr
    assert "missing from this machine" in shown.stdout and "mtreg verify --repair" in shown.stdout
    assert not json.loads(pool.run(world.env(), "bundle", "show", "--json").stdout)["fetched"]
    assert pool.run(world.env(), "verify", "--repair").code == 0
    shown = pool.run(world.env(), "bundle", "show", "serving", "--json")
    assert json.loads(shown.stdout)["fetched"] and (root / "manifest.json").is_file()
    assert _predict(pool, world, "serving") == world.answers


# -- bundle folders: the branch files' own metadata decides, and the id is what was read -------


@pytest.mark.parametrize(
    ("edit", "field"),
    [(_swap_labels, "labels"), (_shallower, "fork depth")],
    ids=["labels", "fork-depth"],
)
def test_an_edited_manifest_in_a_folder_is_refused_naming_the_branch(
    pool: CliPool, world: World, edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    folder = world.tmp / f"folder-{field.replace(' ', '-')}"
    shutil.rmtree(folder, ignore_errors=True)
    assert pool.run(world.env(), "export", "--out", str(folder)).code == 0
    assert _predict(pool, world, str(folder)) == world.answers
    _edit_manifest(folder, edit)
    refused = pool.run(world.env(), "predict", "--bundle", str(folder), TEXTS[0])
    _one_line_error(refused, "branches/sentiment.safetensors", field, "export the folder again")
    with pytest.raises(Damaged, match=field):
        load_bundle(folder)


def test_the_served_id_is_the_hash_of_the_manifest_served(world: World) -> None:
    folder = world.tmp / "served"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(world.bundle_dir(), folder)
    manifest = folder / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_bytes(manifest.read_bytes().replace(b"\n", b"\r\n"))  # same content
    served = load_served(str(folder), None, "torch")
    assert served.id == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert served.id == served.bundle.bundle_id
    root = world.bundle_dir()
    _edit_manifest(root, _swap_labels)
    try:
        with world.registry() as registry, pytest.raises(Damaged, match=r"manifest\.json"):
            load_served("serving", None, "torch", registry)
    finally:
        with world.registry() as registry:
            assert registry.verify(repair=True).ok


# -- ONNX: an export's graph and external data, and the cache serving uses --------------------


@pytest.fixture(scope="module")
def onnx_export(pool: CliPool, world: World) -> Path:
    pytest.importorskip("onnxruntime")
    out = world.tmp / "onnx"
    done = pool.run(world.env(), "export", "--format", "onnx", "--external-data", "--out", str(out))
    assert done.code == 0, done.stderr
    assert (out / "model.onnx.data").is_file()
    return out


def _old_onnx_info(folder: Path) -> None:
    """Write ``onnx.json`` as exports before graph hashing did: the report alone."""
    info = folder / "onnx.json"
    info.write_text(json.dumps(json.loads(info.read_text())["report"]))


# (case, tamper(export folder), the file the error names, what it says)
ONNX_CASES: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("graph", lambda f: _flip_last_byte(f / "model.onnx"), "model.onnx", "not match onnx.json"),
    ("data", lambda f: _flip_last_byte(f / "model.onnx.data"), ".onnx.data", "not match onnx.json"),
    (
        "manifest",
        lambda f: _edit_manifest(f, _new_metric),
        "onnx.json",
        "was exported for bundle",
    ),
    ("old-format", _old_onnx_info, "onnx.json", "record of the graph's hashes"),
]


@pytest.mark.parametrize(
    ("case", "tamper", "named", "says"), ONNX_CASES, ids=[c[0] for c in ONNX_CASES]
)
def test_a_tampered_onnx_export_is_refused(
    pool: CliPool,
    world: World,
    onnx_export: Path,
    tmp_path: Path,
    case: str,
    tamper: Callable[[Path], None],
    named: str,
    says: str,
) -> None:
    copy = shutil.copytree(onnx_export, tmp_path / "onnx")
    if case == "graph":  # the intact export answers as the bundle does
        intact = _predict(pool, world, str(copy), "--backend", "onnx")
        labels = [a["sentiment"]["label"] for a in intact]
        assert labels == [a["sentiment"]["label"] for a in world.answers]
    tamper(copy)
    refused = pool.run(world.env(), "predict", "--bundle", str(copy), "--backend", "onnx", "hi")
    _one_line_error(refused, named, says, "mtreg export --format onnx")
    with pytest.raises(Damaged, match=named.replace(".", r"\.")):
        load_bundle(copy, backend="onnx")


def test_the_onnx_cache_is_verified_repaired_and_rebuilt(pool: CliPool, world: World) -> None:
    pytest.importorskip("onnxruntime")
    with world.registry() as registry:
        first = load_served("serving", None, "onnx", registry)
        cache = registry.home.onnx(first.id)
        assert first.id == registry.bundle("serving").id
        expected = first.bundle.predict(TEXTS)
        _flip_last_byte(cache / "model.onnx")
        # Serving never runs a damaged graph: it exports the bundle again.
        again = load_served("serving", None, "onnx", registry)
        assert again.bundle.predict(TEXTS) == expected
        _flip_last_byte(cache / "model.onnx")
    found = pool.run(world.env(), "verify", "--json")
    _one_line_error(found, "damaged item(s)")
    [finding] = json.loads(found.stdout)["findings"]
    assert (finding["kind"], finding["name"]) == ("onnx", cache.name)
    assert "model.onnx" in finding["problem"]
    assert pool.run(world.env(), "verify", "--repair").code == 0
    assert not cache.exists()
    with world.registry() as registry:
        assert load_served("serving", None, "onnx", registry).bundle.predict(TEXTS) == expected
