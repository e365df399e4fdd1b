"""``mtreg.Registry``: every registry operation as a method. The CLI is a thin layer over it.

The registry never builds SQL (that is :mod:`mtreg.registry.store`) and imports torch only
inside the operations that read weights, so listing tasks stays fast.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtreg.artifacts.manifest import (
    build_manifest,
    bundle_id,
    clean_leftovers,
    remove_bundle_dir,
    write_bundle,
)
from mtreg.artifacts.objects import ObjectStore, sha256_file
from mtreg.core import faults
from mtreg.core.env import resolve_home, resolve_url
from mtreg.core.spec import validate_name
from mtreg.errors import AlreadyExists, IncompatibleTrunk, InvalidWeights, MtregError, NotFound
from mtreg.registry.records import (
    BundleRecord,
    EventRecord,
    TaskRecord,
    TaskVersionRecord,
    TrunkRecord,
)
from mtreg.registry.versioning import Change, decide

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mtreg.plugins.loader import Discovery, LoadedTask
    from mtreg.registry.store import Store


@dataclass(frozen=True)
class Refusal:
    """A task that :meth:`Registry.sync` could not register, and why."""

    task: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready dict."""
        return {"task": self.task, "reason": self.reason}


@dataclass(frozen=True)
class Registration:
    """The outcome of registering one task version."""

    task: str
    version: str
    change: Change
    previous: str | None
    plugin: str

    def to_dict(self) -> dict[str, str | None]:
        """Return a JSON-ready dict."""
        return {
            "task": self.task,
            "version": self.version,
            "change": self.change,
            "previous": self.previous,
            "plugin": self.plugin,
        }


@dataclass(frozen=True)
class Changes:
    """What a write command did: per-task outcomes, refusals, the bundles it built, and
    (for sync) the tasks skipped because they have no weights yet."""

    tasks: list[Registration]
    refused: list[Refusal]
    bundles: list[BundleRecord]
    skipped: list[Refusal] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "tasks": [t.to_dict() for t in self.tasks],
            "refused": [r.to_dict() for r in self.refused],
            "bundles": [b.id for b in self.bundles],
            "skipped": [r.to_dict() for r in self.skipped],
        }


@dataclass
class _Write:
    """State of one write transaction: what it created, which trunks need a new bundle."""

    tx: Any = None
    objects: list[str] = field(default_factory=list)
    directories: list[Path] = field(default_factory=list)
    rebuild: set[str] = field(default_factory=set)
    promote: bool = False
    bundles: dict[str, BundleRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class _Candidate:
    record: TaskVersionRecord
    weights: Path
    plugin: str


class Registry:
    """A task registry: a database, an object store under ``home``, and the plugins.

    Args:
        url: SQLAlchemy URL; default ``$MTREG_DATABASE_URL``, else SQLite in ``home``.
        home: registry home; default ``$MTREG_HOME``, else the platform's user data dir.
        plugins_dirs: extra plugin files or directories, besides ``$MTREG_PLUGINS_PATH``
            and installed entry points.
    """

    def __init__(
        self,
        url: str | None = None,
        home: str | Path | None = None,
        plugins_dirs: Sequence[str | Path] = (),
    ) -> None:
        self.home = resolve_home(home)
        self.url = resolve_url(url, self.home)
        self.objects = ObjectStore(self.home / "objects")
        self.bundles_dir = self.home / "bundles"
        self.plugins_dirs = tuple(plugins_dirs)
        self._store: Store | None = None
        self._discovery: Discovery | None = None

    # -- plumbing ---------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store, opened on first use (creating a new database by its migrations).

        Raises:
            DatabaseError: unreachable database, or a schema older or newer than the code.
        """
        if self._store is None:
            from mtreg.registry.store import Store

            self._store = Store(self.url)
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

    @contextmanager
    def _writing(self) -> Iterator[_Write]:
        """One write transaction holding the registry lock.

        Bundles of the trunks marked in ``write.rebuild`` are rebuilt before the commit.
        Objects and bundle directories created during a transaction that fails are deleted
        again, so a refused operation leaves ``MTREG_HOME`` as it found it; a crashed one
        leaves only leftovers that the next write (directories) or ``gc`` (objects) removes.
        """
        write = _Write()
        with self.store.transaction(write=True) as tx:
            write.tx = tx
            self.objects.clean_incoming()
            clean_leftovers(self.bundles_dir, {b.id for b in tx.list_bundles()})
            try:
                yield write
                for trunk in sorted(write.rebuild):
                    ident = self._rebuild(write, trunk)
                    if write.promote:
                        tx.set_alias("serving", ident)
                        tx.add_event("alias.set", "serving", {"bundle": ident})
                    write.bundles[trunk] = tx.get_bundle(ident)
                faults.checkpoint("write.before_commit")
            except BaseException:
                # Undo while the write lock is still held: once it is released, another
                # writer may link the same object or reuse the same (content-addressed)
                # bundle directory, and deleting them afterwards would break what it commits.
                self._undo(write)
                raise
        faults.checkpoint("write.after_commit")

    def _undo(self, write: _Write) -> None:
        """Delete the objects and bundle directories a failed transaction created."""
        for sha in write.objects:
            self.objects.discard(sha)
        for directory in write.directories:
            shutil.rmtree(directory, ignore_errors=True)

    def _put_object(self, source: Path, write: _Write) -> str:
        sha, is_new = self.objects.put(source)
        if is_new:
            write.objects.append(sha)
        return sha

    def _rebuild(self, write: _Write, trunk_name: str) -> str:
        """Build the bundle of the active versions on a trunk, point ``latest`` at it.

        Returns:
            The bundle id.
        """
        tx = write.tx
        members = tx.active_versions(trunk_name)
        manifest = build_manifest(tx.get_trunk(trunk_name), members)
        ident = bundle_id(manifest)
        fresh = not (self.bundles_dir / ident).exists()
        path = write_bundle(self.bundles_dir, manifest, self.objects)
        if fresh:
            write.directories.append(path)
        existing = tx.get_bundle(ident)
        if existing is None:
            tx.add_bundle(
                BundleRecord(ident, trunk_name, manifest, {m.task: m.version for m in members})
            )
            tx.add_event("bundle.build", ident, {"trunk": trunk_name, "tasks": len(members)})
        tx.set_alias("latest", ident)
        return ident

    # -- setup ------------------------------------------------------------------------

    def init(self) -> dict[str, str]:
        """Create the home directory and the database (by its migrations) if missing.

        Returns:
            ``{"home", "database", "revision"}`` describing the registry.
        """
        from mtreg.registry import db

        self.home.mkdir(parents=True, exist_ok=True)
        revision = db.current_revision(self.store.engine) or ""
        return {"home": str(self.home), "database": self.store.url, "revision": revision}

    # -- trunks -----------------------------------------------------------------------

    def add_trunk(self, name: str, path: str | Path) -> TrunkRecord:
        """Register a Hugging Face BERT-family checkpoint folder as trunk ``name``.

        Its embeddings, layers, pooler and tokenizer files are copied into the object
        store, so the source folder may move or change afterwards.

        Returns:
            The new trunk's record.

        Raises:
            InvalidName: bad name. AlreadyExists: the name is taken.
            InvalidCheckpoint: not a usable BERT/RoBERTa folder (the message names why).
        """
        validate_name(name, "trunk")
        self._refuse_taken_trunk(name)
        from mtreg.artifacts.checkpoint import read_checkpoint, save_component

        checkpoint = read_checkpoint(Path(path))
        with self._writing() as write, tempfile.TemporaryDirectory() as scratch:
            self._refuse_taken_trunk(name, write.tx)

            def put_tensors(tensors: dict, label: str) -> str:
                file = Path(scratch) / f"{label}.safetensors"
                save_component(tensors, file)
                return self._put_object(file, write)

            objects = {
                "embeddings": put_tensors(checkpoint.embeddings, "embeddings"),
                "layers": [put_tensors(t, f"layer{i}") for i, t in enumerate(checkpoint.layers)],
                "pooler": put_tensors(checkpoint.pooler, "pooler") if checkpoint.pooler else None,
                "tokenizer": {
                    file_name: self._put_object(file_path, write)
                    for file_name, file_path in sorted(checkpoint.tokenizer_files.items())
                },
            }
            record = TrunkRecord(
                name=name,
                model_type=checkpoint.config.model_type,
                num_layers=checkpoint.config.num_hidden_layers,
                config=checkpoint.config.to_dict(),
                fingerprint=checkpoint.fingerprint.to_dict(),
                objects=objects,
                source=str(Path(path).resolve()),
            )
            write.tx.add_trunk(record)
            write.tx.add_event("trunk.add", name, {"source": record.source})
        return self.trunk(name)

    def _refuse_taken_trunk(self, name: str, tx: Any = None) -> None:
        if tx is None:
            with self.store.transaction() as tx:
                return self._refuse_taken_trunk(name, tx)
        if tx.get_trunk(name) is not None:
            raise AlreadyExists(
                f"trunk {name!r} is already registered: choose another name "
                "(`mtreg trunk list` shows the registered ones)"
            )

    def trunks(self) -> list[TrunkRecord]:
        """Return every registered trunk, by name."""
        with self.store.transaction() as tx:
            return tx.list_trunks()

    def trunk(self, name: str) -> TrunkRecord:
        """Return trunk ``name``. Raises NotFound if it is not registered."""
        with self.store.transaction() as tx:
            return self._trunk(tx, name)

    @staticmethod
    def _trunk(tx: Any, name: str) -> TrunkRecord:
        record = tx.get_trunk(name)
        if record is None:
            raise NotFound(
                f"trunk {name!r} is not registered: add it with `mtreg trunk add {name} PATH`"
            )
        return record

    # -- plugins ----------------------------------------------------------------------

    def discover(self, refresh: bool = False) -> Discovery:
        """Return the installed and path plugins and the tasks they offer (cached)."""
        if self._discovery is None or refresh:
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
            names = sorted(n for n, t in discovery.tasks.items() if t.spec.weights is not None)
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
            loaded = discovery.task(name)
            if name in overrides:
                spec = replace(loaded.spec, weights=Path(overrides[name]))
                loaded = replace(loaded, spec=spec)
            candidates.append(self._candidate(loaded))
        with self._writing() as write:
            write.promote = promote
            done = [self._apply(write, c, dry_run) for c in candidates]
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
            if discovery.task(name).spec.weights is None:
                skipped.append(Refusal(name, "no weights yet: train it with `mtreg onboard`"))
                continue
            try:
                candidates.append(self._candidate(discovery.task(name)))
            except MtregError as exc:
                refused.append(Refusal(name, str(exc)))
        done: list[Registration] = []
        with self._writing() as write:
            write.promote = promote
            for candidate in candidates:
                try:
                    with write.tx.savepoint():
                        done.append(self._apply(write, candidate, dry_run))
                except MtregError as exc:
                    refused.append(Refusal(candidate.record.task, str(exc)))
            if dry_run:
                write.rebuild.clear()
        return Changes(done, refused, list(write.bundles.values()), skipped)

    @staticmethod
    def _finish(write: _Write, done: list[Registration]) -> Changes:
        return Changes(done, [], list(write.bundles.values()))

    def _apply(self, write: _Write, candidate: _Candidate, dry_run: bool) -> Registration:
        """Register one validated candidate inside ``write``'s transaction."""
        tx, record = write.tx, candidate.record
        current = tx.get_task(record.task)
        if current is not None and current.trunk != record.trunk:
            raise IncompatibleTrunk(
                f"task {record.task!r} is registered on trunk {current.trunk!r}, this "
                f"version was trained on {record.trunk!r}: register it under a new task name"
            )
        decision = decide(
            record,
            tx.list_versions(record.task) if current else [],
            current.active_version if current else None,
        )
        result = Registration(
            record.task, record.version, decision.change, decision.previous, candidate.plugin
        )
        if dry_run or decision.change == "unchanged":
            return result
        if decision.change == "reactivated":
            tx.set_active(record.task, record.version)
        else:
            sha = self._put_object(candidate.weights, write)
            if sha != record.weights_sha256:
                raise InvalidWeights(
                    f"task {record.task!r}: {candidate.weights} changed while it was being "
                    "registered: run the command again"
                )
            tx.add_version(record)
        tx.add_event(
            f"task.{decision.change}",
            record.task,
            {"version": record.version, "previous": decision.previous},
        )
        write.rebuild.add(record.trunk)
        return result

    def _candidate(self, loaded: LoadedTask) -> _Candidate:
        """Validate one plugin task against its trunk; read weights, write nothing."""
        from mtreg.artifacts.branch_file import read_branch
        from mtreg.artifacts.config import TrunkConfig
        from mtreg.artifacts.fingerprint import TrunkFingerprint

        spec = loaded.spec
        if spec.trunk is None:
            raise MtregError(
                f"task {spec.name!r} names no trunk: set TaskSpec(trunk=...) in its plugin"
            )
        if spec.weights is None:
            raise InvalidWeights(
                f"task {spec.name!r} has no weights yet: train it with `mtreg onboard {spec.name}`"
            )
        trunk = self.trunk(spec.trunk)
        try:
            meta, _ = read_branch(spec.weights, TrunkConfig(**trunk.config), spec.head)
        except MtregError as exc:
            raise type(exc)(f"task {spec.name!r}: {exc}") from None
        if (meta.task, meta.task_version) != (spec.name, spec.version):
            raise InvalidWeights(
                f"task {spec.name!r} {spec.version}: {spec.weights} holds "
                f"{meta.task!r} {meta.task_version}: point the plugin at the right file or "
                "fix its version"
            )
        try:
            fingerprint = TrunkFingerprint.from_dict(trunk.fingerprint)
            mismatch = fingerprint.first_mismatch(meta.trunk_prefix)
        except (TypeError, ValueError, AttributeError):
            # The prefix comes from the weights file: a malformed one is bad weights.
            raise InvalidWeights(
                f"task {spec.name!r}: {spec.weights} has a malformed trunk record "
                "(mtreg.trunk_prefix): write the branch file again"
            ) from None
        if mismatch is not None:
            raise IncompatibleTrunk(
                f"task {spec.name!r} was not trained on trunk {trunk.name!r}: {mismatch}; "
                f"retrain it on this trunk (`mtreg onboard {spec.name}`)"
            )
        training = meta.training or {}
        record = TaskVersionRecord(
            task=spec.name,
            version=spec.version,
            weights_sha256=sha256_file(spec.weights),
            fork_depth=meta.fork_depth,
            num_layers=meta.num_layers,
            head_kind=meta.head.kind,
            labels=list(meta.head.labels),
            inputs=list(spec.inputs),
            max_length=meta.max_length,
            trunk=trunk.name,
            trunk_prefix=meta.trunk_prefix,
            description=spec.description,
            metric_names=list(spec.metrics),
            metrics=dict(training.get("dev_metrics", {})),
            training=training,
            plugin=loaded.plugin,
            plugin_version=loaded.plugin_version or "",
        )
        return _Candidate(record, Path(spec.weights), loaded.plugin)

    def remove(self, task: str, *, dry_run: bool = False) -> Changes:
        """Deactivate ``task`` and rebuild; its versions stay and can be rolled back to.

        Returns:
            The removal (``change`` "removed", ``previous`` the version it had) and the
            bundle built.

        Raises:
            NotFound: unknown task. MtregError: the task is already removed.
        """
        with self._writing() as write:
            record = self._task(write.tx, task)
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

        Raises:
            NotFound: unknown task or version (the message lists the registered ones).
        """
        with self._writing() as write:
            record = self._task(write.tx, task)
            versions = [v.version for v in write.tx.list_versions(task)]
            if to not in versions:
                raise NotFound(
                    f"task {task!r} has no version {to!r}: registered versions are "
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
            return self._task(tx, name)

    def versions(self, name: str) -> list[TaskVersionRecord]:
        """Return every registered version of ``name``, oldest first. Raises NotFound."""
        with self.store.transaction() as tx:
            self._task(tx, name)
            return tx.list_versions(name)

    @staticmethod
    def _task(tx: Any, name: str) -> TaskRecord:
        record = tx.get_task(name)
        if record is None:
            raise NotFound(
                f"task {name!r} is not registered: `mtreg list` shows the registered tasks, "
                "`mtreg plugins` the ones plugins offer"
            )
        return record

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
            return self._bundle(tx, ref)

    @staticmethod
    def _bundle(tx: Any, ref: str) -> BundleRecord:
        record = tx.get_alias(ref) or tx.get_bundle(ref)
        if record is None:
            aliases = ", ".join(sorted(tx.list_aliases())) or "none yet"
            raise NotFound(
                f"no bundle or alias {ref!r}: aliases are {aliases}; `mtreg bundle list` "
                "shows bundle ids"
            )
        return record

    def bundle_path(self, ref: str = "latest") -> Path:
        """Return the directory of the bundle named by ``ref`` (see :meth:`bundle`)."""
        return self.bundles_dir / self.bundle(ref).id

    def diff(self, a: str, b: str) -> dict[str, dict[str, str | None]]:
        """Return the tasks whose versions differ between bundles ``a`` and ``b``.

        Returns:
            ``{task: {"a": version or None, "b": version or None}}`` for each difference.
        """
        with self.store.transaction() as tx:
            left, right = self._bundle(tx, a).members, self._bundle(tx, b).members
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
            bundle = self._bundle(write.tx, ref)
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
            tx = write.tx
            doomed = [b.id for b in tx.list_bundles() if not b.aliases]
            orphans = self._orphans(tx, set(doomed))
            if dry_run:
                return {"bundles": doomed, "objects": orphans}
            for ident in doomed:
                tx.delete_bundle(ident)
            if doomed or orphans:
                tx.add_event("gc", "", {"bundles": doomed, "objects": len(orphans)})
        faults.checkpoint("gc.after_commit")
        return {"bundles": doomed, "objects": self._delete_garbage(doomed)}

    def _orphans(self, tx: Any, doomed: set[str]) -> list[str]:
        """Return the stored objects that nothing but the ``doomed`` bundles refers to."""
        keep = set()
        for trunk in tx.list_trunks():
            objects = trunk.objects
            keep.update([objects["embeddings"], *objects["layers"], *objects["tokenizer"].values()])
            if objects.get("pooler"):
                keep.add(objects["pooler"])
        for task in tx.list_tasks(include_removed=True):
            keep.update(v.weights_sha256 for v in tx.list_versions(task.name))
        for bundle in tx.list_bundles():
            if bundle.id not in doomed:
                keep.update(bundle.manifest["files"].values())
        return [sha for sha in self.objects.list() if sha not in keep]

    def _delete_garbage(self, doomed: Sequence[str]) -> list[str]:
        """Delete the directories of gc'd bundles and the unreferenced objects.

        Files go only after the rows' commit (a failed transaction must lose nothing), and
        under the write lock again, checked against the database as it is then: between
        the two transactions another writer may have rebuilt a bundle with one of the doomed
        ids (bundles are content-addressed) or stored one of the orphaned objects again.
        A crash here leaves only garbage that the next write or gc removes.

        Returns:
            The objects deleted.
        """
        with self.store.transaction(write=True) as tx:
            known = {b.id for b in tx.list_bundles()}
            for ident in doomed:
                if ident not in known:
                    remove_bundle_dir(self.bundles_dir / ident)
                    faults.checkpoint("gc.deleting")
            clean_leftovers(self.bundles_dir, known)
            orphans = self._orphans(tx, set())
            for sha in orphans:
                self.objects.discard(sha)
                faults.checkpoint("gc.deleting")
        return orphans

    def events(self, limit: int = 50, subject: str | None = None) -> list[EventRecord]:
        """Return the audit log, newest first."""
        with self.store.transaction() as tx:
            return tx.list_events(limit=limit, subject=subject)
