"""The bad-input matrix: every way a user, a plugin or a file can be wrong, run through the
real ``mtreg`` command in its own process (``harness.CliPool``), on SQLite and on PostgreSQL.

Each case must end with exit code 1, one line on stderr naming the problem, and the
registry exactly as it was: every table row and the sha256 of every file under MTREG_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import Checkpoints, corrupt_header, make_branch_file, set_tensor
from harness import CliPool, Databases
from helpers import snapshot, stamp, task_spec, write_plugin

from mtreg.artifacts.checkpoint import Checkpoint, read_checkpoint
from mtreg.core.spec import HeadSpec
from mtreg.registry.api import Registry
from mtreg.registry.store import Store

# Every test runs real mtreg commands in processes of the pool.
pytestmark = pytest.mark.slow

HEAD = ("classification", ("neg", "pos"))


# -- the registry every case runs against ----------------------------------------------------


@dataclass
class World:
    """A registry with trunk ``tiny`` and task ``sentiment`` 1.0.0 served, plus a scratch
    directory where each case writes its plugins and weight files."""

    tmp: Path
    url: str
    checkpoint: Checkpoint
    trunk_dir: Path
    databases: Databases
    home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.tmp / "home"

    def env(self, **overrides: str | Path) -> dict[str, str]:
        """The environment of an mtreg command on this registry."""
        base = {
            **os.environ,
            "MTREG_HOME": str(self.home),
            "MTREG_DATABASE_URL": self.url,
            "MTREG_PLUGINS_PATH": str(self.tmp / "plugins-base"),
        }
        for name in ("MTREG_LOAD_PLUGINS", "MTREG_FAULT"):
            base.pop(name, None)
        return {**base, **{k: str(v) for k, v in overrides.items()}}

    def branch(
        self,
        name: str,
        task: str = "probe",
        version: str = "1.0.0",
        depth: int = 2,
        head: tuple = HEAD,
        seed: int = 0,
        checkpoint: Any = None,
    ) -> Path:
        """Write a valid branch file ``name`` under the scratch directory."""
        return make_branch_file(
            self.tmp / "weights" / name,
            checkpoint or self.checkpoint,
            task,
            version,
            depth,
            1,
            HeadSpec(*head),
            seed=seed,
        )

    def plugin(self, case: str, *tasks: dict[str, Any], module: str = "p") -> Path:
        """Write plugin ``module`` offering ``tasks`` in the case's own plugin directory."""
        directory = self.tmp / "plugins" / case
        write_plugin(directory, module, list(tasks))
        return directory

    def snapshot(self, url: str | None = None, home: Path | None = None) -> dict[str, Any]:
        return snapshot(url or self.url, home or self.home)


@pytest.fixture(scope="module")
def world(
    databases: Databases, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("world")
    trunk_dir = checkpoints.copy(tmp / "trunk", num_layers=3, seed=0)
    w = World(tmp, databases.new(), read_checkpoint(trunk_dir), trunk_dir, databases)
    CHECKPOINT_PREFIX.update({d: w.checkpoint.fingerprint.prefix(d) for d in range(4)})
    weights = w.branch("sentiment-1.0.0.safetensors", task="sentiment")
    write_plugin(tmp / "plugins-base", "base", [task_spec("sentiment", weights)])
    with Registry(url=w.url, home=w.home, plugins_dirs=[tmp / "plugins-base"]) as registry:
        registry.add_trunk("tiny", trunk_dir)
        registry.register(["sentiment"], promote=True)
    yield w


# -- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What a case runs: arguments, environment overrides, and which registry to compare."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # the database to snapshot, when not the world's
    home: Path | None = None
    head: str | None = None


def _register_probe(w: World, case: str, *tasks: dict, name: str = "probe") -> Setup:
    return Setup(["register", name], {"MTREG_PLUGINS_PATH": str(w.plugin(case, *tasks))})


def _bad_weights(edit: Callable[[Path], Any]) -> Callable[[World, str], Setup]:
    """A case: task ``probe`` whose otherwise valid weights file ``edit`` damages."""

    def setup(w: World, case: str) -> Setup:
        path = w.branch(f"{case}.safetensors")
        edit(path)
        return _register_probe(w, case, task_spec("probe", path))

    return setup


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])


def _no_metadata(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(2, 32)}, str(path))


def _other_trunk(w: World, case: str) -> Setup:
    # Same embeddings and layer 0, another layer 1: the branch forks at 2, above it.
    fp = w.checkpoint.fingerprint
    other = replace(fp, layers=(fp.layers[0], "0" * 64, *fp.layers[2:]))
    fake = types.SimpleNamespace(config=w.checkpoint.config, fingerprint=other)
    return _register_probe(w, case, task_spec("probe", w.branch(f"{case}.st", checkpoint=fake)))


def _other_tokenizer(w: World, case: str) -> Setup:
    fp = w.checkpoint.fingerprint
    fake = types.SimpleNamespace(
        config=w.checkpoint.config, fingerprint=replace(fp, tokenizer="f" * 64)
    )
    return _register_probe(w, case, task_spec("probe", w.branch(f"{case}.st", checkpoint=fake)))


def _malformed_prefix(w: World, case: str) -> Setup:
    fake = types.SimpleNamespace(
        config=w.checkpoint.config,
        fingerprint=types.SimpleNamespace(prefix=lambda depth: {"layers": 5, "depth": "x"}),
    )
    return _register_probe(w, case, task_spec("probe", w.branch(f"{case}.st", checkpoint=fake)))


def _two_plugins(w: World, case: str) -> Setup:
    weights = w.branch(f"{case}.st")
    w.plugin(case, task_spec("probe", weights), module="first")
    return Setup(
        ["register", "probe"],
        {"MTREG_PLUGINS_PATH": str(w.plugin(case, task_spec("probe", weights), module="second"))},
    )


def _sentiment(version: str, seed: int = 0, head=HEAD) -> Callable[[World, str], Setup]:
    def setup(w: World, case: str) -> Setup:
        weights = w.branch(f"{case}.st", task="sentiment", version=version, seed=seed, head=head)
        return _register_probe(
            w, case, task_spec("sentiment", weights, version, head=head), name="sentiment"
        )

    return setup


def _plugin_source(source: str) -> Callable[[World, str], Setup]:
    def setup(w: World, case: str) -> Setup:
        directory = w.tmp / "plugins" / case
        directory.mkdir(parents=True)
        (directory / "broken.py").write_text(source)
        return Setup(["register", "probe"], {"MTREG_PLUGINS_PATH": str(directory)})

    return setup


def _bad_name(name: str) -> Callable[[World, str], Setup]:
    """A case: a plugin declaring a task with a bad name (the plugin is refused)."""

    def setup(w: World, case: str) -> Setup:
        return _register_probe(w, case, task_spec(name, w.branch(f"{case}.st")))

    return setup


def _bundle_copy(edit: Callable[[dict[str, Any], Path], Any]) -> Callable[[World, str], Setup]:
    """A case: ``predict`` on a copy of the served bundle that ``edit`` tampers with.

    ``edit`` changes the manifest in place, or returns the bytes to write instead of it.
    """

    def setup(w: World, case: str) -> Setup:
        with Registry(url=w.url, home=w.home) as registry:
            source = registry.bundle_path("serving")
        copy = w.tmp / "bundles" / case
        shutil.copytree(source, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        raw = edit(manifest, copy)
        (copy / "manifest.json").write_bytes(raw or json.dumps(manifest).encode())
        return Setup(["predict", "--bundle", str(copy), "the film was fine"])

    return setup


def _escape(target: str) -> Callable[[dict[str, Any], Path], None]:
    def edit(manifest: dict[str, Any], _copy: Path) -> None:
        task = manifest["tasks"]["sentiment"]
        manifest["files"][target] = manifest["files"].pop(task["file"])
        task["file"] = target

    return edit


def _tamper(manifest: dict[str, Any], copy: Path) -> None:
    branch = copy / manifest["tasks"]["sentiment"]["file"]
    data = bytearray(branch.read_bytes())
    data[-1] ^= 0xFF
    branch.unlink()  # a hard link into the object store: never write through it
    branch.write_bytes(bytes(data))


def _deep_json(_manifest: dict[str, Any], _copy: Path) -> bytes:
    return b"[" * 100_000 + b"]" * 100_000


def _other_database(revision: str | None, head: str | None = None) -> Callable:
    """A case: ``list`` on a new registry database stamped with another ``revision``."""

    def setup(w: World, case: str) -> Setup:
        url, home = w.databases.new(), w.tmp / "homes" / case
        Store(url).close()
        if revision:
            stamp(url, revision)
        env = {"MTREG_DATABASE_URL": url, "MTREG_HOME": str(home)}
        return Setup(["list"], env, url=url, home=home, head=head)

    return setup


def _command(*argv: str, **env: str) -> Callable[[World, str], Setup]:
    def setup(w: World, case: str) -> Setup:
        args = [a.replace("{TMP}", str(w.tmp)).replace("{TRUNK}", str(w.trunk_dir)) for a in argv]
        return Setup(args, dict(env))

    return setup


def _probe(**branch: Any) -> Callable[[World, str], Setup]:
    """A case: register task ``probe`` whose weights :meth:`World.branch` writes."""

    def setup(w: World, case: str) -> Setup:
        return _register_probe(w, case, task_spec("probe", w.branch(f"{case}.st", **branch)))

    return setup


def _probe_spec(**spec: Any) -> Callable[[World, str], Setup]:
    """A case: register task ``probe`` with valid weights and these TaskSpec fields."""

    def setup(w: World, case: str) -> Setup:
        return _register_probe(w, case, {**task_spec("probe", w.branch(f"{case}.st")), **spec})

    return setup


def _forged(prefix: Callable[[int], dict], depth: int = 2) -> Callable[[World, str], Setup]:
    """A case: a branch file whose recorded trunk prefix is ``prefix(depth)``."""

    def setup(w: World, case: str) -> Setup:
        fake = types.SimpleNamespace(
            config=w.checkpoint.config, fingerprint=types.SimpleNamespace(prefix=prefix)
        )
        weights = w.branch(f"{case}.st", checkpoint=fake, depth=depth)
        return _register_probe(w, case, task_spec("probe", weights))

    return setup


def _other_layer_1(depth: int) -> dict:
    # Same tokenizer, config, embeddings and layer 0; another layer 1, below the fork at 2.
    prefix = CHECKPOINT_PREFIX[depth]
    return {**prefix, "layers": [prefix["layers"][0], "0" * 64]}


def _set(name: str, value: torch.Tensor | None) -> Callable[[World, str], Setup]:
    return _bad_weights(lambda path: set_tensor(path, name, value))


CHECKPOINT_PREFIX: dict[int, dict] = {}  # filled by the world fixture
UNREACHABLE = "postgresql+psycopg://nobody:secret@127.0.0.1:1/none"
HOOK_RAISES = """\
import mtreg


@mtreg.hookimpl
def register_tasks(register):
    raise RuntimeError("hook exploded")
"""

# (case id, how to set it up, what the one-line error must say)
CASES: list[tuple[str, Callable[[World, str], Setup], str]] = [
    # weight files
    ("missing-weights", _probe_spec(weights="/nonexistent/w.safetensors"), "not found"),
    ("weights-is-a-directory", _probe_spec(weights="/"), "not found"),
    ("empty-weights", _bad_weights(lambda p: p.write_bytes(b"")), "not a readable safetensors"),
    ("truncated-safetensors", _bad_weights(_truncate), "not a readable safetensors"),
    ("corrupt-header", _bad_weights(corrupt_header), "not a readable safetensors"),
    ("huge-header-length", _bad_weights(_huge_header), "not a readable safetensors"),
    ("no-mtreg-metadata", _bad_weights(_no_metadata), "has no mtreg-branch/1 metadata"),
    ("wrong-tensor-shape", _set("head.weight", torch.zeros(3, 32)), "'head.weight' has shape"),
    ("missing-tensor", _set("head.bias", None), "lacks tensor 'head.bias'"),
    ("unexpected-tensor", _set("extra", torch.zeros(1)), "unexpected tensor 'extra'"),
    ("integer-tensor", _set("head.bias", torch.zeros(2, dtype=torch.int32)), "floating point"),
    ("nan-weights", _set("head.bias", torch.tensor([0.0, float("nan")])), "NaN or Inf"),
    ("inf-weights", _set("head.bias", torch.tensor([float("inf"), 0.0])), "NaN or Inf"),
    ("weights-of-another-task", _probe(task="other"), "holds 'other' 1.0.0"),
    ("fork-deeper-than-trunk", _forged(lambda d: {"depth": d}, depth=5), "forks at depth 5"),
    ("malformed-trunk-record", _forged(lambda d: {"layers": 5}), "malformed trunk record"),
    ("head-differs-from-plugin", _probe(head=("classification", ("x", "y"))), "plugin declares"),
    # trunk compatibility
    ("other-trunk-below-fork", _forged(_other_layer_1), "trunk layer 1 differs"),
    (
        "tokenizer-mismatch",
        _forged(lambda d: {**CHECKPOINT_PREFIX[d], "tokenizer": "f" * 64}),
        "the tokenizer differs",
    ),
    ("unknown-trunk", _probe_spec(trunk="nosuch"), "trunk 'nosuch' is not registered"),
    # versions
    ("duplicate-task-across-plugins", _two_plugins, "registered by both plugins 'first'"),
    ("version-not-greater", _sentiment("0.9.0"), "not greater than the latest registered 1.0.0"),
    ("same-version-other-weights", _sentiment("1.0.0", seed=9), "already registered with diff"),
    (
        "labels-changed-without-major",
        _sentiment("1.1.0", head=("classification", ("n", "p"))),
        "needs a new major version",
    ),
    ("version-not-semantic", _probe_spec(version="1.0"), "invalid version '1.0'"),
    # names
    ("task-name-dotdot", _bad_name("../x"), "invalid task name '../x'"),
    ("task-name-slash", _bad_name("a/b"), "invalid task name 'a/b'"),
    ("task-name-nul", _bad_name("a\x00b"), "invalid task name 'a\\x00b'"),
    ("register-argument-dotdot", _command("register", "../x"), "invalid task name '../x'"),
    ("register-argument-slash", _command("register", "/"), "invalid task name '/'"),
    ("alias-name-slash", _command("alias", "set", "a/b", "latest"), "invalid alias name 'a/b'"),
    ("trunk-name-dotdot", _command("trunk", "add", "../x", "{TRUNK}"), "invalid trunk name"),
    ("trunk-name-taken", _command("trunk", "add", "tiny", "{TRUNK}"), "already registered"),
    ("trunk-not-a-checkpoint", _command("trunk", "add", "other", "{TMP}/weights"), "weights"),
    # plugins
    ("plugin-fails-to-import", _plugin_source("import no_such_module\n"), "ModuleNotFoundError"),
    ("plugin-hook-raises", _plugin_source(HOOK_RAISES), "hook exploded"),
    # bundle files
    ("manifest-path-dotdot", _bundle_copy(_escape("../../x.safetensors")), "unsafe path '../.."),
    ("manifest-path-absolute", _bundle_copy(_escape("/etc/passwd")), "unsafe path '/etc/passwd'"),
    ("manifest-file-tampered", _bundle_copy(_tamper), "does not match the manifest"),
    ("manifest-deeply-nested", _bundle_copy(_deep_json), "is not valid JSON"),
    # databases
    ("database-outdated", _other_database(None, head="9999_next"), "run `mtreg db upgrade`"),
    ("database-newer-than-code", _other_database("9999_future"), "written by a newer mtreg"),
    ("database-unreachable", _command("list", MTREG_DATABASE_URL=UNREACHABLE), "cannot reach"),
    ("database-url-unparseable", _command("list", MTREG_DATABASE_URL="nope"), "cannot use"),
    # references
    ("unknown-alias", _command("bundle", "show", "nosuch"), "no bundle or alias 'nosuch'"),
    ("unknown-alias-predict", _command("predict", "--bundle", "nosuch", "hi"), "'nosuch'"),
    ("alias-to-unknown-bundle", _command("alias", "set", "serving", "0123456789ab"), "'0123"),
    ("unknown-bundle-id", _command("bundle", "diff", "latest", "fedcba987654"), "'fedcba98"),
    (
        "export-unknown-task",
        _command("export", "--tasks", "nosuch", "--out", "{TMP}/export-x"),
        "task 'nosuch' is not in this bundle",
    ),
    ("rollback-unknown-version", _command("rollback", "sentiment", "--to", "9.9.9"), "9.9.9"),
    ("remove-unknown-task", _command("remove", "nosuch"), "task 'nosuch' is not registered"),
]


@pytest.mark.parametrize(("case", "setup", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_1_and_changes_nothing(
    pool: CliPool, world: World, case: str, setup: Callable[[World, str], Setup], message: str
) -> None:
    chosen = setup(world, case)
    before = world.snapshot(chosen.url, chosen.home)
    result = pool.run(world.env(**chosen.env), *chosen.argv, head=chosen.head)
    lines = result.stderr.strip().splitlines()
    assert result.code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert "secret" not in result.stderr  # a database password is never printed
    assert world.snapshot(chosen.url, chosen.home) == before


def test_after_every_case_the_served_bundle_still_loads(pool: CliPool, world: World) -> None:
    """Runs after the matrix (same module-scoped registry): nothing damaged the bundle."""
    result = pool.run(world.env(), "predict", "--bundle", "serving", "the film was fine")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["predictions"]["sentiment"]["label"] in HEAD[1]
