"""Untrusted files and names: no code runs from data, and every malformed input ends in a
clean mtreg error, never a crash or a hang (property tests with hypothesis)."""

from __future__ import annotations

import io
import json
import re
import signal
import tokenize
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pytest
from factories import Checkpoints, make_branch_file
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mtreg.artifacts.branch_file import read_branch
from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.manifest import read_manifest, safe_relative
from mtreg.core.spec import HeadSpec, parse_version, validate_name
from mtreg.errors import InvalidName, InvalidVersion, InvalidWeights, MtregError

PACKAGE = Path(__file__).resolve().parent.parent
UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
SETTINGS = settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _unsafe_calls(source: str) -> Iterator[tuple[int, str]]:
    """Yield (line, what) for code (not strings or comments) that deserialises unsafely."""
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER)
    ]
    for index, token in enumerate(tokens):
        following = " ".join(t.string for t in tokens[index : index + 3])
        if token.type == tokenize.NAME and token.string in UNSAFE_MODULES:
            yield token.start[0], token.string
        elif following in ("torch . load", "trust_remote_code = True"):
            yield token.start[0], following


def test_no_pickle_torch_load_or_remote_code_in_the_package() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("tests", ".venv", "build") or "egg-info" in str(relative):
            continue
        for line, what in _unsafe_calls(path.read_text(encoding="utf-8")):
            found.append(f"{relative}:{line}: {what}")
    assert not found, "unsafe deserialisation in the package: " + ", ".join(found)


def test_the_scan_finds_what_it_looks_for() -> None:
    source = 'import pickle\nx = torch.load(f)\nm(trust_remote_code=True)\n"pickle"  # dill\n'
    assert [line for line, _ in _unsafe_calls(source)] == [1, 2, 3]


@contextmanager
def no_hang(seconds: int = 10) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM after ``seconds``."""

    def alarm(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- names and versions ------------------------------------------------------------------------

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@SETTINGS
@given(st.one_of(st.text(max_size=80), st.from_regex(NAME, fullmatch=True)))
@example("../x")
@example("/")
@example("a\x00b")
@example("a\n")
@example("ａ")  # a full-width letter
def test_validate_name_accepts_exactly_the_safe_names(name: str) -> None:
    try:
        assert validate_name(name) == name
    except InvalidName as exc:
        assert "\n" not in str(exc)
        assert NAME.fullmatch(name) is None
    else:
        assert NAME.fullmatch(name) is not None and name.isascii()
        # A valid name is one plain path component.
        assert PurePosixPath(name).name == name and name not in (".", "..")


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.from_regex(r"\d{1,4}\.\d{1,4}\.\d{1,4}(rc\d)?")))
@example("1.0")
@example("v1.0.0")
@example("1.0.0+local")
@example("1!1.0.0")
def test_parse_version_is_a_semantic_version_or_invalid(text: str) -> None:
    try:
        version = parse_version(text)
    except InvalidVersion:
        return
    assert len(version.release) == 3 and not version.local and version.epoch == 0


@SETTINGS
@given(st.tuples(*[st.integers(0, 999)] * 3), st.tuples(*[st.integers(0, 999)] * 3))
def test_version_order_is_numeric(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    left, right = (parse_version(".".join(map(str, v))) for v in (a, b))
    assert (left < right) == (a < b) and (left == right) == (a == b)


# -- manifests ---------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _valid_manifest() -> dict:
    sha = "a" * 64
    return {
        "format": "mtreg-bundle",
        "format_version": 1,
        "trunk": {"name": "tiny", "config": {}, "fingerprint": {"layers": ["x"]}, "depth": 1},
        "tasks": {
            "t": {
                "version": "1.0.0",
                "fork_depth": 1,
                "num_layers": 1,
                "head": {"kind": "classification", "labels": ["a", "b"]},
                "inputs": ["text"],
                "max_length": 32,
                "metrics": {},
                "file": "branches/t.safetensors",
                "sha256": sha,
            }
        },
        "files": {"branches/t.safetensors": sha, "trunk/embeddings.safetensors": sha},
        "cost": {},
    }


def _paths(data: object) -> Iterator[list]:
    """Every path (list of keys) into nested dicts and lists."""
    yield []
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return
    for key, value in items:
        for rest in _paths(value):
            yield [key, *rest]


@st.composite
def mangled_manifests(draw: st.DrawFn) -> object:
    """A valid manifest with one part replaced by random JSON, or random JSON outright."""
    if draw(st.booleans()):
        return draw(JSON)
    manifest = _valid_manifest()
    path = draw(st.sampled_from(list(_paths(manifest))[1:]))
    target = manifest
    for key in path[:-1]:
        target = target[key]
    if draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = draw(JSON | st.sampled_from(["../x", "/etc/passwd", "a\\b", "", "."]))
    return manifest


def _check_loaded(manifest: dict, root: Path) -> None:
    """What a returned manifest guarantees to the code that uses it."""
    for relative in manifest["files"]:
        resolved = (root / relative).resolve()
        assert resolved.is_relative_to(root.resolve())
    for name, task in manifest["tasks"].items():
        validate_name(name)
        HeadSpec.from_dict(task["head"])
        assert task["file"] in manifest["files"]
        assert 0 <= task["fork_depth"] <= manifest["trunk"]["depth"]


@SETTINGS
@given(mangled_manifests())
@example([[[[]]]])
def test_read_manifest_is_a_manifest_or_a_clean_error(tmp_path: Path, data: object) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    try:
        manifest = read_manifest(path)
    except MtregError as exc:
        assert "\n" not in str(exc)
        return
    _check_loaded(manifest.to_dict(), tmp_path)


def test_read_manifest_refuses_nesting_deeper_than_the_parser(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MtregError, match="not valid JSON"):
        read_manifest(path)


@SETTINGS
@given(st.text(max_size=40))
@example("a/../../b")
@example("a//b")
@example("./a")
def test_safe_relative_never_leaves_the_bundle(tmp_path: Path, path: str) -> None:
    try:
        safe_relative(path)
    except MtregError:
        return
    assert (tmp_path / path).resolve().is_relative_to(tmp_path.resolve())


# -- safetensors headers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def branch(tmp_path_factory, checkpoints: Checkpoints) -> tuple[bytes, object]:
    """A valid branch file's bytes and the trunk config it fits."""
    tmp = tmp_path_factory.mktemp("branch")
    checkpoint = read_checkpoint(
        checkpoints.shared(num_layers=2, hidden=8, heads=2, intermediate=16)
    )
    path = make_branch_file(
        tmp / "b.safetensors",
        checkpoint,
        "t",
        "1.0.0",
        1,
        1,
        HeadSpec("classification", ("a", "b")),
    )
    return path.read_bytes(), checkpoint.config


@st.composite
def mangled_files(draw: st.DrawFn, original: bytes) -> bytes:
    """The file with its header (or header length) changed at random."""
    length = int.from_bytes(original[:8], "little")
    header, body = original[8 : 8 + length], original[8 + length :]
    kind = draw(st.sampled_from(["flip", "splice", "length", "json", "truncate"]))
    if kind == "flip":
        data = bytearray(header)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        header = bytes(data)
    elif kind == "splice":
        start = draw(st.integers(0, len(header)))
        header = (
            header[:start]
            + draw(st.binary(max_size=40))
            + header[start + draw(st.integers(0, 40)) :]
        )
    elif kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + header + body
    elif kind == "json":
        parsed = json.loads(header)
        key = draw(st.sampled_from(sorted(parsed)))
        if key == "__metadata__":
            meta = parsed[key]
            field = draw(st.sampled_from(sorted(meta)))
            meta[field] = draw(
                st.sampled_from(['{"layers": 5}', "[" * 5000, "-1", "null", "1e999"])
                | st.text(max_size=20)
            )
        else:
            entry = parsed[key]
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            entry[field] = draw(JSON | st.sampled_from(["I32", "F16", "BOOL", [2**40], [0, 2**40]]))
        header = json.dumps(parsed).encode()
    else:
        return original[: draw(st.integers(0, len(original) - 1))]
    return len(header).to_bytes(8, "little") + header + body


@settings(max_examples=200, deadline=2000, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mangled_safetensors_headers_are_clean_errors(tmp_path: Path, branch, data) -> None:
    original, config = branch
    mangled = data.draw(mangled_files(original))
    path = tmp_path / "mangled.safetensors"
    path.write_bytes(mangled)
    with no_hang():
        try:
            read_branch(path, config)
        except InvalidWeights as exc:
            assert "\n" not in str(exc)


def test_branch_metadata_nested_deeper_than_the_parser_is_invalid_weights() -> None:
    from mtreg.artifacts.branch_file import BranchMeta

    metadata = {
        "mtreg.format": "mtreg-branch/1",
        "mtreg.task": "t",
        "mtreg.task_version": "1.0.0",
        "mtreg.fork_depth": "1",
        "mtreg.num_layers": "1",
        "mtreg.head_kind": "classification",
        "mtreg.labels": '["a", "b"]',
        "mtreg.max_length": "8",
        "mtreg.trunk_prefix": "{}",
        "mtreg.training": "[" * 100_000,
    }
    with pytest.raises(InvalidWeights):
        BranchMeta.from_metadata(metadata)
