"""Garbage collection: bundles no alias points at, and objects nothing refers to.

Rows go in one write transaction; files only after its commit, in a second one (see
:func:`delete_files`), so that a failed transaction loses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mtreg.artifacts.bundle_dir import clean_leftovers, remove_bundle_dir
from mtreg.core import faults

if TYPE_CHECKING:
    from mtreg.artifacts.home import Home
    from mtreg.artifacts.objects import ObjectStore
    from mtreg.registry.store import Store, Tx


def find_garbage(tx: Tx, objects: ObjectStore) -> tuple[list[str], list[str]]:
    """Return the ids of the bundles no alias points at, and the objects that nothing but
    those bundles refers to."""
    doomed = [b.id for b in tx.list_bundles() if not b.aliases]
    return doomed, find_orphans(tx, objects, set(doomed))


def forget_garbage(tx: Tx, doomed: list[str], orphans: list[str]) -> None:
    """Delete the rows of the ``doomed`` bundles and log the collection (if it found any)."""
    for ident in doomed:
        tx.delete_bundle(ident)
    if doomed or orphans:
        tx.add_event("gc", "", {"bundles": doomed, "objects": len(orphans)})


def find_orphans(tx: Tx, objects: ObjectStore, doomed: set[str]) -> list[str]:
    """Return the stored objects that nothing but the ``doomed`` bundles refers to."""
    keep = set()
    for trunk in tx.list_trunks():
        components = trunk.objects
        keep.update(
            [components["embeddings"], *components["layers"], *components["tokenizer"].values()]
        )
        if components.get("pooler"):
            keep.add(components["pooler"])
    for task in tx.list_tasks(include_removed=True):
        keep.update(v.weights_sha256 for v in tx.list_versions(task.name))
    for bundle in tx.list_bundles():
        if bundle.id not in doomed:
            keep.update(bundle.manifest.files.values())
    return [sha for sha in objects.list() if sha not in keep]


def delete_files(
    store: Store, objects: ObjectStore, home: Home, doomed: Sequence[str]
) -> list[str]:
    """Delete the directories of gc'd bundles and the unreferenced objects.

    Files go only after the rows' commit (a failed transaction must lose nothing), and
    under the write lock again, checked against the database as it is then: between
    the two transactions another writer may have rebuilt a bundle with one of the doomed
    ids (bundles are content-addressed) or stored one of the orphaned objects again.
    A crash here leaves only garbage that the next write or gc removes.

    With a remote store, the published manifests of bundles the database does not know
    are withdrawn first, and objects are deleted from the store and this machine's cache
    (other machines' caches keep verified copies until their home is cleaned).

    Returns:
        The objects deleted.
    """
    with store.transaction(write=True) as tx:
        known = {b.id for b in tx.list_bundles()}
        # Publications go before objects: a bundle is never published without its objects.
        # Unknown ones were published by a writer that died before its commit.
        for ident in objects.published_ids():
            if ident not in known:
                objects.withdraw(ident)
        for ident in doomed:
            if ident not in known:
                remove_bundle_dir(home.bundle(ident))
                faults.point("gc.deleting")
        clean_leftovers(home.bundles, known)
        orphans = find_orphans(tx, objects, set())
        for sha in orphans:
            objects.discard(sha)
            faults.point("gc.deleting")
    return orphans
