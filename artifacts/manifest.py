"""The bundle manifest: what a merged bundle holds and how its files are named.

A bundle is a directory ``bundles/<id>/`` holding::

    manifest.json                 what the bundle serves; its sha256 is the bundle id
    README.md                     model card (tasks, versions, metrics, layer cost)
    trunk/embeddings.safetensors  the trunk's embeddings
    trunk/layer_00.safetensors    trunk layers 0..K-1, K = the deepest fork
    branches/<task>.safetensors   one branch per task, byte for byte as registered
    tokenizer/...                 the trunk's tokenizer files

:class:`Manifest` is the typed, immutable form of ``manifest.json``. It owns the file
naming above, the checks that make a manifest read from disk safe to act on, subsets
(``mtreg export --tasks``), the layer cost, the canonical JSON bytes and the bundle id.
Writing a bundle directory is :mod:`mtreg.artifacts.bundle_dir`. Nothing here imports
torch or touches the database.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from mtreg.artifacts.release import Release, check_releases
from mtreg.core.spec import HeadSpec, parse_version, validate_name
from mtreg.errors import Damaged, MtregError, NotFound

FORMAT = "mtreg-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_CARD = "README.md"
EMBEDDINGS = "trunk/embeddings.safetensors"
TOKENIZER_DIR = "tokenizer"


def layer_path(index: int) -> str:
    """Return the bundle-relative path of trunk layer ``index``."""
    return f"trunk/layer_{index:02d}.safetensors"


def branch_path(task: str) -> str:
    """Return the bundle-relative path of task ``task``'s branch file."""
    return f"branches/{task}.safetensors"


def tokenizer_path(name: str) -> str:
    """Return the bundle-relative path of the tokenizer file ``name``."""
    return f"{TOKENIZER_DIR}/{name}"


def _readonly(data: Mapping[str, Any]) -> Mapping[str, Any]:
    # One level deep is enough: these hold scalars (config, metrics) or one list of hashes
    # (fingerprint layers). Recursing into hostile JSON could exhaust the stack.
    return MappingProxyType({k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass(frozen=True, kw_only=True)
class TaskEntry:
    """One task of a bundle: the version served, its head, how it reads its input, where
    its branch forks, and its branch file (``file``, with content hash ``sha256``)."""

    name: str
    version: str
    head: HeadSpec
    inputs: tuple[str, ...]
    fork_depth: int
    num_layers: int
    max_length: int
    metrics: Mapping[str, Any] = field(default_factory=dict, hash=False)
    file: str
    sha256: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "metrics", _readonly(self.metrics))

    def to_dict(self) -> dict[str, Any]:
        """Return the task's entry in ``manifest.json`` (its name is the entry's key)."""
        return {
            "version": self.version,
            "fork_depth": self.fork_depth,
            "num_layers": self.num_layers,
            "head": self.head.to_dict(),
            "inputs": list(self.inputs),
            "max_length": self.max_length,
            "metrics": _plain(self.metrics),
            "file": self.file,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class ManifestTrunk:
    """The trunk a bundle's branches fork from, kept up to ``depth`` (the deepest fork).

    ``config`` and ``fingerprint`` are the registered trunk's ``TrunkConfig.to_dict()`` and
    ``TrunkFingerprint.to_dict()``, kept as read.
    """

    name: str
    config: Mapping[str, Any] = field(hash=False)
    fingerprint: Mapping[str, Any] = field(hash=False)
    depth: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", _readonly(self.config))
        object.__setattr__(self, "fingerprint", _readonly(self.fingerprint))

    @property
    def num_layers(self) -> int:
        """The number of layers of the whole trunk (not only those the bundle keeps)."""
        return len(self.fingerprint["layers"])

    def to_dict(self) -> dict[str, Any]:
        """Return the ``trunk`` part of ``manifest.json``."""
        return {
            "name": self.name,
            "config": _plain(self.config),
            "fingerprint": _plain(self.fingerprint),
            "depth": self.depth,
        }


@dataclass(frozen=True)
class LayerCost:
    """Transformer layers evaluated per input: a bundle against one full model per task."""

    bundle_layers: int
    one_model_per_task_layers: int

    def to_dict(self) -> dict[str, int]:
        """Return the ``cost`` part of ``manifest.json``."""
        return {
            "bundle_layers": self.bundle_layers,
            "one_model_per_task_layers": self.one_model_per_task_layers,
        }


@dataclass(frozen=True)
class Manifest:
    """What a bundle serves: its trunk, its tasks (sorted by name), every file it holds
    (bundle-relative path -> sha256) and the tasks' releases (a candidate version beside the
    stable one, :mod:`mtreg.artifacts.release`)."""

    trunk: ManifestTrunk
    tasks: Mapping[str, TaskEntry] = field(hash=False)
    files: Mapping[str, str] = field(hash=False)
    releases: Mapping[str, Release] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", MappingProxyType(dict(sorted(self.tasks.items()))))
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "releases", check_releases(self.tasks, self.releases))

    @classmethod
    def build(
        cls,
        trunk: str,
        config: Mapping[str, Any],
        fingerprint: Mapping[str, Any],
        objects: Mapping[str, Any],
        tasks: Sequence[TaskEntry],
        releases: Sequence[Release] = (),
    ) -> Manifest:
        """Return the manifest of a bundle of ``tasks`` and their ``releases`` on trunk
        ``trunk``.

        The trunk is cut at the deepest fork among the branches; its files are the trunk's
        own objects (``objects``: the object ids of its ``embeddings``, ``layers`` and
        ``tokenizer`` files, the last by file name).

        Raises:
            MtregError: a release without its task, or conflicting with it (``conflict``).
        """
        candidates = [r.candidate for r in releases]
        depth = max((t.fork_depth for t in [*tasks, *candidates]), default=0)
        files = {EMBEDDINGS: objects["embeddings"]}
        files.update({layer_path(i): objects["layers"][i] for i in range(depth)})
        files.update({tokenizer_path(name): sha for name, sha in objects["tokenizer"].items()})
        files.update({t.file: t.sha256 for t in [*tasks, *candidates]})
        return cls(
            ManifestTrunk(trunk, config, fingerprint, depth),
            {t.name: t for t in tasks},
            files,
            {r.task: r for r in releases},
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Return the manifest that :meth:`to_dict` wrote, checking everything that loading,
        exporting and describing a bundle reads (see :func:`read_manifest`).

        Raises:
            MtregError: a bad task name, version or head, a file path that would leave the
                bundle directory, or a task naming a file the manifest does not list.
            KeyError, TypeError, AttributeError, ValueError: a part missing or malformed.
        """
        files, tasks, trunk = data["files"], data["tasks"], data["trunk"]
        _require(isinstance(files, dict) and isinstance(tasks, dict), "files, tasks")
        for relative, sha in files.items():
            safe_relative(relative)
            _require(_is_sha256(sha), f"sha256 of {relative!r}")
        _require(isinstance(trunk, dict), "trunk")
        config, fingerprint, depth = trunk["config"], trunk["fingerprint"], trunk["depth"]
        _require(isinstance(trunk["name"], str) and isinstance(config, dict), "trunk")
        _require(isinstance(fingerprint, dict) and isinstance(fingerprint["layers"], list), "trunk")
        _require(_is_count(depth) and depth <= len(fingerprint["layers"]), "trunk depth")
        # The cost is derived from the tasks; a stored one is only checked for its type.
        _require(isinstance(data["cost"], dict), "cost")
        entries = [_task_entry(name, task, files, depth) for name, task in tasks.items()]
        releases = data.get("releases", {})
        _require(isinstance(releases, dict), "releases")
        return cls(
            ManifestTrunk(trunk["name"], config, fingerprint, depth),
            {entry.name: entry for entry in entries},
            files,
            {
                name: Release.from_dict(r, _task_entry(name, r["candidate"], files, depth))
                for name, r in releases.items()
            },
        )

    @property
    def cost(self) -> LayerCost:
        """The layers this bundle evaluates per input, against one full model per task."""
        return LayerCost(
            self.trunk.depth + sum(t.num_layers for t in self.tasks.values()),
            self.trunk.num_layers * len(self.tasks),
        )

    @property
    def tokenizer_files(self) -> list[str]:
        """The bundle-relative paths of the tokenizer files."""
        return [rel for rel in self.files if rel.startswith(f"{TOKENIZER_DIR}/")]

    def subset(self, tasks: Iterable[str]) -> Manifest:
        """Return the manifest of a bundle holding only ``tasks`` of this one, its trunk
        cut at their deepest fork (what ``mtreg export --tasks`` writes).

        Raises:
            KeyError: a task this manifest does not hold.
        """
        chosen = {name: self.tasks[name] for name in sorted(tasks)}
        releases = {n: r for n, r in self.releases.items() if n in chosen}
        branches = [*chosen.values(), *(r.candidate for r in releases.values())]
        depth = max((t.fork_depth for t in branches), default=0)
        keep = {EMBEDDINGS, *(layer_path(i) for i in range(depth)), *self.tokenizer_files}
        keep |= {t.file for t in branches}
        files = {rel: sha for rel, sha in self.files.items() if rel in keep}
        return Manifest(replace(self.trunk, depth=depth), chosen, files, releases)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready content of ``manifest.json``."""
        # Releases only when there are some, so that other bundles keep the ids they had.
        releases = {"releases": {n: r.to_dict() for n, r in self.releases.items()}}
        return (releases if self.releases else {}) | {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "trunk": self.trunk.to_dict(),
            "tasks": {name: task.to_dict() for name, task in self.tasks.items()},
            "files": dict(self.files),
            "cost": self.cost.to_dict(),
        }

    def to_bytes(self) -> bytes:
        """Return ``manifest.json``'s canonical bytes (sorted keys, fixed layout, UTF-8)."""
        text = json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False)
        return (text + "\n").encode()

    @property
    def bundle_id(self) -> str:
        """The id of the bundle: the sha256 of the canonical manifest bytes."""
        return hashlib.sha256(self.to_bytes()).hexdigest()


def bundle_directory(ref: str | Path) -> Path | None:
    """Return the bundle directory ``ref`` names, or None when it names a registry bundle
    (an alias, a bundle id or an id prefix).

    A directory is written as a path: with a ``/`` (``./serving``, ``/srv/bundle``), as
    ``.`` or ``..``, or passed as a :class:`~pathlib.Path`. A bare word is never a folder, so
    a folder that happens to be named like an alias cannot silently replace the alias.

    Raises:
        NotFound: a path that holds no ``manifest.json``.
    """
    text = str(ref)
    if not isinstance(ref, Path) and "/" not in text and text not in (".", ".."):
        return None
    path = Path(ref)
    if not (path / MANIFEST).is_file():
        raise NotFound(f"{ref} holds no {MANIFEST}: point at a bundle directory")
    return path


def folder_hint(ref: str) -> str:
    """Return a hint for a bare name ``ref`` that is also a bundle folder in the current
    directory (``ref`` names the registry's bundle, see :func:`bundle_directory`), else ``""``."""
    if (Path(ref) / MANIFEST).is_file():
        return f" (to load the folder {ref}, write ./{ref})"
    return ""


def read_manifest(path: Path) -> Manifest:
    """Read a bundle's ``manifest.json`` and check that it is safe to act on.

    Everything that loading, exporting and describing a bundle reads is checked here, so
    that a damaged or hostile manifest ends in one clean error, never in a crash later.

    Returns:
        The manifest.

    Raises:
        NotFound: no manifest at ``path``. MtregError: not valid JSON, another format, a
            bad task name, or a file path that would leave the bundle directory.
    """
    return _parse_manifest(_read_raw(Path(path)), Path(path))


def read_bundle_manifest(root: Path, expected_id: str | None = None) -> tuple[Manifest, str]:
    """Read the manifest of bundle directory ``root`` and check it (see
    :func:`read_manifest`); when ``expected_id`` is given (the id the registry recorded),
    check that the bytes read hash to it.

    Returns:
        The manifest and the bundle's id: the sha256 of the manifest bytes actually read,
        which is what a loaded or served bundle reports.

    Raises:
        As :func:`read_manifest`. Damaged: the bytes hash to another id than
            ``expected_id`` (edited after the bundle was built), or are missing.
    """
    path = Path(root) / MANIFEST
    if expected_id is not None and not path.is_file():
        raise Damaged(f"{path} is missing: run `mtreg verify --repair` to rebuild the bundle")
    raw = _read_raw(path)
    ident = hashlib.sha256(raw).hexdigest()
    if expected_id is not None and ident != expected_id:
        raise Damaged(
            f"{path} hashes to {ident[:12]}, not to the id of bundle {expected_id[:12]} it is "
            "stored under: it was edited; run `mtreg verify --repair` to rebuild the bundle"
        )
    return _parse_manifest(raw, path), ident


def _read_raw(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no bundle manifest at {path}: point at a bundle directory") from None
    except OSError as exc:
        raise MtregError(f"cannot read {path} ({exc}): rebuild or re-export it") from None


def _parse_manifest(raw: bytes, path: Path) -> Manifest:
    """Parse and check manifest bytes read from ``path``; raise as :func:`read_manifest`."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser's stack allows; ValueError
        # (JSONDecodeError among them): also an integer too long to convert.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MtregError(f"{path} is not valid JSON ({reason}): rebuild or re-export it") from None
    if not isinstance(data, dict) or (data.get("format"), data.get("format_version")) != (
        FORMAT,
        FORMAT_VERSION,
    ):
        raise MtregError(
            f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest: rebuild or re-export it"
        )
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise MtregError(f"{path} is malformed (missing or bad {exc}): rebuild it") from None


def _task_entry(name: Any, task: Any, files: dict[str, Any], depth: int) -> TaskEntry:
    """Check one task of a manifest and return its entry; raise as :meth:`Manifest.from_dict`."""
    validate_name(name)
    _require(isinstance(task, dict), f"task {name!r}")
    parse_version(task["version"])
    head = HeadSpec.from_dict(task["head"])
    _require(_is_count(task["fork_depth"]) and task["fork_depth"] <= depth, f"{name} fork_depth")
    _require(_is_count(task["num_layers"]), f"{name} num_layers")
    _require(_is_count(task["max_length"]) and task["max_length"] >= 2, f"{name} max_length")
    inputs = task["inputs"]
    _require(isinstance(inputs, list) and len(inputs) in (1, 2), f"{name} inputs")
    _require(all(isinstance(text, str) for text in inputs), f"{name} inputs")
    _require(isinstance(task["metrics"], dict), f"{name} metrics")
    if not isinstance(task["file"], str) or task["file"] not in files:
        raise MtregError(f"task {name!r} names file {task['file']!r}, not listed")
    return TaskEntry(
        name=name,
        version=task["version"],
        head=head,
        inputs=inputs,
        fork_depth=task["fork_depth"],
        num_layers=task["num_layers"],
        max_length=task["max_length"],
        metrics=task["metrics"],
        file=task["file"],
        # The listed file's hash is the one loading checks, so it is the one kept.
        sha256=files[task["file"]],
    )


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _is_count(value: Any) -> bool:
    # bool is an int subclass; a manifest's counts are plain non-negative integers.
    return type(value) is int and value >= 0


def _is_sha256(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def safe_relative(path: str) -> PurePosixPath:
    """Return ``path`` if it is a plain relative path inside a bundle.

    Raises:
        MtregError: absolute paths, ``..``, backslashes, NUL or empty parts, so that a
            manifest can never point outside its bundle.
    """
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or "\x00" in path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise MtregError(f"bundle manifest names an unsafe path {path!r}: rebuild the bundle")
    return pure
