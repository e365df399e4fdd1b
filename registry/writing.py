"""Write transactions: the registry lock, the bundle rebuild before the commit, and the undo
of the files a failed transaction created."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtreg.artifacts.bundle_dir import clean_leftovers, write_bundle
from mtreg.artifacts.manifest import MANIFEST, Manifest
from mtreg.artifacts.release import live_releases
from mtreg.core import faults
from mtreg.core.disk import disk_errors
from mtreg.registry.records import BundleRecord

if TYPE_CHECKING:
    from mtreg.artifacts.home import Home
    from mtreg.artifacts.objects import ObjectStore
    from mtreg.registry.store import Store, Tx


@dataclass
class Write:
    """State of one write transaction: what it created, which trunks need a new bundle."""

    tx: Tx
    objects: ObjectStore
    home: Home
    new_objects: list[str] = field(default_factory=list)
    directories: list[Path] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    rebuild: set[str] = field(default_factory=set)
    promote: bool = False
    bundles: dict[str, BundleRecord] = field(default_factory=dict)

    def put_object(self, source: Path) -> str:
        """Store ``source`` in the object store; return its sha256.

        An object stored anew is deleted again if the transaction fails.
        """
        sha, is_new = self.objects.put(source)
        if is_new:
            self.new_objects.append(sha)
        return sha

    def undo(self) -> None:
        """Delete the published manifests, objects and bundle directories this transaction
        created (manifests first: a bundle must never be published without its objects)."""
        for ident in self.published:
            self.objects.withdraw(ident)
        for sha in self.new_objects:
            self.objects.discard(sha)
        for directory in self.directories:
            shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def writing(store: Store, objects: ObjectStore, home: Home) -> Iterator[Write]:
    """One write transaction holding the registry lock.

    Bundles of the trunks marked in ``write.rebuild`` are rebuilt before the commit.
    Objects and bundle directories created during a transaction that fails are deleted
    again, so a refused operation leaves ``MTREG_HOME`` as it found it; a crashed one
    leaves only leftovers that the next write (directories) or ``gc`` (objects) removes.

    Raises:
        DatabaseError: the database cannot be reached or the lock not taken in time.
        StorageError: the home's disk is full or read-only (after the undo).
    """
    with disk_errors(home.root), store.transaction(write=True) as tx:
        write = Write(tx, objects, home)
        objects.clean_incoming()
        clean_leftovers(home.bundles, {b.id for b in tx.list_bundles()})
        try:
            yield write
            for trunk in sorted(write.rebuild):
                ident = rebuild_bundle(write, trunk)
                if write.promote:
                    tx.set_alias("serving", ident)
                    tx.add_event("alias.set", "serving", {"bundle": ident})
                write.bundles[trunk] = tx.get_bundle(ident)
            faults.point("write.before_commit")
        except BaseException:
            # Undo while the write lock is still held: once it is released, another
            # writer may link the same object or reuse the same (content-addressed)
            # bundle directory, and deleting them afterwards would break what it commits.
            write.undo()
            raise
    faults.point("write.after_commit")


def rebuild_bundle(write: Write, trunk_name: str) -> str:
    """Build the bundle of the active versions on a trunk and of the releases under way
    that fit them, point ``latest`` at it.

    Returns:
        The bundle id.
    """
    tx = write.tx
    members = tx.active_versions(trunk_name)
    trunk = tx.get_trunk(trunk_name)
    stable = {m.task: m.manifest_entry() for m in members}
    releases = [r.manifest_release() for r in tx.list_releases(trunk_name)]
    manifest = Manifest.build(
        trunk.name,
        trunk.config,
        trunk.fingerprint,
        trunk.objects,
        list(stable.values()),
        live_releases(stable, releases),
    )
    ident = manifest.bundle_id
    fresh = not write.home.bundle(ident).exists()
    path = write_bundle(write.home.bundles, manifest, write.objects)
    if fresh:
        write.directories.append(path)
    # Last, after every object it names is in the store: publishing makes the bundle exist
    # for the other machines sharing the store (a no-op for a local store).
    if write.objects.publish(ident, path / MANIFEST):
        write.published.append(ident)
    existing = tx.get_bundle(ident)
    if existing is None:
        tx.add_bundle(
            BundleRecord(ident, trunk_name, manifest, {m.task: m.version for m in members})
        )
        tx.add_event("bundle.build", ident, {"trunk": trunk_name, "tasks": len(members)})
    tx.set_alias("latest", ident)
    return ident
