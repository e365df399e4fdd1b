"""The content-addressed object store: files named by the sha256 of their bytes.

Registered weights, trunk components and tokenizer files are copied here, so moving,
editing or uninstalling their source never breaks a registered version. Locally, objects
live under ``MTREG_HOME/objects`` (or the folder ``--store`` names): written once
(temporary file, fsync, rename) and made read-only.

With a remote store (``--store s3://...``, :mod:`mtreg.artifacts.remote`) the remote is
the store of record and ``MTREG_HOME/objects`` is this machine's read-through cache: an
object enters it only after its bytes hashed to its name, so whatever reads an object's
path (bundle directories, training) reads a verified byte. The store also holds the
published manifest of every bundle (:meth:`ObjectStore.publish`), written after the
bundle's objects: a bundle without one does not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from mtreg.artifacts.remote import RemoteStore, is_remote, local_path
from mtreg.core import faults
from mtreg.core.disk import disk_errors
from mtreg.errors import Damaged, MtregError, NotFound

_CHUNK = 1 << 20
# Where objects and published manifests live in a remote store.
_OBJECTS, _MANIFESTS = "objects", "manifests"
_INCOMING, _FETCHING = ".incoming-", ".fetching-"
# A download is under way for seconds to minutes; one this old was killed.
_FETCH_STALE_S = 24 * 3600.0


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes (hashlib reads it in chunks).

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_object_id(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _checked(ident: str) -> str:
    """Return ``ident`` if it is an object or bundle id, so that it can name a file."""
    if not _is_object_id(ident):
        raise MtregError(f"invalid object id {ident!r}")
    return ident


class ObjectStore:
    """Files named by the sha256 of their bytes: a local folder, or a remote store with
    ``root`` as this machine's verified cache of it.

    Args:
        root: the local folder (the cache, when ``remote`` is given).
        remote: the store of record, or None for a local store.

    Raises (from every method reaching ``remote``): StorageError: the store cannot be
    reached, refuses the credentials, or its bucket does not exist.
    """

    def __init__(self, root: Path, remote: RemoteStore | None = None) -> None:
        self.root = Path(root)
        self.remote = remote

    @property
    def location(self) -> str:
        """Where the objects are kept, for messages: the remote URL or the local folder."""
        return self.remote.url if self.remote is not None else str(self.root)

    def path(self, sha256: str) -> Path:
        """Return where the object ``sha256`` lives (it may not exist).

        Raises:
            MtregError: if ``sha256`` is not 64 lower-case hex digits (no path tricks).
        """
        return self.root / _checked(sha256)

    def has(self, sha256: str) -> bool:
        """Return True if the object is present (here, or in the remote store)."""
        if self.path(sha256).is_file():
            return True
        return self.remote is not None and self.remote.has(_OBJECTS, sha256)

    def existing(self, sha256: str) -> Path:
        """Return the local path of object ``sha256``, fetching and verifying it from the
        remote store first when this machine has no copy.

        Raises:
            NotFound: the object is not in the store (files under MTREG_HOME were deleted,
                the database belongs to another home, or it was deleted from the bucket).
            Damaged: the remote copy's bytes do not hash to its name.
            StorageError: the cache's disk is full or read-only.
        """
        path = self.path(sha256)
        if path.is_file():
            return path
        if self.remote is None:
            raise NotFound(
                f"object {sha256[:12]} is missing from the store {self.root}: check that "
                "--home (MTREG_HOME) is the home of this database, or add the trunk or task "
                "version that owns it again"
            )
        return self._fetch(self.remote, sha256)

    def _fetch(self, remote: RemoteStore, sha256: str) -> Path:
        """Download object ``sha256`` into the cache, admitted only if its bytes verify."""
        target = self.path(sha256)
        with disk_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=_FETCHING)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                remote.download(_OBJECTS, sha256, tmp)
                actual = sha256_file(tmp)
                if actual != sha256:
                    raise Damaged(
                        f"object {sha256[:12]} in the store {remote.url} is damaged (its "
                        f"bytes hash to {actual[:12]}): put a good copy back under that key "
                        "(from a machine's MTREG_HOME/objects, or the file it was added from)"
                    )
                _seal(tmp, target, self.root)
            finally:
                tmp.unlink(missing_ok=True)
        return target

    def remote_problem(self, ident: str, published: bool = False) -> str | None:
        """Return what is wrong with the remote store's copy of object ``ident`` (with
        ``published``: bundle ``ident``'s published manifest): missing, or its bytes hash to
        another name; None when it is intact or there is no remote store. The bytes are
        streamed through the hash: a download, nothing cached."""
        if self.remote is None:
            return None
        actual = self.remote.digest(_MANIFESTS if published else _OBJECTS, _checked(ident))
        if actual is None:
            return f"is missing from the store {self.remote.url}"
        if actual != ident:
            return f"is damaged in the store {self.remote.url}: its bytes hash to {actual[:12]}"
        return None

    def replace_remote(self, ident: str, source: Path, published: bool = False) -> None:
        """Put file ``source`` in the remote store as object ``ident`` (with ``published``:
        bundle ``ident``'s manifest), in place of a copy :meth:`remote_problem` found
        missing or damaged there.

        Raises:
            Damaged: ``source`` does not hash to ``ident`` (nothing is changed).
            MtregError: there is no remote store.
        """
        if self.remote is None:
            raise MtregError("there is no remote store to restore an object in")
        if not source.is_file() or sha256_file(source) != _checked(ident):
            raise Damaged(f"the copy of {ident[:12]} at {source} is not intact")
        # Writes are create-only, so a bad copy must be deleted first. That cannot lose a
        # good one: this runs only after the remote bytes were hashed and found wrong
        # (under the registry's write lock), and ``source`` was just hashed to the same
        # name. A writer that puts it back in between wins the put, with the same bytes.
        kind = _MANIFESTS if published else _OBJECTS
        self.remote.delete(kind, ident)
        self.remote.upload(kind, ident, source)

    def put(self, source: Path) -> tuple[str, bool]:
        """Copy ``source`` into the store (and into the remote one, create-only).

        Returns:
            ``(sha256, created)``: ``created`` is False when the object was already there,
            so a caller that must undo its writes knows which objects are its own.
        """
        sha, created = self._put_local(source)
        if self.remote is None:
            return sha, created
        try:
            return sha, self.remote.upload(_OBJECTS, sha, self.path(sha))
        except BaseException:
            if created:
                self.path(sha).unlink(missing_ok=True)
            raise

    def _put_local(self, source: Path) -> tuple[str, bool]:
        self.root.mkdir(parents=True, exist_ok=True)
        # Hash while copying, so a file edited during the copy cannot be stored under a
        # name that does not match its content.
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=_INCOMING)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            faults.point("objects.incoming")
            sha = digest.hexdigest()
            target = self.path(sha)
            if target.exists():
                tmp.unlink()
                return sha, False
            _seal(tmp, target, self.root)
            faults.point("objects.stored")
            return sha, True
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def list(self) -> list[str]:
        """Return the ids of the stored objects (the remote store's, if there is one),
        sorted; temporary files excluded."""
        if self.remote is not None:
            return [n for n in self.remote.names(_OBJECTS) if _is_object_id(n)]
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _is_object_id(p.name))

    def discard(self, sha256: str) -> None:
        """Delete an object, from the remote store too (used to undo a failed
        registration and by gc)."""
        if self.remote is not None:
            self.remote.delete(_OBJECTS, _checked(sha256))
        self.path(sha256).unlink(missing_ok=True)

    def link_or_copy(self, sha256: str, target: Path) -> None:
        """Place object ``sha256`` at ``target``: a hard link where possible, else a copy.

        Raises:
            MtregError: the object is not in the store, or its remote copy is damaged.
        """
        source = self.existing(sha256)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)

    def clean_incoming(self) -> None:
        """Remove temporary files left by a writer that was killed mid-copy, and by a
        download killed mid-way once it is old enough not to be one under way."""
        if not self.root.is_dir():
            return
        for leftover in self.root.glob(_INCOMING + "*"):
            leftover.unlink(missing_ok=True)
        stale = time.time() - _FETCH_STALE_S
        for leftover in self.root.glob(_FETCHING + "*"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()

    # -- published bundle manifests ----------------------------------------------------

    def publish(self, bundle_id: str, manifest: Path) -> bool:
        """Publish bundle ``bundle_id`` by writing its ``manifest`` file to the remote store
        (create-only), after its objects: from then on the bundle exists there. A local
        store publishes nothing (its bundle directories are the bundles).

        Returns:
            True if this call published it (and an undo should withdraw it).
        """
        if self.remote is None:
            return False
        return self.remote.upload(_MANIFESTS, _checked(bundle_id), manifest)

    def fetch_manifest(self, bundle_id: str, target: Path) -> None:
        """Copy the published manifest of ``bundle_id`` to ``target`` (unverified: the
        caller checks that it hashes to ``bundle_id``).

        Raises:
            NotFound: the bundle was never published to (or was deleted from) the store.
        """
        if self.remote is None:
            raise NotFound(f"bundle {bundle_id[:12]} is not in the store {self.root}")
        self.remote.download(_MANIFESTS, _checked(bundle_id), target)

    def published_ids(self) -> list[str]:
        """Return the ids of the bundles published to the remote store ([] for a local one)."""
        if self.remote is None:
            return []
        return [n for n in self.remote.names(_MANIFESTS) if _is_object_id(n)]

    def withdraw(self, bundle_id: str) -> None:
        """Delete the published manifest of ``bundle_id`` (gc, or undoing a publication)."""
        if self.remote is not None:
            self.remote.delete(_MANIFESTS, _checked(bundle_id))


def _seal(tmp: Path, target: Path, folder: Path) -> None:
    """Make ``tmp`` read-only and rename it to ``target`` durably."""
    os.chmod(tmp, 0o444)
    os.replace(tmp, target)
    fsync_dir(folder)


def open_store(url: str | None, home_objects: Path) -> ObjectStore:
    """Return the object store ``url`` names: None for ``home_objects``, a local path (or
    ``file://PATH``), or a remote URL cached in ``home_objects``.

    Raises:
        MtregError: an unsupported URL scheme, or one without a bucket.
    """
    if url is None:
        return ObjectStore(home_objects)
    if not is_remote(url):
        return ObjectStore(local_path(url).resolve())
    return ObjectStore(home_objects, RemoteStore(url))
