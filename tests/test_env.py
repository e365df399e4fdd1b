"""One place each: the MTREG_* variables (core/env.py), list and JSON-lines parsing
(core/text.py) and the layout of a registry home (artifacts/home.py)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

import mtreg
from mtreg.artifacts.home import Home
from mtreg.core import env
from mtreg.core.text import read_jsonl, split_list
from mtreg.errors import MtregError

PACKAGE = Path(mtreg.__file__).resolve().parent
ENV_NAME = re.compile(r"MTREG_[A-Z_]+")


def _package_sources() -> list[Path]:
    """The package's modules: the repository root is the package, minus tests and benchmarks."""
    folders = [p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    return [*PACKAGE.glob("*.py"), *(f for folder in folders for f in folder.rglob("*.py"))]


def test_every_variable_is_named_only_in_core_env() -> None:
    named = set()
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and ENV_NAME.fullmatch(node.value):
                named.add(path.relative_to(PACKAGE).as_posix())
    assert named == {"core/env.py"}


def test_each_variable_has_its_reader() -> None:
    values = {
        env.DATABASE_ENV: "sqlite:///x.db",
        env.DATA_DIR_ENV: "  /data  ",
        env.PLUGINS_PATH_ENV: os.pathsep.join(["a", "", "b"]),
        env.LOAD_PLUGINS_ENV: " keep, ghost ,keep,",
        env.CACHE_MAX_BYTES_ENV: "0",
        env.FAULT_ENV: "gc.deleting:raise",
    }
    assert env.database_url(values) == "sqlite:///x.db"
    assert env.data_dir(values) == "/data"
    assert env.plugins_path(values) == ["a", "b"]
    assert env.load_plugins(values) == ["keep", "ghost"]
    assert env.cache_max_bytes(values) == 0
    assert env.fault(values) == "gc.deleting:raise"
    unset: dict[str, str] = {}
    assert env.database_url(unset) is None and env.data_dir(unset) is None
    assert env.plugins_path(unset) == [] and env.load_plugins(unset) is None
    assert env.cache_max_bytes(unset) is None and env.fault(unset) is None
    assert env.load_plugins({env.LOAD_PLUGINS_ENV: ""}) == []
    assert env.resolve_home(None, {env.HOME_ENV: "/somewhere"}) == Path("/somewhere").resolve()
    assert env.user_cache_dir({env.CACHE_DIR_ENV: " /c "}) == Path("/c")
    assert env.user_cache_dir({}).name == "mtreg"  # the platform's user cache dir


def test_using_data_dir_sets_and_restores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(env.DATA_DIR_ENV, "before")
    with env.using_data_dir(tmp_path / "." / "data") as folder:
        assert folder == (tmp_path / "data").resolve()
        assert os.environ[env.DATA_DIR_ENV] == str(folder)
    assert os.environ[env.DATA_DIR_ENV] == "before"
    monkeypatch.delenv(env.DATA_DIR_ENV)
    with env.using_data_dir(tmp_path):
        pass
    assert env.DATA_DIR_ENV not in os.environ
    with env.using_data_dir(None) as folder:
        assert folder is None and env.DATA_DIR_ENV not in os.environ


def test_split_list() -> None:
    assert split_list(" a, b,,c ,") == ["a", "b", "c"]
    assert split_list("a,a") == ["a", "a"]
    assert split_list("") == [] and split_list(" , ") == []


def test_read_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes('\ufeff{"text": "a"}\n\n  \n["x", "y"]\n"plain"\n'.encode())
    assert list(read_jsonl(path)) == [(1, {"text": "a"}), (4, ["x", "y"]), (5, "plain")]
    path.write_text('"ok"\n{nope\n')
    with pytest.raises(MtregError, match=r"in\.jsonl:2 is not valid JSON \("):
        list(read_jsonl(path))


def test_home_layout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert home.database_file == tmp_path / "registry.db"
    assert home.sqlite_url == f"sqlite:///{tmp_path / 'registry.db'}"
    assert home.objects == tmp_path / "objects"
    assert home.bundle("abc") == tmp_path / "bundles" / "abc"
    assert home.tokenizer("f" * 64) == tmp_path / "cache" / "tokenizers" / ("f" * 32)
    assert home.activations == tmp_path / "cache" / "activations"
    assert home.onnx("id") == tmp_path / "cache" / "onnx" / "id"
    assert home.onnx("id", ["b", "a"]) == tmp_path / "cache" / "onnx" / "id-a-b"
    assert home.onboarding("t") == tmp_path / "onboarding" / "t"
    assert home.onboarding("t", "1.0.0") == tmp_path / "onboarding" / "t" / "1.0.0"
    assert home.trained("t", "1.0.0") == tmp_path / "trained" / "t" / "1.0.0.safetensors"
    assert home.export("0123456789abcdef") == tmp_path / "exports" / "0123456789ab"


def test_home_database_url_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = Home(tmp_path)
    monkeypatch.delenv(env.DATABASE_ENV, raising=False)
    assert home.database_url() == home.sqlite_url
    monkeypatch.setenv(env.DATABASE_ENV, "sqlite:///env.db")
    assert home.database_url() == "sqlite:///env.db"
    assert home.database_url("sqlite:///given.db") == "sqlite:///given.db"
    monkeypatch.setenv(env.HOME_ENV, str(tmp_path / "h"))
    assert Home.resolve() == Home((tmp_path / "h").resolve())


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        (env.PROXY_MAX_BODY_ENV, "-1"),
        (env.PROXY_MAX_BODY_ENV, "1e6"),
        (env.PROXY_BODY_TIMEOUT_ENV, "soon"),
    ],
)
def test_a_proxy_limit_that_is_not_a_positive_number_is_refused_by_name(
    name: str, raw: str
) -> None:
    with pytest.raises(MtregError, match=name):
        env.proxy_body_limits({name: raw})
    assert env.proxy_body_limits({name: " "}) == {}
