"""``onnx.json``: the small manifest of an ONNX export (format ``mtreg-onnx`` 1).

An ONNX export folder is a bundle folder (``manifest.json``, tokenizer, weights) plus the
graph ``model.onnx``, any external-data files it names, and an optional int8 graph. The
export's ``onnx.json`` records the sha256 of each of those graph files, the id of the
bundle folder it sits in (the sha256 of its ``manifest.json``) and the id of the bundle it
was exported from, so that a graph is never run unless its bytes are the ones exported
for this very bundle. The export itself is :mod:`mtreg.runtime.export`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mtreg.artifacts.integrity import FileProblem, file_problem
from mtreg.artifacts.manifest import safe_relative
from mtreg.errors import Damaged, MtregError, NotFound

ONNX_INFO = "onnx.json"
GRAPH = "model.onnx"
FORMAT = "mtreg-onnx"
FORMAT_VERSION = 1
_REEXPORT = "export it again with `mtreg export --format onnx`"


@dataclass(frozen=True)
class OnnxInfo:
    """What an ONNX export holds.

    Attributes:
        bundle: the sha256 of the export folder's ``manifest.json``.
        source: the id of the bundle it was exported from.
        files: every graph file (``model.onnx``, external data, int8 graph) -> sha256.
        report: the export's report (outputs, opset, parity against torch, fusions).
    """

    bundle: str
    source: str
    files: Mapping[str, str] = field(hash=False)
    report: Mapping[str, Any] = field(hash=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(sorted(self.files.items()))))

    def write(self, folder: Path) -> None:
        """Write ``onnx.json`` into ``folder`` (canonical JSON)."""
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bundle": self.bundle,
            "source": self.source,
            "files": dict(self.files),
            "report": dict(self.report),
        }
        text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False)
        (Path(folder) / ONNX_INFO).write_text(text + "\n", encoding="utf-8")


def read_onnx_info(folder: Path) -> OnnxInfo:
    """Read and check the ``onnx.json`` of export folder ``folder``.

    Raises:
        NotFound: no ``model.onnx`` in the folder. Damaged: ``onnx.json`` missing (an
            export older than this format, or removed), unreadable or malformed.
    """
    folder = Path(folder)
    if not (folder / GRAPH).is_file():
        raise NotFound(f"{folder} holds no {GRAPH}: export one with `mtreg export --format onnx`")
    path = folder / ONNX_INFO
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if (data["format"], data["format_version"]) != (FORMAT, FORMAT_VERSION):
            raise ValueError("format")
        files = data["files"]
        if not isinstance(files, dict) or GRAPH not in files:
            raise ValueError("files")
        for relative, sha in files.items():
            safe_relative(relative)
            if not isinstance(sha, str):
                raise ValueError(relative)
        info = OnnxInfo(str(data["bundle"]), str(data["source"]), files, dict(data["report"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise Damaged(
            f"{path} is missing or not a {FORMAT} v{FORMAT_VERSION} record of the graph's "
            f"hashes: {_REEXPORT}"
        ) from None
    except MtregError:
        raise Damaged(f"{path} names an unsafe path: {_REEXPORT}") from None
    return info


def onnx_problems(folder: Path, info: OnnxInfo, bundle_id: str) -> list[FileProblem]:
    """Return what is wrong with an export's graph files against ``info``: a bundle id
    other than ``bundle_id`` (the sha256 of the folder's manifest), and each graph file
    missing or hashing to another sha256."""
    problems = []
    if info.bundle != bundle_id:
        problems.append(
            FileProblem(ONNX_INFO, f"was exported for bundle {info.bundle[:12]}, not this one")
        )
    for relative, sha in info.files.items():
        problem = file_problem(folder, relative, sha, ONNX_INFO)
        if problem is not None:
            problems.append(problem)
    return problems


def verify_onnx(folder: Path, bundle_id: str) -> OnnxInfo:
    """Return the ``onnx.json`` of export folder ``folder`` once its graph files hash to
    what it records and it names ``bundle_id`` (the sha256 of the folder's manifest).

    Raises:
        NotFound, Damaged: as :func:`read_onnx_info`; a graph or external-data file
            changed or missing, or an ``onnx.json`` of another bundle (names the file).
    """
    info = read_onnx_info(folder)
    problems = onnx_problems(folder, info, bundle_id)
    if problems:
        problem = problems[0]
        raise Damaged(f"{Path(folder) / problem.file} {problem.problem}: {_REEXPORT}")
    return info
