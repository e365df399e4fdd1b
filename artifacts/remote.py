"""The remote side of the object store: objects and published bundle manifests under an
fsspec URL (``s3://bucket/prefix``, ``gs://``, ``az://``).

::

    <prefix>/objects/<sha256>          content-addressed objects, written create-only
    <prefix>/manifests/<bundle id>     a bundle's manifest.json, written after its objects

Every write is create-only (S3 ``If-None-Match: *`` through s3fs's ``mode="create"``;
other file systems check and write, which the registry's write lock serialises), so an
object or manifest, once there, is never replaced. A bundle whose manifest is not in the
store does not exist: its publisher died before the last write. Nothing here trusts what
it reads: the caller hashes every byte (:class:`mtreg.artifacts.objects.ObjectStore`).

fsspec and the file system's package (s3fs, gcsfs, adlfs: the ``s3``, ``gcs`` and
``azure`` extras) are imported on first use, so a command that never touches the store
does not load them. Credentials and endpoints come from each package's usual settings
(for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mtreg.core.env import STORE_ENV
from mtreg.core.extras import require
from mtreg.errors import MtregError, NotFound, StorageError

# The package each URL scheme needs: imported by name first, so that a missing one is the
# one-line `pip install 'mtreg[EXTRA]'` hint rather than fsspec's own message.
_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# botocore waits 60 s per connection attempt by default: an unreachable store would hang
# a command for minutes before it could say so.
_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 10, "retries": {"max_attempts": 3}}},
}
_CHUNK = 1 << 20
_LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# Exceptions from these packages are the store's answers (refused, unreachable, denied).
_CLIENT_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "google", "azure", "gcsfs", "adlfs"}


def is_remote(url: str) -> bool:
    """Return True if ``url`` names a remote store (``scheme://``), False for a local path
    (also written ``file://PATH``)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme != "file"


def local_path(url: str) -> Path:
    """Return the folder a local store URL (a path, or ``file://PATH``) names."""
    return Path(url.removeprefix("file://")).expanduser()


class RemoteStore:
    """Objects and bundle manifests under one fsspec URL, opened on first use.

    Raises (from every method): StorageError: the store cannot be reached, refuses the
    credentials, or its bucket does not exist; MtregError: an unsupported URL, or the
    package of its scheme is not installed.
    """

    def __init__(self, url: str) -> None:
        scheme, _, rest = url.partition("://")
        if scheme not in _SCHEMES:
            raise MtregError(
                f"unsupported store URL {url!r}: use a local path, s3://BUCKET/PREFIX, "
                f"gs://BUCKET/PREFIX or az://CONTAINER/PREFIX (--store, {STORE_ENV})"
            )
        if not rest.strip("/"):
            raise MtregError(f"store URL {url!r} names no bucket: write {scheme}://BUCKET/PREFIX")
        self.url = url.rstrip("/")
        self.scheme = scheme
        # What these file systems call a path: the bucket (or container) and the prefix.
        self._root = rest.strip("/")
        self._fs: Any = None

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    @property
    def fs(self) -> Any:
        """The fsspec file system (imported and opened on first use)."""
        if self._fs is None:
            require(_SCHEMES[self.scheme])
            # fsspec loads only for a remote store: local registries never import it.
            fsspec = require("fsspec")
            options = {
                **_OPTIONS.get(self.scheme, {}),
                # Listings are read to decide what exists: a cached one goes stale as soon
                # as another machine writes.
                "use_listings_cache": False,
                "skip_instance_cache": True,
            }
            self._fs = fsspec.filesystem(self.scheme, **options)
        return self._fs

    def _key(self, kind: str, name: str) -> str:
        return f"{self._root}/{kind}/{name}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn the store's refusals into one-line :class:`StorageError` s."""
        try:
            yield
        except (FileExistsError, MtregError):
            raise
        except FileNotFoundError as exc:
            if not _no_bucket(exc):
                raise
            raise StorageError(
                f"the bucket of store {self.url} does not exist: create it, or fix --store "
                f"({STORE_ENV})"
            ) from None
        except Exception as exc:
            # A full or read-only local disk under a download is this machine's fault, not
            # the store's: core.disk names it.
            local = isinstance(exc, OSError) and exc.errno in _LOCAL_ERRNOS
            if local or (not isinstance(exc, OSError) and _package(exc) not in _CLIENT_PACKAGES):
                raise
            raise StorageError(_failure(self.url, exc)) from None

    def has(self, kind: str, name: str) -> bool:
        """Return True if ``kind/name`` (``objects/<sha>``, ``manifests/<id>``) is there."""
        with self._errors():
            return bool(self.fs.exists(self._key(kind, name)))

    def upload(self, kind: str, name: str, source: Path) -> bool:
        """Write file ``source`` as ``kind/name``, create-only.

        Returns:
            True if this call created it, False if it was there already (written by another
            machine, or by an earlier run of a command that died before its commit).
        """
        with self._errors():
            try:
                self.fs.put_file(str(source), self._key(kind, name), mode="create")
            except FileExistsError:
                return False
        return True

    def download(self, kind: str, name: str, target: Path) -> None:
        """Copy ``kind/name`` to the local file ``target`` (unverified: the caller hashes it).

        Raises:
            NotFound: it is not in the store.
        """
        with self._errors():
            try:
                self.fs.get_file(self._key(kind, name), str(target))
            except FileNotFoundError as exc:
                if _no_bucket(exc):
                    raise
                raise NotFound(
                    f"{kind[:-1]} {name[:12]} is missing from the store {self.url}: it was "
                    f"deleted there; put a good copy back as {kind}/{name} (from a machine's "
                    "MTREG_HOME/objects, or the file it was added from)"
                ) from None

    def digest(self, kind: str, name: str) -> str | None:
        """Return the sha256 of ``kind/name``'s bytes, streamed (nothing is written on this
        machine), or None when it is not in the store."""
        digest = hashlib.sha256()
        with self._errors():
            try:
                with self.fs.open(self._key(kind, name), "rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
            except FileNotFoundError as exc:
                if _no_bucket(exc):
                    raise
                return None
        return digest.hexdigest()

    def names(self, kind: str) -> list[str]:
        """Return the names under ``kind/``, sorted ([] when there are none)."""
        with self._errors():
            try:
                entries = self.fs.ls(f"{self._root}/{kind}", detail=False)
            except FileNotFoundError as exc:
                if _no_bucket(exc):
                    raise
                return []
        return sorted(str(entry).rstrip("/").rpartition("/")[2] for entry in entries)

    def delete(self, kind: str, name: str) -> None:
        """Delete ``kind/name`` if it is there."""
        with self._errors(), suppress(FileNotFoundError):
            self.fs.rm_file(self._key(kind, name))


def _no_bucket(exc: FileNotFoundError) -> bool:
    """Return True if ``exc`` says the bucket (not a key in it) does not exist."""
    return "bucket" in str(exc).lower()


def _package(exc: BaseException) -> str:
    return type(exc).__module__.partition(".")[0]


def _failure(url: str, exc: BaseException) -> str:
    """Return the one-line message for a store that refused or could not be reached."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    lowered = f"{type(exc).__name__} {text}".lower()
    if isinstance(exc, PermissionError) or any(
        word in lowered for word in ("credential", "accessdenied", "access denied", "signature")
    ):
        return (
            f"store {url} refused the credentials ({text}): check them (for S3: "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy"
        )
    return (
        f"store {url} cannot be reached ({text}): check the network and the endpoint (for "
        "S3-compatible stores: AWS_ENDPOINT_URL), then retry"
    )
