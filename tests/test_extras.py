"""A missing optional dependency, from the Python API: every function that needs an extra's
module raises one :class:`MtregError` line naming the ``pip install`` to run (issue 19,
family 8), through ``core.extras``. The same through the real CLI is
``tests/test_hostile_hints.py::test_a_missing_extra_is_one_line_naming_the_pip_command``.

A module is hidden by ``sys.modules[name] = None``, which makes every import of it fail.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mtreg.errors import MtregError


def _export_onnx(tmp: Path) -> None:
    from mtreg.runtime.export import export_onnx

    export_onnx(tmp / "bundle", tmp / "out")


def _onnx_backend(tmp: Path) -> None:
    from mtreg.runtime.bundle import OnnxModel

    OnnxModel(tmp / "bundle", "0" * 64)


def _serve(tmp: Path) -> None:
    from mtreg.serving.config import ServeConfig
    from mtreg.serving.server import serve

    serve(ServeConfig(bundle=str(tmp / "bundle")), port=0)


def _figure(tmp: Path) -> None:
    from mtreg.cli.reporting import figure

    figure([], {"num_layers": 2}, tmp / "figure.png")


def _store(scheme: str) -> Callable[[Path], None]:
    def open_store(tmp: Path) -> None:
        from mtreg.artifacts.remote import RemoteStore

        RemoteStore(f"{scheme}://bucket/prefix").fs  # noqa: B018 (the property imports)

    return open_store


def _push(tmp: Path) -> None:
    from mtreg.artifacts.hub import push_folder

    push_folder(tmp, "owner/name")


def _hub_id(tmp: Path) -> None:
    from mtreg.artifacts.hub import resolve

    resolve("owner/name", "trunk")


# (hidden module, the call needing it, the pip target the message names)
CASES = [
    ("onnxruntime", _export_onnx, "mtreg[onnx]"),
    ("onnxruntime", _onnx_backend, "mtreg[onnx]"),
    ("fastapi", _serve, "mtreg[serve]"),
    ("uvicorn", _serve, "mtreg[serve]"),
    ("prometheus_client", _serve, "mtreg[serve]"),
    ("matplotlib", _figure, "mtreg[report]"),
    ("s3fs", _store("s3"), "mtreg[s3]"),
    ("gcsfs", _store("gs"), "mtreg[gcs]"),
    ("adlfs", _store("az"), "mtreg[azure]"),
    ("huggingface_hub", _push, "huggingface_hub>=1.0"),
    ("huggingface_hub", _hub_id, "huggingface_hub>=1.0"),
]


@pytest.mark.parametrize(
    ("hidden", "call", "target"),
    CASES,
    ids=[f"{hidden}-{call.__name__.strip('_')}" for hidden, call, _ in CASES],
)
def test_a_missing_extra_is_one_mtreg_error_naming_the_pip_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hidden: str,
    call: Callable[[Path], None],
    target: str,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(MtregError) as caught:
        call(tmp_path)
    message = str(caught.value)
    assert message == f"{hidden} is not installed: run pip install '{target}'"
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_another_import_failure_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtreg.core.extras import require

    # A module no extra installs is a bug or a broken installation, not a hint.
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(ImportError) as caught:
        require("numpy")
    assert not isinstance(caught.value, MtregError)
