"""A registry bundle's directory on this machine: with a remote store, a bundle built on
another machine is materialised here from its published manifest and verified objects."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mtreg.artifacts.bundle_dir import write_bundle
from mtreg.artifacts.manifest import MANIFEST
from mtreg.core.disk import disk_errors
from mtreg.errors import Damaged, NotFound

if TYPE_CHECKING:
    from mtreg.artifacts.home import Home
    from mtreg.artifacts.objects import ObjectStore
    from mtreg.registry.records import BundleRecord
    from mtreg.registry.store import Store


def local_bundle(store: Store, home: Home, objects: ObjectStore, record: BundleRecord) -> Path:
    """Return the directory of bundle ``record`` under ``home``, writing it first from the
    remote store when this machine has none: a warm start reads no remote byte.

    Only a published bundle (its manifest is in the store, written after its objects) is
    materialised, and every object it links enters the cache verified. Objects are fetched
    first; the directory is then linked under the registry's write lock, because a writer
    on this home removes the bundle folders it does not know while holding it.

    Raises:
        NotFound: the bundle is not published in the store, or one of its objects is gone.
        Damaged: the published manifest, or an object, does not hash to its name.
        StorageError: the store cannot be used, or this machine's disk is full.
    """
    path = home.bundle(record.id)
    if objects.remote is None or (path / MANIFEST).is_file():
        return path
    published = _published_manifest(objects, record.id)
    if hashlib.sha256(published).hexdigest() != record.id:
        raise Damaged(
            f"the manifest of bundle {record.id[:12]} in the store {objects.location} is "
            "damaged (it does not hash to the bundle id): restore it from a machine that "
            "holds the bundle, or rebuild it (`mtreg verify --repair`)"
        )
    if record.manifest.bundle_id != record.id:
        raise Damaged(
            f"the registry's row of bundle {record.id[:12]} does not match its id: restore "
            "the database from a backup"
        )
    for sha in record.manifest.files.values():
        objects.existing(sha)
    with disk_errors(home.bundles), store.transaction(write=True):
        return write_bundle(home.bundles, record.manifest, objects)


def _published_manifest(objects: ObjectStore, bundle_id: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="mtreg-manifest-") as scratch:
        target = Path(scratch) / MANIFEST
        try:
            objects.fetch_manifest(bundle_id, target)
        except NotFound:
            raise NotFound(
                f"bundle {bundle_id[:12]} is not published in the store {objects.location} "
                "(its publisher stopped before publishing it, or it was deleted there): "
                "rebuild it where its tasks are registered (`mtreg sync`)"
            ) from None
        return target.read_bytes()
