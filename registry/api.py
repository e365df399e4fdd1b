"""``mtreg.Registry``: every registry operation as a method. The CLI is a thin layer over it.

The registry never builds SQL (that is :mod:`mtreg.registry.store`) and imports torch only
inside the operations that read weights, so listing tasks stays fast.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtreg.errors import AlreadyExists, IncompatibleTrunk, InvalidWeights, MtregError, NotFound
from mtreg.plugins.spec import validate_name
from mtreg.registry.objects import ObjectStore, sha256_file
from mtreg.registry.records import TaskRecord, TaskVersionRecord, TrunkRecord
from mtreg.registry.settings import resolve_home, resolve_url
from mtreg.registry.versioning import Change, decide

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mtreg.plugins.loader import Discovery, LoadedTask
    from mtreg.registry.store import Store


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
    def _writing(self) -> Iterator[tuple]:
        """One write transaction holding the registry lock, plus a list of new objects.

        Objects copied in during the transaction are deleted again if it fails, so a
        refused or crashed operation leaves ``MTREG_HOME`` as it found it.
        """
        created: list[str] = []
        try:
            with self.store.transaction() as tx:
                tx.lock_registry()
                yield tx, created
        except BaseException:
            for sha in created:
                self.objects.discard(sha)
            raise

    def _put_object(self, source: Path, created: list[str]) -> str:
        sha, is_new = self.objects.put(source)
        if is_new:
            created.append(sha)
        return sha

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
        with self.store.transaction() as tx:
            if tx.get_trunk(name) is not None:
                raise AlreadyExists(
                    f"trunk {name!r} is already registered: choose another name "
                    "(`mtreg trunk list` shows the registered ones)"
                )
        from mtreg.model.trunk import read_checkpoint, save_component

        checkpoint = read_checkpoint(Path(path))
        with self._writing() as (tx, created), tempfile.TemporaryDirectory() as scratch:

            def put_tensors(tensors: dict, label: str) -> str:
                file = Path(scratch) / f"{label}.safetensors"
                save_component(tensors, file)
                return self._put_object(file, created)

            objects = {
                "embeddings": put_tensors(checkpoint.embeddings, "embeddings"),
                "layers": [put_tensors(t, f"layer{i}") for i, t in enumerate(checkpoint.layers)],
                "pooler": put_tensors(checkpoint.pooler, "pooler") if checkpoint.pooler else None,
                "tokenizer": {
                    file_name: self._put_object(file_path, created)
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
            tx.add_trunk(record)
            tx.add_event("trunk.add", name, {"source": record.source})
        return self.trunk(name)

    def trunks(self) -> list[TrunkRecord]:
        """Return every registered trunk, by name."""
        with self.store.transaction() as tx:
            return tx.list_trunks()

    def trunk(self, name: str) -> TrunkRecord:
        """Return trunk ``name``. Raises NotFound if it is not registered."""
        with self.store.transaction() as tx:
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

    # -- tasks ------------------------------------------------------------------------

    def register(
        self, tasks: Iterable[str] = (), *, all: bool = False, dry_run: bool = False
    ) -> list[Registration]:
        """Register the plugins' current versions of ``tasks`` (or of every task).

        Everything is validated first (weights by the strict reader, trunk compatibility,
        the version rules); then all of it is written in one transaction, or nothing is.

        Returns:
            One :class:`Registration` per task, in the order given.

        Raises:
            MtregError: the first refusal (its message names the task); nothing is written.
        """
        discovery = self.discover()
        names = sorted(discovery.tasks) if all else list(dict.fromkeys(tasks))
        if not names:
            raise MtregError(
                "no tasks to register: name them, or pass --all (`mtreg plugins` lists them)"
            )
        candidates = [self._candidate(discovery.task(name)) for name in names]
        results: list[Registration] = []
        with self._writing() as (tx, created):
            for candidate in candidates:
                record = candidate.record
                current = tx.get_task(record.task)
                if current is not None and current.trunk != record.trunk:
                    raise IncompatibleTrunk(
                        f"task {record.task!r} is registered on trunk {current.trunk!r}, this "
                        f"version was trained on {record.trunk!r}: register it under a new "
                        "task name"
                    )
                decision = decide(
                    record,
                    tx.list_versions(record.task) if current else [],
                    current.active_version if current else None,
                )
                results.append(
                    Registration(
                        record.task,
                        record.version,
                        decision.change,
                        decision.previous,
                        candidate.plugin,
                    )
                )
                if dry_run or decision.change == "unchanged":
                    continue
                if decision.change == "reactivated":
                    tx.set_active(record.task, record.version)
                else:
                    sha = self._put_object(candidate.weights, created)
                    if sha != record.weights_sha256:
                        raise InvalidWeights(
                            f"task {record.task!r}: {candidate.weights} changed while it was "
                            "being registered: run the command again"
                        )
                    tx.add_version(record)
                tx.add_event(
                    f"task.{decision.change}",
                    record.task,
                    {"version": record.version, "previous": decision.previous},
                )
        return results

    def _candidate(self, loaded: LoadedTask) -> _Candidate:
        """Validate one plugin task against its trunk; read weights, write nothing."""
        from mtreg.model.branch_file import read_branch
        from mtreg.model.config import TrunkConfig
        from mtreg.model.fingerprint import TrunkFingerprint

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
        mismatch = TrunkFingerprint.from_dict(trunk.fingerprint).first_mismatch(meta.trunk_prefix)
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

    def remove(self, task: str, *, dry_run: bool = False) -> TaskRecord:
        """Deactivate ``task``; its versions stay in the history and can be rolled back to.

        Returns:
            The task's record as it was before removal.

        Raises:
            NotFound: unknown task. MtregError: the task is already removed.
        """
        with self._writing() as (tx, _):
            record = self._task(tx, task)
            if record.active_version is None:
                raise MtregError(f"task {task!r} is already removed")
            if not dry_run:
                tx.set_active(task, None)
                tx.add_event("task.remove", task, {"version": record.active_version})
        return record

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
    def _task(tx, name: str) -> TaskRecord:
        record = tx.get_task(name)
        if record is None:
            raise NotFound(
                f"task {name!r} is not registered: `mtreg list` shows the registered tasks, "
                "`mtreg plugins` the ones plugins offer"
            )
        return record
