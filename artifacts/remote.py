"""The remote side of the object store: objects and published bundle manifests under an
fsspec URL (``s3://bucket/prefix``, ``gs://``, ``az://``).

::

    <prefix>/objects/<sha256>          content-addressed objects, written create-only
    <prefix>/manifests/<bundle id>     a bundle's manifest.json, written after its objects

Every write is create-only, conditional on the server: fsspec's ``mode="create"``, which
s3fs sends as S3 ``If-None-Match: *``, gcsfs as GCS ``ifGenerationMatch=0`` and adlfs as
Azure Blob ``If-None-Match: *`` (``overwrite=False``). Whichever of two writers comes
second is refused by the store (``FileExistsError``): an object or manifest, once there,
is never replaced, and the loser takes the winner's copy, which has the same bytes since
names are content hashes. A bundle whose manifest is not in the store does not exist: its
publisher died before the last write. Nothing here trusts what it reads: the caller hashes
every byte (:class:`mtreg.artifacts.objects.ObjectStore`).

fsspec and the file system's package (s3fs, gcsfs, adlfs: the ``s3``, ``gcs`` and
``azure`` extras) are imported on first use, so a command that never touches the store
does not load them. Credentials and endpoints come from each package's usual settings
(:data:`_SCHEMES` names them; fsspec's ``FSSPEC_<SCHEME>_<OPTION>`` variables also apply).
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtreg.core.env import STORE_ENV
from mtreg.core.extras import require
from mtreg.core.net import url_unreachable
from mtreg.errors import MtregError, NotFound, StorageError


@dataclass(frozen=True)
class _Scheme:
    """What mtreg needs to know of one kind of store: the package that opens it (imported
    by name first, so that a missing one is the one-line ``pip install 'mtreg[EXTRA]'``
    hint rather than fsspec's own message), the settings its refusals point to, and the
    options it is opened with."""

    package: str
    credentials: str
    endpoint: str
    # ``module:Class`` when fsspec's registered class for the scheme is not the one to use.
    filesystem: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # The URL the opened file system sends its requests to, checked once before the first
    # (None: the library's own timeouts are short enough).
    endpoint_of: Callable[[Any], str | None] = lambda fs: None


_S3 = _Scheme(
    "s3fs",
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the bucket's policy",
    "AWS_ENDPOINT_URL for S3-compatible stores",
    # botocore waits 60 s per connection attempt by default: an unreachable store would
    # hang a command for minutes before it could say so.
    options={"config_kwargs": {"connect_timeout": 10, "retries": {"max_attempts": 3}}},
)
_GCS = _Scheme(
    "gcsfs",
    "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`, and the "
    "bucket's IAM roles",
    "STORAGE_EMULATOR_HOST for an emulator",
    # gcsfs exports a class that first asks the Storage Control API (gRPC) for the bucket's
    # layout, on every call while it cannot tell, and logs a warning each time. mtreg's
    # keys are flat objects, which the JSON API class writes and reads on every bucket kind.
    filesystem="gcsfs.core:GCSFileSystem",
    # gcsfs retries a refused connection six times with backoff, per request: minutes.
    endpoint_of=lambda fs: fs._location,
)
_AZURE = _Scheme(
    "adlfs",
    "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with "
    "AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, and the container's access",
    "the connection string's BlobEndpoint",
    # The Azure SDK retries a refused connection with backoff, per request.
    endpoint_of=lambda fs: fs.service_client.url,
)
_SCHEMES = {"s3": _S3, "gs": _GCS, "gcs": _GCS, "az": _AZURE, "abfs": _AZURE}
# These libraries log the errors they raise (gcsfs with a traceback); with no logging set
# up Python would print them to stderr beside mtreg's own one-line message.
_QUIET_LOGGERS = ("gcsfs", "azure", "adlfs")
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
            scheme = _SCHEMES[self.scheme]
            require(scheme.package)
            # fsspec loads only for a remote store: local registries never import it.
            fsspec = require("fsspec")
            if scheme.filesystem is None:
                cls = fsspec.get_filesystem_class(self.scheme)
            else:
                module, _, name = scheme.filesystem.partition(":")
                cls = getattr(require(module), name)
            for name in _QUIET_LOGGERS:
                logger = logging.getLogger(name)
                if not logger.handlers:
                    logger.addHandler(logging.NullHandler())
            opened = cls(
                **scheme.options,
                # Listings are read to decide what exists: a cached one goes stale as soon
                # as another machine writes.
                use_listings_cache=False,
                skip_instance_cache=True,
            )
            endpoint = scheme.endpoint_of(opened)
            if endpoint and (reason := url_unreachable(endpoint)):
                raise StorageError(_failure(self.url, scheme, ConnectionError(reason)))
            self._fs = opened
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
        except FileNotFoundError:
            if not self._no_bucket():
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
            raise StorageError(_failure(self.url, _SCHEMES[self.scheme], exc)) from None

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
            except FileNotFoundError:
                if self._no_bucket():
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
            except FileNotFoundError:
                if self._no_bucket():
                    raise
                return None
        return digest.hexdigest()

    def names(self, kind: str) -> list[str]:
        """Return the names under ``kind/``, sorted ([] when there are none)."""
        with self._errors():
            try:
                entries = self.fs.ls(f"{self._root}/{kind}", detail=False)
            except FileNotFoundError:
                if self._no_bucket():
                    raise
                return []
        return sorted(str(entry).rstrip("/").rpartition("/")[2] for entry in entries)

    def delete(self, kind: str, name: str) -> None:
        """Delete ``kind/name`` if it is there."""
        with self._errors(), suppress(FileNotFoundError):
            self.fs.rm_file(self._key(kind, name))

    def _no_bucket(self) -> bool:
        """Return True if the bucket (container) itself does not exist, asked after the
        store answered "not found": the libraries word a missing bucket and a missing key
        alike, or not at all. False when the store cannot tell, so that the first answer
        stands."""
        try:
            return not self.fs.exists(self._root.partition("/")[0])
        except Exception:
            return False


def _package(exc: BaseException) -> str:
    return type(exc).__module__.partition(".")[0]


def _failure(url: str, scheme: _Scheme, exc: BaseException) -> str:
    """Return the one-line message for a store that refused or could not be reached."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    lowered = f"{type(exc).__name__} {text}".lower()
    if isinstance(exc, PermissionError) or any(
        word in lowered
        # S3 and Azure name the signature or the credentials; GCS answers 403 "Forbidden".
        for word in ("credential", "accessdenied", "access denied", "signature", "forbidden")
    ):
        return f"store {url} refused the credentials ({text}): check {scheme.credentials}"
    return (
        f"store {url} cannot be reached ({text}): check the network and the endpoint "
        f"({scheme.endpoint}), then retry"
    )
