"""Merged bundles on disk: the manifest, its id, and the atomic, incremental writer.

A bundle is a directory ``bundles/<id>/`` holding::

    manifest.json                 what the bundle serves; its sha256 is the bundle id
    README.md                     model card (tasks, versions, metrics, layer cost)
    trunk/embeddings.safetensors  the trunk's embeddings
    trunk/layer_00.safetensors    trunk layers 0..K-1, K = the deepest fork
    branches/<task>.safetensors   one branch per task, byte for byte as registered
    tokenizer/...                 the trunk's tokenizer files

Every weight file is a hard link to (or a copy of) an object in the object store, so a
rebuild writes only the manifest and model card; unchanged tasks' files are the same
inodes as before. Nothing here imports torch or touches the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from mtreg.artifacts.objects import ObjectStore, fsync_dir
from mtreg.core import faults
from mtreg.core.spec import HeadSpec, parse_version, validate_name
from mtreg.errors import MtregError, NotFound
from mtreg.registry.records import TaskVersionRecord, TrunkRecord

FORMAT = "mtreg-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def canonical_json(data: Any) -> bytes:
    """Serialise ``data`` deterministically (sorted keys, fixed separators, UTF-8)."""
    return (json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def bundle_id(manifest: dict[str, Any]) -> str:
    """Return the id of a bundle: the sha256 of its canonical manifest bytes."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def layer_path(index: int) -> str:
    """Return the bundle-relative path of trunk layer ``index``."""
    return f"trunk/layer_{index:02d}.safetensors"


def build_manifest(trunk: TrunkRecord, members: Sequence[TaskVersionRecord]) -> dict[str, Any]:
    """Describe the bundle of ``members`` (active task versions) on ``trunk``.

    The trunk is cut at K, the deepest fork among the members; its files are always the
    registered trunk's own objects, never an older bundle's.
    """
    depth = max((m.fork_depth for m in members), default=0)
    objects = trunk.objects
    files = {"trunk/embeddings.safetensors": objects["embeddings"]}
    files.update({layer_path(i): objects["layers"][i] for i in range(depth)})
    files.update({f"tokenizer/{name}": sha for name, sha in objects["tokenizer"].items()})
    tasks = {}
    for m in sorted(members, key=lambda m: m.task):
        path = f"branches/{m.task}.safetensors"
        files[path] = m.weights_sha256
        tasks[m.task] = {
            "version": m.version,
            "fork_depth": m.fork_depth,
            "num_layers": m.num_layers,
            "head": {"kind": m.head_kind, "labels": list(m.labels)},
            "inputs": list(m.inputs),
            "max_length": m.max_length,
            "metrics": m.metrics,
            "file": path,
            "sha256": m.weights_sha256,
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "trunk": {
            "name": trunk.name,
            "config": trunk.config,
            "fingerprint": trunk.fingerprint,
            "depth": depth,
        },
        "tasks": tasks,
        "files": files,
        "cost": layer_cost(trunk.num_layers, tasks),
    }


def subset_manifest(manifest: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Return the manifest of a bundle holding only ``tasks`` of ``manifest``, its trunk cut
    at their deepest fork (what ``mtreg export --tasks`` writes)."""
    chosen = {name: manifest["tasks"][name] for name in sorted(tasks)}
    depth = max((t["fork_depth"] for t in chosen.values()), default=0)
    keep = {"trunk/embeddings.safetensors", *(layer_path(i) for i in range(depth))}
    keep |= {t["file"] for t in chosen.values()}
    files = {
        rel: sha
        for rel, sha in manifest["files"].items()
        if rel in keep or rel.startswith("tokenizer/")
    }
    trunk_layers = len(manifest["trunk"]["fingerprint"]["layers"])
    return {
        **manifest,
        "trunk": {**manifest["trunk"], "depth": depth},
        "tasks": chosen,
        "files": files,
        "cost": layer_cost(trunk_layers, chosen),
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a bundle's ``manifest.json`` and check that it is safe to act on.

    Everything that loading, exporting and describing a bundle reads is checked here, so
    that a damaged or hostile manifest ends in one clean error, never in a crash later.

    Returns:
        The manifest.

    Raises:
        NotFound: no manifest at ``path``. MtregError: not valid JSON, another format, a
            bad task name, or a file path that would leave the bundle directory.
    """
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"no bundle manifest at {path}: point at a bundle directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser's stack allows.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MtregError(f"{path} is not valid JSON ({reason}): rebuild or re-export it") from None
    except (OSError, ValueError) as exc:
        raise MtregError(f"cannot read {path} ({exc}): rebuild or re-export it") from None
    if not isinstance(manifest, dict) or (
        manifest.get("format"),
        manifest.get("format_version"),
    ) != (
        FORMAT,
        FORMAT_VERSION,
    ):
        raise MtregError(
            f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest: rebuild or re-export it"
        )
    try:
        _check_manifest(manifest)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise MtregError(f"{path} is malformed (missing or bad {exc}): rebuild it") from None
    return manifest


def _check_manifest(manifest: dict[str, Any]) -> None:
    """Check a manifest's structure; raise KeyError/TypeError/ValueError/MtregError."""
    files, tasks, trunk = manifest["files"], manifest["tasks"], manifest["trunk"]
    _require(isinstance(files, dict) and isinstance(tasks, dict), "files, tasks")
    for relative, sha in files.items():
        safe_relative(relative)
        _require(_is_sha256(sha), f"sha256 of {relative!r}")
    _require(isinstance(trunk, dict), "trunk")
    config, fingerprint, depth = trunk["config"], trunk["fingerprint"], trunk["depth"]
    _require(isinstance(trunk["name"], str) and isinstance(config, dict), "trunk")
    _require(isinstance(fingerprint, dict) and isinstance(fingerprint["layers"], list), "trunk")
    _require(_is_count(depth) and depth <= len(fingerprint["layers"]), "trunk depth")
    _require(isinstance(manifest["cost"], dict), "cost")
    for name, task in tasks.items():
        validate_name(name)
        _check_task(name, task, files, depth)


def _check_task(name: str, task: Any, files: dict[str, Any], depth: int) -> None:
    _require(isinstance(task, dict), f"task {name!r}")
    parse_version(task["version"])
    HeadSpec.from_dict(task["head"])
    _require(_is_count(task["fork_depth"]) and task["fork_depth"] <= depth, f"{name} fork_depth")
    _require(_is_count(task["num_layers"]), f"{name} num_layers")
    _require(_is_count(task["max_length"]) and task["max_length"] >= 2, f"{name} max_length")
    inputs = task["inputs"]
    _require(isinstance(inputs, list) and len(inputs) in (1, 2), f"{name} inputs")
    _require(all(isinstance(field, str) for field in inputs), f"{name} inputs")
    _require(isinstance(task["metrics"], dict), f"{name} metrics")
    if not isinstance(task["file"], str) or task["file"] not in files:
        raise MtregError(f"task {name!r} names file {task['file']!r}, not listed")


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


def layer_cost(trunk_layers: int, tasks: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Transformer layers evaluated per input: this bundle against one model per task."""
    depth = max((t["fork_depth"] for t in tasks.values()), default=0)
    return {
        "bundle_layers": depth + sum(t["num_layers"] for t in tasks.values()),
        "one_model_per_task_layers": trunk_layers * len(tasks),
    }


def model_card(manifest: dict[str, Any]) -> str:
    """Return the bundle's README.md: what it serves and what it costs."""
    trunk, tasks, cost = manifest["trunk"], manifest["tasks"], manifest["cost"]
    lines = [
        f"# mtreg bundle on trunk `{trunk['name']}`",
        "",
        f"Trunk: {trunk['config']['model_type']}, {trunk['depth']} shared layers kept "
        f"(of {len(trunk['fingerprint']['layers'])}), hidden size "
        f"{trunk['config']['hidden_size']}.",
        "",
        "| task | version | head | fork depth | branch layers | metrics |",
        "|---|---|---|---|---|---|",
    ]
    for name, task in tasks.items():
        metrics = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sorted(task["metrics"].items())
        )
        lines.append(
            f"| {name} | {task['version']} | {task['head']['kind']} "
            f"({len(task['head']['labels'])} labels) | {task['fork_depth']} "
            f"| {task['num_layers']} | {metrics or '-'} |"
        )
    bundle, separate = cost["bundle_layers"], cost["one_model_per_task_layers"]
    share = f" ({bundle / separate:.0%})" if separate else ""
    lines += [
        "",
        f"Layer cost per input: {bundle} transformer layers for all {len(tasks)} tasks, "
        f"against {separate} for one full model per task{share}.",
        "",
    ]
    return "\n".join(lines)


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


def write_bundle(root: Path, manifest: dict[str, Any], objects: ObjectStore) -> Path:
    """Materialise ``manifest`` as ``root/<id>`` atomically and return that directory.

    Files are linked from the object store into a temporary directory, flushed, and the
    directory renamed into place; an existing bundle with the same id is reused as is.
    A crash leaves at most a ``.tmp-*`` directory, removed by :func:`clean_leftovers`.
    """
    target = root / bundle_id(manifest)
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        for rel, sha in manifest["files"].items():
            dest = scratch / safe_relative(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            objects.link_or_copy(sha, dest)
        (scratch / "README.md").write_text(model_card(manifest), encoding="utf-8")
        _write_synced(scratch / MANIFEST, canonical_json(manifest))
        for directory in {scratch, *(p.parent for p in scratch.rglob("*"))}:
            fsync_dir(directory)
        faults.checkpoint("bundle.scratch")
        try:
            os.replace(scratch, target)
        except OSError:
            # Another writer produced the same bundle first: identical by construction.
            if not (target / MANIFEST).is_file():
                raise
            shutil.rmtree(scratch, ignore_errors=True)
        fsync_dir(root)
        faults.checkpoint("bundle.renamed")
        return target
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def clean_leftovers(root: Path, known: set[str]) -> list[str]:
    """Remove half-written bundles and bundle directories the database does not know.

    Call only while holding the registry's write lock: another writer's directory is
    unknown to the database until its transaction commits.

    Returns:
        The names of the directories removed.
    """
    removed = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and (entry.name.startswith(".tmp-") or entry.name not in known):
            remove_bundle_dir(entry)
            removed.append(entry.name)
    return removed


def remove_bundle_dir(path: Path) -> None:
    """Delete a bundle directory so that a crash half-way never leaves a damaged bundle
    under its own name: it is first renamed to a ``.tmp-*`` leftover, then deleted."""
    if not path.exists():
        return
    if path.name.startswith(".tmp-"):
        shutil.rmtree(path, ignore_errors=True)
        return
    doomed = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-gc-"))
    try:
        os.replace(path, doomed / path.name)
    except OSError:
        shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        return
    shutil.rmtree(doomed, ignore_errors=True)
