"""Bundle directories on disk: the atomic, incremental writer and the cleaner.

Every weight file of a registry bundle is a hard link to (or a copy of) an object in the
object store, so a rebuild writes only the manifest and model card; unchanged tasks' files
are the same inodes as before. The layout itself is :mod:`mtreg.artifacts.manifest`'s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mtreg.artifacts.manifest import MANIFEST, MODEL_CARD, Manifest, safe_relative
from mtreg.artifacts.model_card import model_card
from mtreg.artifacts.objects import ObjectStore, fsync_dir
from mtreg.core import faults


def write_bundle_files(target: Path, manifest: Manifest, put: Callable[[str, Path], None]) -> None:
    """Fill directory ``target`` with the bundle ``manifest`` describes.

    ``put(relative, dest)`` writes each listed file to ``dest``; then the model card and
    ``manifest.json`` (flushed to disk) are written beside them.

    Raises:
        MtregError: the manifest names an unsafe path. OSError: from writing.
    """
    for relative in manifest.files:
        dest = target / safe_relative(relative)
        dest.parent.mkdir(parents=True, exist_ok=True)
        put(relative, dest)
    (target / MODEL_CARD).write_text(model_card(manifest), encoding="utf-8")
    with open(target / MANIFEST, "wb") as handle:
        handle.write(manifest.to_bytes())
        handle.flush()
        os.fsync(handle.fileno())


def write_bundle(root: Path, manifest: Manifest, objects: ObjectStore) -> Path:
    """Materialise ``manifest`` as ``root/<id>`` atomically and return that directory.

    Files are linked from the object store into a temporary directory, flushed, and the
    directory renamed into place; an existing bundle with the same id is reused as is.
    A crash leaves at most a ``.tmp-*`` directory, removed by :func:`clean_leftovers`.

    Raises:
        OSError: from writing (the temporary directory is removed first).
    """
    target = root / manifest.bundle_id
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        write_bundle_files(
            scratch, manifest, lambda rel, dest: objects.link_or_copy(manifest.files[rel], dest)
        )
        for directory in {scratch, *(p.parent for p in scratch.rglob("*"))}:
            fsync_dir(directory)
        faults.point("bundle.scratch")
        try:
            os.replace(scratch, target)
        except OSError:
            # Another writer produced the same bundle first: identical by construction.
            if not (target / MANIFEST).is_file():
                raise
            shutil.rmtree(scratch, ignore_errors=True)
        fsync_dir(root)
        faults.point("bundle.renamed")
        return target
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def clean_leftovers(root: Path, known: set[str]) -> list[str]:
    """Remove half-written bundles and bundle directories the database does not know.

    Call only while holding the registry's write lock: another writer's directory is
    unknown to the database until its transaction commits.

    Returns:
        The names of the directories removed.
    """
    removed: list[str] = []
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
