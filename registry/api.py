"""``mtreg.Registry``: every registry operation as a method. The CLI is a thin layer over it.

The operations live by topic beside it (:mod:`~mtreg.registry.writing` for write
transactions and the bundle rebuild, :mod:`~mtreg.registry.trunks`,
:mod:`~mtreg.registry.registration`, :mod:`~mtreg.registry.garbage`, and the inherited
:mod:`~mtreg.registry.releases`); none of them builds SQL (that is :mod:`~.store`), and
torch is imported only inside the operations that read weights, so listing stays fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mtreg.artifacts.home import Home
from mtreg.artifacts.objects import open_store
from mtreg.core import faults
from mtreg.core.disk import disk_errors
from mtreg.core.spec import find_version, validate_name
from mtreg.errors import MtregError, NotFound
from mtreg.registry.fetching import local_bundle
from mtreg.registry.garbage import delete_files, find_garbage, forget_garbage
from mtreg.registry.integrity import VerifyReport, verify_registry
from mtreg.registry.lookup import require_bundle, require_task, require_trunk
from mtreg.registry.outcomes import Changes, Refusal, Registration
from mtreg.registry.records import (
    BundleRecord,
    EventRecord,
    TaskRecord,
    TaskVersionRecord,
    TrunkRecord,
)
from mtreg.registry.registration import apply_candidate, check_candidate
from mtreg.registry.releases import Releasing
from mtreg.registry.trunks import refuse_taken_trunk, store_trunk
from mtreg.registry.versioning import Change
from mtreg.registry.writing import Write, writing

if TYPE_CHECKING:
    from mtreg.plugins.loader import Discovery, LoadedTask
    from mtreg.registry.store import Store


class Registry(Releasing):
    """A task registry: a database, an object store, and the plugins.

    Args:
        url: SQLAlchemy URL; default ``$MTREG_DATABASE_URL``, else SQLite in ``home``.
        home: registry home; default ``$MTREG_HOME``, else the platform's user data dir.
        store: where objects and published bundles are kept: a local folder, or
            ``s3://BUCKET/PREFIX`` (``gs://``, ``az://``) shared by every machine, cached
            under ``home``; default ``$MTREG_STORE_URL``, else ``home``'s ``objects/``.
        plugins_dirs: extra plugin files or directories, besides ``$MTREG_PLUGINS_PATH``
            and installed entry points.
        create: create a missing database on first use. When False (the CLI, where a
            mistyped ``--home`` or ``--db`` is likelier than a new registry), the home's own
            SQLite file, or the folder of another SQLite file, must exist: only
            :meth:`init` creates them.

    Attributes:
        home: the :class:`~mtreg.artifacts.home.Home`, which names every path under it.
    """

    def __init__(
        self,
        url: str | None = None,
        home: str | Path | None = None,
        plugins_dirs: Sequence[str | Path] = (),
        create: bool = True,
        store: str | None = None,
    ) -> None:
        self.home = Home.resolve(home)
        self.create = create
        self.url = self.home.database_url(url)
        self.objects = open_store(self.home.store_url(store), self.home.objects)
        self.plugins_dirs = tuple(plugins_dirs)
        self._store: Store | None = None
        self._discovery: Discovery | None = None

    # -- plumbing ---------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store, opened on first use (creating a new database by its migrations).

        Raises:
            DatabaseError: unreachable database, or a schema older or newer than the code;
                the home's SQLite file is missing and ``create`` is False.
        """
        return self._open(self.create)

    def _open(self, create: bool) -> Store:
        if self._store is None:
            if not create:
                self.home.require_database(self.url)
            # SQLAlchemy loads with the first database access (`mtreg plugins` makes none).
            from mtreg.registry.store import Store

            self._store = Store(self.url, create)
        return self._store

    def close(self) -> None:
        """Release database connections."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writing(self) -> AbstractContextManager[Write]:
        return writing(self.store, self.objects, self.home)

    # -- setup ------------------------------------------------------------------------

    def init(self) -> dict[str, str]:
        """Create the home directory and the database (by its migrations) if missing.

        Returns:
            ``{"home", "database", "revision"}`` describing the registry.
        """
        # Alembic loads only to create or upgrade a schema.
        from mtreg.registry import db

        with disk_errors(self.home.root):
            self.home.root.mkdir(parents=True, exist_ok=True)
        revision = db.current_revision(self._open(create=True).engine) or ""
        return {"home": str(self.home.root), "database": self.store.url, "revision": revision}

    # -- trunks -----------------------------------------------------------------------

    def add_trunk(self, name: str, path: str | Path) -> TrunkRecord:
        """Register a Hugging Face checkpoint folder of a served encoder family (or a Hub
        id, ``owner/name[@revision]``, resolved through huggingface_hub's cache) as trunk
        ``name``.

        Its embeddings, layers, pooler and tokenizer files are copied into the object
        store, so the source folder may move or change afterwards.

        Returns:
            The new trunk's record.

        Raises:
            InvalidName: bad name. AlreadyExists: the name is taken.
            InvalidCheckpoint: not a usable checkpoint folder (the message names why).
            MtregError: a Hub id that cannot be resolved (offline and not cached, ...).
        """
        validate_name(name, "trunk")
        with self.store.transaction() as tx:
            refuse_taken_trunk(tx, name)
        # Reading a checkpoint needs torch (and a Hub id huggingface_hub): only here,
        # never for `mtreg list`.
        from mtreg.artifacts.checkpoint import read_checkpoint
        from mtreg.artifacts.hub import resolve

        folder = resolve(path, "trunk")
        checkpoint = read_checkpoint(folder)
        with self._writing() as write:
            refuse_taken_trunk(write.tx, name)
            store_trunk(write, name, checkpoint, folder, path)
        return self.trunk(name)

    def trunks(self) -> list[TrunkRecord]:
        """Return every registered trunk, by name."""
        with self.store.transaction() as tx:
            return tx.list_trunks()

    def trunk(self, name: str) -> TrunkRecord:
        """Return trunk ``name``. Raises NotFound if it is not registered."""
        with self.store.transaction() as tx:
            return require_trunk(tx, name)

    # -- plugins ----------------------------------------------------------------------

    def discover(self, refresh: bool = False) -> Discovery:
        """Return the installed and path plugins and the tasks they offer (cached)."""
        if self._discovery is None or refresh:
            # Discovery imports every plugin: only when plugins are asked for.
            from mtreg.plugins.loader import discover

            self._discovery = discover(self.plugins_dirs)
        return self._discovery

    # -- registering, removing, rolling back -------------------------------------------

    def register(
        self,
        tasks: Iterable[str] = (),
        *,
        all: bool = False,
        dry_run: bool = False,
        promote: bool = False,
        weights: Mapping[str, str | Path] | None = None,
    ) -> Changes:
        """Register the plugins' current versions of ``tasks`` (or of every trained task).

        Everything is validated first (weights by the strict reader, trunk compatibility,
        the version rules); then it is all written in one transaction with the rebuilt
        bundle, or nothing is. ``weights`` maps a task to a branch file to use instead of
        the one its plugin names (``mtreg onboard`` registers what it just trained).

        Returns:
            The outcome per task, in the order given, and the bundles built.

        Raises:
            MtregError: the first refusal (its message names the task); nothing is written.
        """
        discovery = self.discover()
        if all:
            # Built-in and scaffolded plugins offer tasks before they are trained.
            offered = discovery.tasks.items()
            names = sorted(n for n, t in offered if self._weighed(t).spec.weights is not None)
        else:
            # A name with path characters is refused as such, not as "no plugin offers it".
            names = [validate_name(name) for name in dict.fromkeys(tasks)]
        if not names:
            raise MtregError(
                "no tasks to register: name them, or pass --all (`mtreg plugins` lists them)"
            )
        overrides = dict(weights or {})
        candidates = []
        for name in names:
            loaded = self._weighed(discovery.task(name), overrides.get(name))
            candidates.append(check_candidate(self.store, loaded))
        with self._writing() as write:
            write.promote = promote
            done = [apply_candidate(write, c, dry_run) for c in candidates]
            if dry_run:
                write.rebuild.clear()
        return self._finish(write, done)

    def sync(self, *, dry_run: bool = False, promote: bool = False) -> Changes:
        """Register every new or upgraded task the plugins offer, then rebuild once.

        Unlike :meth:`register`, a refused task (bad weights, wrong trunk, bad version,
        broken plugin) does not stop the others: it is reported in ``Changes.refused``.

        Returns:
            Added, upgraded, unchanged and refused tasks, and the bundles built.
        """
        discovery = self.discover()
        refused = [Refusal(name, message) for name, message in discovery.failures()]
        candidates, skipped = [], []
        for name in sorted(discovery.tasks):
            loaded = self._weighed(discovery.task(name))
            if loaded.spec.weights is None:
                skipped.append(Refusal(name, "no weights yet: train it with `mtreg onboard`"))
                continue
            try:
                candidates.append(check_candidate(self.store, loaded))
            except MtregError as exc:
                refused.append(Refusal(name, str(exc)))
        done: list[Registration] = []
        with self._writing() as write:
            write.promote = promote
            for candidate in candidates:
                try:
                    with write.tx.savepoint():
                        done.append(apply_candidate(write, candidate, dry_run))
                except MtregError as exc:
                    refused.append(Refusal(candidate.record.task, str(exc)))
            if dry_run:
                write.rebuild.clear()
        return Changes(done, refused, list(write.bundles.values()), skipped)

    def _weighed(self, loaded: LoadedTask, override: str | Path | None = None) -> LoadedTask:
        """Return ``loaded`` naming the branch file to register: ``override``, else its
        plugin's, else the one ``mtreg train`` / ``distill`` / ``onboard`` wrote under the
        home's ``trained/`` (where they write when the plugin names none), else none."""
        spec = loaded.spec
        path = Path(override) if override is not None else spec.weights
        if path is None:
            trained = self.home.trained(spec.name, spec.version)
            path = trained if trained.is_file() else None
        if path == spec.weights:
            return loaded
        return replace(loaded, spec=replace(spec, weights=path))

    @staticmethod
    def _finish(write: Write, done: list[Registration]) -> Changes:
        return Changes(done, [], list(write.bundles.values()))

    def remove(self, task: str, *, dry_run: bool = False) -> Changes:
        """Deactivate ``task`` and rebuild; its versions stay and can be rolled back to.

        Returns:
            The removal (``change`` "removed", ``previous`` the version it had) and the
            bundle built.

        Raises:
            NotFound: unknown task. MtregError: the task is already removed.
        """
        with self._writing() as write:
            record = require_task(write.tx, task)
            if record.active_version is None:
                raise MtregError(
                    f"task {task!r} is already removed: `mtreg rollback {task} --to VERSION` "
                    "re-activates it"
                )
            if not dry_run:
                write.tx.set_active(task, None)
                write.tx.add_event("task.remove", task, {"version": record.active_version})
                write.rebuild.add(record.trunk)
        done = [Registration(task, record.active_version, "removed", record.active_version, "")]
        return self._finish(write, done)

    def rollback(self, task: str, to: str, *, dry_run: bool = False) -> Changes:
        """Re-activate registered version ``to`` of ``task`` and rebuild.

        ``to`` may be any normalised form of the version (``1.0`` finds ``1.0.0``).

        Raises:
            NotFound: unknown task or version (the message lists the registered ones).
        """
        with self._writing() as write:
            record = require_task(write.tx, task)
            versions = [v.version for v in write.tx.list_versions(task)]
            asked, to = to, find_version(to, versions)
            if to is None:
                raise NotFound(
                    f"task {task!r} has no version {asked!r}: registered versions are "
                    f"{', '.join(versions)}"
                )
            change: Change = "unchanged" if record.active_version == to else "rolled back"
            if not dry_run and change != "unchanged":
                write.tx.set_active(task, to)
                write.tx.add_event(
                    "task.rollback", task, {"version": to, "previous": record.active_version}
                )
                write.rebuild.add(record.trunk)
        done = [Registration(task, to, change, record.active_version, "")]
        return self._finish(write, done)

    # -- reading tasks ----------------------------------------------------------------

    def tasks(self, include_removed: bool = False) -> list[TaskRecord]:
        """Return the registered tasks, by name (removed ones only when asked)."""
        with self.store.transaction() as tx:
            return tx.list_tasks(include_removed=include_removed)

    def task(self, name: str) -> TaskRecord:
        """Return task ``name``. Raises NotFound if it was never registered."""
        with self.store.transaction() as tx:
            return require_task(tx, name)

    def versions(self, name: str) -> list[TaskVersionRecord]:
        """Return every registered version of ``name``, oldest first. Raises NotFound."""
        with self.store.transaction() as tx:
            require_task(tx, name)
            return tx.list_versions(name)

    # -- bundles and aliases ------------------------------------------------------------

    def bundles(self) -> list[BundleRecord]:
        """Return every bundle, newest first, with the aliases pointing at it."""
        with self.store.transaction() as tx:
            return tx.list_bundles()

    def bundle(self, ref: str = "latest") -> BundleRecord:
        """Return the bundle named by an alias, a bundle id or a unique id prefix.

        Raises:
            NotFound: nothing by that name (the message lists the aliases).
        """
        with self.store.transaction() as tx:
            return require_bundle(tx, ref)

    def bundle_path(self, ref: str = "latest") -> Path:
        """Return the directory of the bundle ``ref`` names (:meth:`bundle`, :meth:`bundle_dir`)."""
        return self.bundle_dir(self.bundle(ref))

    def bundle_dir(self, record: BundleRecord) -> Path:
        """Return bundle ``record``'s directory on this machine; with a remote store, one
        built elsewhere is first written here from the store (objects verified).

        Raises:
            NotFound, Damaged, StorageError: see :func:`~mtreg.registry.fetching.local_bundle`.
        """
        return local_bundle(self.store, self.home, self.objects, record)

    def diff(self, a: str, b: str) -> dict[str, dict[str, str | None]]:
        """Return the tasks whose versions differ between bundles ``a`` and ``b``.

        Returns:
            ``{task: {"a": version or None, "b": version or None}}`` for each difference.
        """
        with self.store.transaction() as tx:
            left, right = require_bundle(tx, a).members, require_bundle(tx, b).members
        return {
            task: {"a": left.get(task), "b": right.get(task)}
            for task in sorted(set(left) | set(right))
            if left.get(task) != right.get(task)
        }

    def set_alias(self, name: str, ref: str) -> BundleRecord:
        """Point alias ``name`` at the bundle ``ref`` names; return that bundle.

        Raises:
            InvalidName: a bad alias name. NotFound: no such bundle.
        """
        validate_name(name, "alias")
        with self._writing() as write:
            bundle = require_bundle(write.tx, ref)
            write.tx.set_alias(name, bundle.id)
            write.tx.add_event("alias.set", name, {"bundle": bundle.id})
        return self.bundle(name)

    def gc(self, *, dry_run: bool = False) -> dict[str, list[str]]:
        """Delete bundles no alias points at, and objects nothing refers to.

        Trunk components and every registered task version's weights are always kept
        (rollback needs them); so is every aliased bundle. Objects left by a crashed
        command (copied, never committed) are garbage too.

        Returns:
            ``{"bundles": [ids], "objects": [sha256s]}`` removed (or, with ``dry_run``,
            that would be removed).
        """
        with self._writing() as write:
            doomed, orphans = find_garbage(write.tx, self.objects)
            if dry_run:
                return {"bundles": doomed, "objects": orphans}
            forget_garbage(write.tx, doomed, orphans)
        faults.point("gc.after_commit")
        deleted = delete_files(self.store, self.objects, self.home, doomed)
        return {"bundles": doomed, "objects": deleted}

    def verify(self, *, repair: bool = False, remote: bool = False) -> VerifyReport:
        """Check every object (its bytes hash to its name; with ``remote``, its copy in the
        remote store too), every bundle directory (its manifest hashes to the bundle id,
        every file to its recorded sha256) and every ONNX export cached for serving; with
        ``repair``, restore what a good source allows (:mod:`mtreg.registry.integrity`).

        Returns:
            The report: items checked per kind, and each damaged one (repaired or not,
            with what to do).
        """
        return verify_registry(self.store, self.objects, self.home, self.discover, repair, remote)

    def events(self, limit: int = 50, subject: str | None = None) -> list[EventRecord]:
        """Return the audit log, newest first."""
        with self.store.transaction() as tx:
            return tx.list_events(limit=limit, subject=subject)
