"""Hostile and careless input to prediction, and ambiguous names and references (issue 19,
families 4 and 5), through the real ``mtreg`` command (``harness.CliPool``), the Python API
and the server, on SQLite and on PostgreSQL.

Every refusal ends with exit code 1, one line on stderr naming the problem (and the line of
an input file), and the registry exactly as it was: every row and every file's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from factories import Checkpoints, make_branch_file
from harness import CliPool, Databases, Result, Step
from helpers import snapshot, task_spec, write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.home import Home
from mtreg.core.spec import HeadSpec, find_version
from mtreg.errors import MtregError, NotFound
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import LoadedBundle, load_bundle
from mtreg.runtime.export import export_dir, export_hf, export_onnx
from mtreg.runtime.inference import CHARS_PER_TOKEN

pytestmark = pytest.mark.slow

HEAD = ("classification", ("neg", "pos"))
MAX_LENGTH = 32  # make_branch_file's default


@dataclass
class World:
    """A registry with trunk ``tiny`` and task ``sentiment`` 1.0.0 and 1.1.0 (active, served)."""

    tmp: Path
    url: str
    home: Path
    plugins: Path
    checkpoint: Any

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of an mtreg command on this registry."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("MTREG_")}
        base.update(
            MTREG_HOME=str(self.home),
            MTREG_DATABASE_URL=self.url,
            MTREG_PLUGINS_PATH=str(self.plugins),
            OMP_NUM_THREADS="1",
        )
        return {**base, **overrides}

    def registry(self) -> Registry:
        return Registry(url=self.url, home=self.home, plugins_dirs=[self.plugins])

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.url, self.home)

    def bundle(self) -> LoadedBundle:
        with self.registry() as registry:
            return load_bundle("serving", registry=registry)


def _sentiment(tmp: Path, checkpoint: Any, version: str) -> dict[str, Any]:
    """TaskSpec keyword arguments of ``sentiment`` at ``version``, with its branch file."""
    path = tmp / "weights" / f"sentiment-{version}.st"
    weights = make_branch_file(
        path, checkpoint, "sentiment", version, 2, 1, HeadSpec(*HEAD), seed=len(version)
    )
    return task_spec("sentiment", weights, version, HEAD)


@pytest.fixture(scope="module")
def world(
    databases: Databases, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("world")
    trunk = checkpoints.copy(tmp / "trunk", num_layers=3, seed=0)
    checkpoint = read_checkpoint(trunk)
    w = World(tmp, databases.new(), tmp / "home", tmp / "plugins-1.1.0", checkpoint)
    for version in ("1.0.0", "1.1.0"):
        plugins = tmp / f"plugins-{version}"
        module = f"v{version.replace('.', '')}"
        write_plugin(plugins, module, [_sentiment(tmp, checkpoint, version)])
        with Registry(url=w.url, home=w.home, plugins_dirs=[plugins]) as registry:
            if version == "1.0.0":
                registry.add_trunk("tiny", trunk)
            registry.register(["sentiment"], promote=True)
    yield w


def _one_line_error(result: Result, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _in_folder(w: World, cwd: Path, *argv: str) -> Step:
    """A step running ``mtreg ARGV`` with ``cwd`` as the current directory."""
    code = (
        f"import os, runpy, sys\nos.chdir({str(cwd)!r})\nsys.argv = ['mtreg', *{list(argv)!r}]\n"
        "runpy.run_module('mtreg', run_name='__main__', alter_sys=True)\n"
    )
    return Step(w.env(), code=code)


# -- family 4: predict input -----------------------------------------------------------------

GOOD = b'"the film was fine"\n'
# (case, the bad line, what the error says besides its line number)
BAD_LINES = [
    ("null", b"null", "is null, not an input"),
    ("number", b"42", "is a number, not an input"),
    ("boolean", b"true", "is a boolean, not an input"),
    ("lone-surrogate", b'"\\ud800 x"', "lone surrogate"),
    ("invalid-utf8", b'"caf\xe9"', "is not valid UTF-8"),
    ("not-json", b"{nope", "is not valid JSON"),
    ("empty-text", b'""', "empty text"),
    ("whitespace-text", b'"  \\t "', "empty text"),
    ("null-text-field", b'{"text": null}', "expected a string, got null"),
    ("number-in-pair", b'["a", 5]', "expected a string, got int"),
    ("three-item-list", b'["a", "b", "c"]', "is a list of 3 items"),
    ("empty-object", b"{}", "is an empty object"),
    ("pair-for-one-text", b'["a", "b"]', "task 'sentiment' reads one text (text)"),
    ("other-field", b'{"question": "a"}', "task 'sentiment' reads one text (text)"),
]


@pytest.mark.parametrize(("case", "line", "message"), BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_a_bad_input_line_is_named_and_changes_nothing(
    pool: CliPool, world: World, case: str, line: bytes, message: str
) -> None:
    path = world.tmp / f"{case}.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n" + GOOD)
    before = world.snapshot()
    result = pool.run(world.env(), "predict", "--input", str(path))
    _one_line_error(result, f"{path}:3 ", message, "--skip-bad")
    assert result.stdout == ""
    assert world.snapshot() == before


def test_skip_bad_reports_each_skipped_line_and_predicts_the_rest(
    pool: CliPool, world: World
) -> None:
    path = world.tmp / "mixed.jsonl"
    path.write_bytes(b"\n".join([GOOD.strip(), *(line for _, line, _ in BAD_LINES), GOOD]))
    result = pool.run(world.env(), "predict", "--skip-bad", "--input", str(path))
    assert result.code == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["input"] for a in answers] == ["the film was fine"] * 2
    report = result.stderr.strip().splitlines()
    skipped = [f"skipped {path}:{n}: " for n in range(2, 2 + len(BAD_LINES))]
    assert [line[: len(s)] for line, s in zip(report, skipped, strict=False)] == skipped
    assert report[-2] == f"skipped {len(BAD_LINES)} bad line(s), predicted 2"
    assert report[-1].startswith("backend: ")  # what ran, once the inputs were read


def test_the_python_api_numbers_a_bad_input_in_the_whole_list(world: World) -> None:
    bundle = world.bundle()
    # The sixth input, in the third batch of two: its place in the list, not in its batch.
    with pytest.raises(MtregError, match=r"^inputs\[5\]: task 'sentiment' reads one text"):
        bundle.predict(["fine"] * 5 + [("a", "b")], batch_size=2)


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_text_is_refused_alike_by_cli_api_and_server(
    pool: CliPool, world: World, text: str
) -> None:
    from fastapi.testclient import TestClient

    from mtreg.serving.app import create_app
    from mtreg.serving.config import ServeConfig
    from mtreg.serving.reload import load_served

    _one_line_error(pool.run(world.env(), "predict", text), "inputs[0]: empty text")
    bundle = world.bundle()
    with pytest.raises(MtregError, match=r"inputs\[1\]: empty text"):
        bundle.predict(["fine", text])
    with pytest.raises(MtregError, match=r"inputs\[0\]: empty text"):
        bundle.logits([text])
    with world.registry() as registry:
        served = load_served("serving", None, "torch", registry)
    with TestClient(create_app(ServeConfig(), served)) as client:
        answer = client.post("/v1/predict", json={"inputs": ["fine", text]})
    # The same refusal, by the request schema.
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert "inputs[1][0]: empty text" in detail or "inputs.1: String should" in detail


def test_a_10_mb_text_is_cut_before_tokenising(
    pool: CliPool, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = world.bundle()
    huge = "word " * 2_000_000
    lengths: list[int] = []
    real = bundle.tokenizer

    def counting(*columns: Any, **options: Any) -> Any:
        lengths.extend(len(text) for column in columns for text in column)
        return real(*columns, **options)

    monkeypatch.setattr(bundle, "tokenizer", counting)
    started = time.perf_counter()
    answer = bundle.predict([huge])
    assert time.perf_counter() - started < 5
    assert lengths == [MAX_LENGTH * CHARS_PER_TOKEN]
    monkeypatch.setattr(bundle, "tokenizer", real)
    assert answer == bundle.predict([huge[: MAX_LENGTH * CHARS_PER_TOKEN]])
    path = world.tmp / "huge.jsonl"
    path.write_text(json.dumps(huge) + "\n")
    result = pool.run(world.env(), "predict", "--input", str(path))
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["predictions"] == answer[0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.predict("a text"), "inputs must be a list"),
        (lambda b: b.predict({"text": "a"}), "inputs must be a list"),
        (lambda b: b.predict(None), "inputs must be a list"),
        (lambda b: b.predict(iter(["a"])), "inputs must be a list"),
        (lambda b: b.logits("a text"), "inputs must be a list"),
        (lambda b: b.predict(["a"], tasks="sentiment"), "use ['sentiment']"),
        (lambda b: b.predict(["a"], batch_size=0), "batch size must be an integer in 1..4096"),
        (lambda b: b.predict(["a"], batch_size=-3), "got -3"),
        (lambda b: b.predict(["a"], batch_size=2.5), "got 2.5"),
        (lambda b: b.predict(["a"], batch_size=True), "got True"),
        (lambda b: b.predict(["a"], batch_size=10**6), "got 1000000"),
        (lambda b: b.predict([None]), "inputs[0]: task 'sentiment' reads one text"),
        (lambda b: b.predict(["a", "\ud800"]), "inputs[1]: text is not valid Unicode"),
    ],
)
def test_the_python_api_checks_its_arguments(world: World, call: Any, message: str) -> None:
    with pytest.raises(MtregError) as caught:
        call(world.bundle())
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_cli_batch_size_limit_is_the_api_s(pool: CliPool, world: World) -> None:
    result = pool.run(world.env(), "predict", "--batch-size", "5000", "fine")
    _one_line_error(result, "batch size must be an integer in 1..4096, got 5000")


# -- family 5: names and references ----------------------------------------------------------


def _decoy(world: World, name: str) -> Path:
    """A folder ``name`` under a fresh current directory holding a damaged copy of the served
    bundle: loading it fails, so an answer proves the registry's bundle was used."""
    cwd = Path(tempfile.mkdtemp(dir=world.tmp))
    with world.registry() as registry:
        shutil.copytree(registry.bundle_path("serving"), cwd / name)
    (cwd / name / "manifest.json").write_text("{broken")
    return cwd


def test_a_folder_named_like_the_alias_does_not_replace_it(pool: CliPool, world: World) -> None:
    cwd = _decoy(world, "serving")
    before = world.snapshot()
    by_name, by_path = pool.jobs(
        [
            [_in_folder(world, cwd, "predict", "--bundle", "serving", "fine")],
            [_in_folder(world, cwd, "predict", "--bundle", "./serving", "fine")],
        ]
    )
    assert by_name[0].code == 0, by_name[0].stderr
    assert json.loads(by_name[0].stdout)["predictions"]["sentiment"]["label"] in HEAD[1]
    _one_line_error(by_path[0], "serving/manifest.json is not valid JSON")
    assert world.snapshot() == before


def test_a_folder_named_like_the_alias_does_not_replace_it_in_python(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_decoy(world, "serving"))
    with world.registry() as registry:
        assert load_bundle("serving", registry=registry).tasks == ["sentiment"]
        with pytest.raises(MtregError, match="is not valid JSON"):
            load_bundle("./serving", registry=registry)
        with pytest.raises(MtregError, match="is not valid JSON"):
            load_bundle(Path("serving"), registry=registry)


def test_a_bare_name_that_is_only_a_folder_says_how_to_load_it(
    pool: CliPool, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = _decoy(world, "mybundle")
    result = pool.jobs([[_in_folder(world, cwd, "predict", "--bundle", "mybundle", "fine")]])
    _one_line_error(result[0][0], "no bundle or alias 'mybundle'", "write ./mybundle")
    monkeypatch.chdir(cwd)
    with world.registry() as registry, pytest.raises(NotFound, match=r"write \./mybundle"):
        load_bundle("mybundle", registry=registry)


def test_a_path_without_a_bundle_is_named(pool: CliPool, world: World) -> None:
    empty = world.tmp / "no-bundle"
    empty.mkdir(exist_ok=True)
    result = pool.run(world.env(), "predict", "--bundle", str(empty), "fine")
    _one_line_error(result, f"{empty} holds no manifest.json")


@pytest.mark.parametrize("spelling", ["1.0", "v1.0.0", "1.0.0", "V1.0"])
def test_normalised_versions_find_the_same_version(
    pool: CliPool, world: World, spelling: str
) -> None:
    result = pool.run(world.env(), "rollback", "sentiment", "--to", spelling, "--dry-run")
    assert result.code == 0, result.stderr
    assert "1.0.0" in result.stdout
    with world.registry() as registry:
        changes = registry.rollback("sentiment", spelling, dry_run=True)
        assert [(t.version, t.change) for t in changes.tasks] == [("1.0.0", "rolled back")]
        assert registry.task("sentiment").active_version == "1.1.0"


def test_find_version_compares_normalised_forms() -> None:
    registered = ["1.0.0", "1.1.0", "2.0.0rc1"]
    assert find_version("1.0", registered) == "1.0.0"
    assert find_version("v1.1.0", registered) == "1.1.0"
    assert find_version("2.0.0-rc1", registered) == "2.0.0rc1"
    assert find_version("2.0.0", registered) is None
    assert find_version("latest", registered) is None


@pytest.mark.parametrize("spelling", ["1.0.1", "2.0", "latest", "1.0.0.0.1", "v"])
def test_a_version_not_registered_is_refused(pool: CliPool, world: World, spelling: str) -> None:
    before = world.snapshot()
    result = pool.run(world.env(), "rollback", "sentiment", "--to", spelling)
    _one_line_error(result, f"has no version {spelling!r}", "1.0.0, 1.1.0")
    assert world.snapshot() == before


def test_a_value_longer_than_its_column_is_refused_on_every_database(
    pool: CliPool, world: World
) -> None:
    # The plugin's name (its file name, 230 characters) goes into task_versions.plugin,
    # a VARCHAR(200) that SQLite would store whole.
    plugins = world.tmp / "long-plugin"
    spec = _sentiment(world.tmp, world.checkpoint, "1.2.0")
    write_plugin(plugins, "p" * 230, [spec])
    before = world.snapshot()
    result = pool.run(world.env(MTREG_PLUGINS_PATH=str(plugins)), "register", "sentiment")
    _one_line_error(result, "task_versions.plugin", "230 characters", "at most 200")
    assert world.snapshot() == before
    with (
        Registry(url=world.url, home=world.home, plugins_dirs=[plugins]) as registry,
        pytest.raises(MtregError, match="at most 200"),
    ):
        registry.register(["sentiment"])
    assert world.snapshot() == before


def test_a_version_longer_than_its_column_is_refused(pool: CliPool, world: World) -> None:
    plugins = world.tmp / "long-version"
    spec = {**_sentiment(world.tmp, world.checkpoint, "1.0.0"), "version": "1.2.0rc" + "1" * 70}
    write_plugin(plugins, "p", [spec])
    before = world.snapshot()
    result = pool.run(world.env(MTREG_PLUGINS_PATH=str(plugins)), "register", "sentiment")
    _one_line_error(result, "invalid version '1.2.0rc111")
    assert world.snapshot() == before


@pytest.mark.parametrize("inside", ["", "objects", "bundles", "bundles/x", "cache", "../home/x"])
def test_export_into_the_registry_s_own_folders_is_refused(
    pool: CliPool, world: World, inside: str
) -> None:
    out = world.home / inside / "export-here"
    before = world.snapshot()
    result = pool.run(world.env(), "export", "--out", str(out))
    _one_line_error(result, "is inside the registry home", "write exports outside it")
    assert world.snapshot() == before


EXPORTERS = {
    "dir": lambda source, out, **kw: export_dir(source, out, **kw),
    "onnx": lambda source, out, **kw: export_onnx(source, out, **kw),
    "hf": lambda source, out, **kw: export_hf(source, out, "sentiment", **kw),
}


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_the_python_export_functions_refuse_the_registry_s_folders(
    world: World, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = EXPORTERS[fmt]
    with world.registry() as registry:
        source = registry.bundle_path("serving")
    before = world.snapshot()
    # By default, the home holding the source bundle...
    monkeypatch.delenv("MTREG_HOME", raising=False)
    for inside in ("bundles/x", "cache/onnx/x", "objects"):
        with pytest.raises(MtregError, match="is inside the registry home"):
            export(source, world.home / inside / f"{fmt}-here")
    # ...and $MTREG_HOME's, for a bundle folder copied elsewhere.
    copy = world.tmp / f"copy-{fmt}"
    if not copy.exists():
        shutil.copytree(source, copy)
    monkeypatch.setenv("MTREG_HOME", str(world.home))
    with pytest.raises(MtregError, match="is inside the registry home"):
        export(copy, world.home / f"{fmt}-here")
    # Homes passed explicitly replace the defaults.
    with pytest.raises(MtregError, match="is inside the registry home"):
        export(copy, world.tmp / "other" / "x", homes=[Home(world.tmp / "other")])
    assert world.snapshot() == before
    assert not (world.tmp / "other").exists()
    out = export(copy, world.tmp / f"exported-{fmt}", homes=[Home(world.home)])
    assert (world.tmp / f"exported-{fmt}" / "README.md").is_file(), out
