"""The layout of a registry home (``MTREG_HOME``): every path under it is built here.

::

    registry.db                      the SQLite database, unless another URL is given
    objects/<sha256>                 content-addressed trunk components and branch files
                                     (with a remote store: this machine's verified cache)
    bundles/<bundle id>/             merged bundles, as files linked from objects/
    cache/tokenizers/<fingerprint>/  a trunk's tokenizer files under their real names
    cache/activations/               trunk hidden states training reuses
    cache/onnx/<bundle id>[-tasks]/  ONNX exports of registry bundles made for serving
    onboarding/<task>/<version>/     the saved runs of an onboarding, to resume it
    trained/<task>/<version>.safetensors   branch files onboarding writes by default
    exports/<bundle id[:12]>/        bundle folders the demo exports
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mtreg.core.env import HOME_ENV, database_url, resolve_home, store_url
from mtreg.errors import DatabaseError, MtregError

# The tokenizer fingerprint is a sha256; 32 hex digits name its cache folder unambiguously.
_TOKENIZER_DIGITS = 32
# A bundle's folder under bundles/ is named by its full id, a sha256.
_BUNDLE_ID_DIGITS = 64
# Demo exports are named by a bundle id prefix short enough to read and type.
_EXPORT_DIGITS = 12


@dataclass(frozen=True)
class Home:
    """A registry home: its root folder and the paths of everything stored under it."""

    root: Path

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> Home:
        """Return the home at ``home``, else ``$MTREG_HOME``, else the user data dir."""
        return cls(resolve_home(home))

    @property
    def database_file(self) -> Path:
        """The SQLite database file of this home."""
        return self.root / "registry.db"

    @property
    def sqlite_url(self) -> str:
        """The SQLAlchemy URL of :attr:`database_file`."""
        return f"sqlite:///{self.database_file}"

    def database_url(self, url: str | None = None) -> str:
        """Return ``url``, else ``$MTREG_DATABASE_URL``, else :attr:`sqlite_url`."""
        return url or database_url() or self.sqlite_url

    def store_url(self, url: str | None = None) -> str | None:
        """Return ``url``, else ``$MTREG_STORE_URL``, else None (the store is :attr:`objects`)."""
        return url or store_url()

    def require_database(self, url: str) -> None:
        """Check that a registry exists here, unless ``url`` is another database than this
        home's own SQLite file: a missing file is a mistyped home likelier than a new one.

        Raises:
            DatabaseError: ``url`` is this home's SQLite file and it does not exist.
        """
        if url == self.sqlite_url and not self.database_file.exists():
            raise DatabaseError(
                f"no registry at {self.root} (no {self.database_file.name}): "
                f"run `mtreg init` to create one, or check --home or {HOME_ENV}"
            )

    @property
    def objects(self) -> Path:
        """The object store's folder; with a remote store, this machine's cache of it."""
        return self.root / "objects"

    @property
    def bundles(self) -> Path:
        """The folder holding every bundle directory."""
        return self.root / "bundles"

    def bundle(self, bundle_id: str) -> Path:
        """Return the directory of bundle ``bundle_id``."""
        return self.bundles / bundle_id

    @property
    def cache(self) -> Path:
        """The folder of everything that can be rebuilt: tokenizers, activations, ONNX."""
        return self.root / "cache"

    def tokenizer(self, fingerprint: str) -> Path:
        """Return the folder of the tokenizer files whose fingerprint is ``fingerprint``."""
        return self.cache / "tokenizers" / fingerprint[:_TOKENIZER_DIGITS]

    @property
    def activations(self) -> Path:
        """The activation cache's folder."""
        return self.cache / "activations"

    @property
    def onnx_cache(self) -> Path:
        """The folder holding the ONNX exports made for serving (see :meth:`onnx`)."""
        return self.cache / "onnx"

    def onnx(self, bundle_id: str, tasks: Collection[str] | None = None) -> Path:
        """Return the folder of the ONNX export of bundle ``bundle_id`` (of only ``tasks``)."""
        suffix = "" if tasks is None else "-" + "-".join(sorted(tasks))
        return self.onnx_cache / f"{bundle_id}{suffix}"

    def onboarding(self, task: str, version: str | None = None) -> Path:
        """Return the folder of the saved runs of ``task``'s onboarding at ``version``; without
        a version, the folder holding every version's."""
        folder = self.root / "onboarding" / task
        return folder if version is None else folder / version

    def trained(self, task: str, version: str) -> Path:
        """Return where onboarding writes ``task``'s branch file when its plugin names none."""
        return self.root / "trained" / task / f"{version}.safetensors"

    @classmethod
    def holding(cls, bundle: Path) -> Home | None:
        """Return the home whose ``bundles/`` folder holds the bundle directory ``bundle``, or
        None for a bundle elsewhere. Only a folder named by a full bundle id (64 hex digits)
        counts, so a user's own ``bundles/`` folder is not taken for a home."""
        path = Path(bundle).resolve()
        named_by_id = len(path.name) == _BUNDLE_ID_DIGITS and all(
            c in "0123456789abcdef" for c in path.name
        )
        return cls(path.parent.parent) if named_by_id and path.parent.name == "bundles" else None

    def check_output(self, path: Path) -> Path:
        """Return ``path`` if a command may write a folder of its own there.

        Raises:
            MtregError: ``path`` is the home or lies inside it, where the registry's own
                files live (objects, bundles, caches; the demo's ``exports/`` excepted): a
                folder written there could shadow or be deleted with the registry's.
        """
        target, root = Path(path).resolve(), self.root.resolve()
        exports = (root / "exports").resolve()
        if target.is_relative_to(root) and not target.is_relative_to(exports):
            raise MtregError(
                f"{path} is inside the registry home {self.root}: write exports outside it"
            )
        return path

    def export(self, bundle_id: str) -> Path:
        """Return the folder the demo exports bundle ``bundle_id`` to."""
        return self.root / "exports" / bundle_id[:_EXPORT_DIGITS]
