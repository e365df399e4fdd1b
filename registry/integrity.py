"""``mtreg verify [--repair]``: every object, bundle and ONNX cache entry checked against
the hashes that name it, and what is damaged restored from a good source.

Objects must hash to their names; a bundle directory's ``manifest.json`` must hash to the
bundle's id and every file it lists to the recorded sha256 (the tokenizer folder as an
exact set); an ONNX cache entry must verify as :func:`mtreg.runtime.bundle.load_bundle`
would verify it. Repair works under the registry's write lock, objects first: a damaged
object is replaced from the first good source (see :class:`_Sources`); then each damaged
bundle directory is rebuilt from its objects and the manifest the database recorded; a
damaged ONNX cache entry is deleted (serving exports it again). What cannot be repaired
is reported with what to do.

With a remote store, only this machine's cached copies are read, unless ``remote`` is
asked for: then the store's copy of every object the registry refers to, and every
bundle's published manifest, is hashed too (streamed: as costly as downloading them all,
hence not the default), and repair replaces a missing or damaged one by a good local copy
(:meth:`ObjectStore.replace_remote`; a manifest from the database's record).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtreg.artifacts.bundle_dir import remove_bundle_dir, write_bundle
from mtreg.artifacts.integrity import bundle_problems
from mtreg.artifacts.manifest import MANIFEST, read_bundle_manifest
from mtreg.artifacts.objects import sha256_file
from mtreg.artifacts.onnx_info import onnx_problems, read_onnx_info
from mtreg.errors import MtregError
from mtreg.registry.records import BundleRecord, TaskVersionRecord, TrunkRecord
from mtreg.registry.writing import writing

if TYPE_CHECKING:
    from mtreg.artifacts.home import Home
    from mtreg.artifacts.objects import ObjectStore
    from mtreg.plugins.loader import Discovery
    from mtreg.registry.store import Store, Tx

OBJECT, REMOTE, PUBLISHED, BUNDLE, ONNX = "object", "remote", "published", "bundle", "onnx"
_REMOTE_REPAIR = "`mtreg verify --remote --repair`"


@dataclass(frozen=True)
class Finding:
    """One damaged item: its kind (``object``; ``remote``: an object's copy in the remote
    store; ``published``: a bundle's manifest there; ``bundle``; ``onnx``), its name (object
    id, bundle id, ONNX cache folder), what is wrong, and whether ``--repair`` fixed it or,
    if not, what to do."""

    kind: str
    name: str
    problem: str
    repaired: bool = False
    todo: str = ""


@dataclass(frozen=True)
class Checked:
    """How many items of each kind a verification read (``remote``: objects and published
    manifests hashed in the remote store)."""

    objects: int
    bundles: int
    onnx: int
    remote: int = 0


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`mtreg.Registry.verify` found: how many items of each kind it checked,
    and every damaged one."""

    checked: Checked
    findings: list[Finding] = field(default_factory=list)

    @property
    def damaged(self) -> list[Finding]:
        """The findings still damaged (not repaired)."""
        return [f for f in self.findings if not f.repaired]

    @property
    def ok(self) -> bool:
        """True when nothing is damaged any more."""
        return not self.damaged

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data."""
        return {
            "ok": self.ok,
            "checked": asdict(self.checked),
            "findings": [asdict(f) for f in self.findings],
        }


Owner = TrunkRecord | TaskVersionRecord


def verify_registry(
    store: Store,
    objects: ObjectStore,
    home: Home,
    discover: Callable[[], Discovery],
    repair: bool = False,
    remote: bool = False,
) -> VerifyReport:
    """Check every object, bundle directory and ONNX cache entry (with ``remote``, the
    remote store's copies of the objects and published manifests too); with ``repair``,
    restore what a good source allows (under the write lock).

    Returns:
        The report.

    Raises:
        MtregError: ``remote`` without a remote store. DatabaseError: the database cannot
            be reached. StorageError: the home's disk is full or read-only while
            repairing, or the remote store cannot be used.
    """
    if remote and objects.remote is None:
        raise MtregError(
            f"the registry's store {objects.location} is not remote: run `mtreg verify` "
            "without --remote, or name the remote store (--store)"
        )
    with ExitStack() as stack:
        if repair:
            tx = stack.enter_context(writing(store, objects, home)).tx
            sources = stack.enter_context(_Sources(home, objects, discover))
        else:
            tx, sources = stack.enter_context(store.transaction()), None
        owners = _owners(tx)
        # The store first: its repair leaves a verified copy in this machine's cache.
        findings = _check_remote(objects, owners, sources) if remote else []
        checked_objects = _object_ids(objects, owners)
        findings += [
            _check_object(objects, sha, owners.get(sha), sources) for sha in checked_objects
        ]
        bundles = tx.list_bundles()
        if remote:
            findings += [_check_published(objects, b, repair) for b in bundles]
        broken = {f.name for f in findings if f is not None and not f.repaired}
        findings += [_check_bundle(home, objects, b, broken, repair) for b in bundles]
        onnx = _onnx_entries(home)
        findings += [_check_onnx(entry, repair) for entry in onnx]
    in_store = len(owners) + len(bundles) if remote else 0
    counts = Checked(len(checked_objects), len(bundles), len(onnx), in_store)
    return VerifyReport(counts, [f for f in findings if f is not None])


def _owners(tx: Tx) -> dict[str, list[Owner]]:
    """Return, per referenced object, the trunks and task versions that refer to it."""
    owners: dict[str, list[Owner]] = {}
    for trunk in tx.list_trunks():
        parts = trunk.objects
        shas = [parts["embeddings"], *parts["layers"], *parts["tokenizer"].values()]
        for sha in [*shas, *([parts["pooler"]] if parts.get("pooler") else [])]:
            owners.setdefault(sha, []).append(trunk)
    for task in tx.list_tasks(include_removed=True):
        for version in tx.list_versions(task.name):
            owners.setdefault(version.weights_sha256, []).append(version)
    for bundle in tx.list_bundles():
        for sha in bundle.manifest.files.values():
            owners.setdefault(sha, [])
    return owners


def _object_ids(objects: ObjectStore, owners: dict[str, list[Owner]]) -> list[str]:
    """Return the objects to check: every stored one and every referenced one. With a
    remote store, only this machine's cached copies are read (each was verified when it
    was fetched; a missing one is fetched, verified, when it is needed)."""
    if objects.remote is not None:
        return sorted(sha for sha in owners if objects.path(sha).is_file())
    return sorted(set(objects.list()) | set(owners))


def _object_problem(objects: ObjectStore, sha: str) -> str | None:
    path = objects.path(sha)
    if not path.is_file():
        return "is missing from the store"
    try:
        actual = sha256_file(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if actual == sha else f"is damaged: its bytes hash to {actual[:12]}"


def _check_object(
    objects: ObjectStore, sha: str, owners: list[Owner] | None, sources: _Sources | None
) -> Finding | None:
    """Check object ``sha`` (``owners``: what refers to it, None if nothing does)."""
    problem = _object_problem(objects, sha)
    if problem is None:
        return None
    if owners is None:
        if sources is None:
            return Finding(OBJECT, sha, problem, todo="nothing uses it: `mtreg gc` deletes it")
        # Referenced by nothing, not even a bundle: garbage, safe to drop under the lock.
        objects.path(sha).unlink(missing_ok=True)
        return Finding(OBJECT, sha, problem, repaired=True, todo="deleted: nothing used it")
    if sources is None:
        return Finding(OBJECT, sha, problem, todo=_todo(owners))
    if sources.restore(sha, owners):
        return Finding(OBJECT, sha, problem, repaired=True)
    return Finding(OBJECT, sha, problem, todo=_todo(owners))


def _check_remote(
    objects: ObjectStore, owners: dict[str, list[Owner]], sources: _Sources | None
) -> list[Finding]:
    """Hash the remote store's copy of every object the registry refers to; with
    ``sources`` (repair), replace each missing or damaged one by a good local copy."""
    findings = []
    for sha in sorted(owners):
        problem = objects.remote_problem(sha)
        if problem is None:
            continue
        if sources is None:
            findings.append(Finding(REMOTE, sha, problem, todo=f"run {_REMOTE_REPAIR}"))
        elif sources.local_copy(sha, owners[sha]):
            objects.replace_remote(sha, objects.path(sha))
            findings.append(Finding(REMOTE, sha, problem, repaired=True))
        else:
            todo = _todo(owners[sha], _REMOTE_REPAIR)
            findings.append(Finding(REMOTE, sha, problem, todo=todo))
    return findings


def _check_published(objects: ObjectStore, bundle: BundleRecord, repair: bool) -> Finding | None:
    """Hash bundle ``bundle``'s manifest in the remote store; with ``repair``, publish it
    again from the manifest the database recorded (when that hashes to the bundle id)."""
    problem = objects.remote_problem(bundle.id, published=True)
    if problem is None:
        return None
    if not repair:
        return Finding(PUBLISHED, bundle.id, problem, todo=f"run {_REMOTE_REPAIR}")
    raw = bundle.manifest.to_bytes()
    if hashlib.sha256(raw).hexdigest() != bundle.id:
        todo = "the registry's row does not match the bundle id: restore the database"
        return Finding(PUBLISHED, bundle.id, problem, todo=todo)
    with tempfile.TemporaryDirectory(prefix="mtreg-repair-") as scratch:
        source = Path(scratch) / MANIFEST
        source.write_bytes(raw)
        objects.replace_remote(bundle.id, source, published=True)
    return Finding(PUBLISHED, bundle.id, problem, repaired=True)


def _todo(owners: list[Owner], command: str = "`mtreg verify --repair`") -> str:
    """What a user does to let ``command`` restore an object these own."""
    trunks = [o for o in owners if isinstance(o, TrunkRecord)]
    if trunks:
        return (
            f"restore the folder {trunks[0].source} that trunk {trunks[0].name!r} was added "
            f"from, then run {command} again"
        )
    versions = [o for o in owners if isinstance(o, TaskVersionRecord)]
    if versions:
        return (
            f"put the branch file of {versions[0].task} {versions[0].version} back where "
            f"its plugin names it, then run {command} again"
        )
    return f"copy it from a machine's MTREG_HOME/objects, then run {command}"


class _Sources:
    """Where a good copy of a damaged object is looked for, in order: the remote store
    (when the registry has one: this machine's copy is only a cache), then the trunk's
    source folder (its components written again) or the task version's branch file
    (where its plugin names it, or where onboarding writes it). A copy is used only if
    its bytes hash to the object's name."""

    def __init__(self, home: Home, objects: ObjectStore, discover: Callable[[], Discovery]):
        self.home, self.objects, self.discover = home, objects, discover
        self._scratch = tempfile.TemporaryDirectory(prefix="mtreg-repair-")
        self._trunks: dict[str, list[Path]] = {}

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self._scratch.cleanup()

    def restore(self, sha: str, owners: list[Owner]) -> bool:
        """Replace object ``sha`` by a good copy; return False if no source has one."""
        # The damaged copy goes first: put() keeps an existing object as it is, and a
        # bundle linking the damaged inode keeps it until the bundle is rebuilt.
        self.objects.path(sha).unlink(missing_ok=True)
        if self.objects.remote is not None:
            try:
                self.objects.existing(sha)  # fetched and verified, or raises
                return True
            except MtregError:
                pass
        return self._from_candidates(sha, owners)

    def local_copy(self, sha: str, owners: list[Owner]) -> bool:
        """Make this machine's copy of object ``sha`` intact without reading the remote
        store (the cached copy if it verifies, else the owners' sources); return False if
        none has a good copy."""
        if _hashes_to(self.objects.path(sha), sha):
            return True
        self.objects.path(sha).unlink(missing_ok=True)
        return self._from_candidates(sha, owners)

    def _from_candidates(self, sha: str, owners: list[Owner]) -> bool:
        for candidate in self._candidates(owners):
            if _hashes_to(candidate, sha):
                stored, _ = self.objects.put(candidate)
                if stored == sha:
                    return True
        return False

    def _candidates(self, owners: list[Owner]) -> Iterator[Path]:
        for owner in owners:
            if isinstance(owner, TrunkRecord):
                yield from self._trunk_files(owner)
            else:
                yield from self._branch_files(owner)

    def _trunk_files(self, trunk: TrunkRecord) -> list[Path]:
        """Return the trunk's components written again from its source folder ([] when
        that folder is gone or no longer a checkpoint)."""
        if trunk.name not in self._trunks:
            # Reading a checkpoint needs torch: only when a trunk object is repaired.
            from mtreg.artifacts.checkpoint import read_checkpoint
            from mtreg.registry.trunks import component_files

            scratch = Path(self._scratch.name) / f"trunk-{len(self._trunks)}"
            scratch.mkdir()
            try:
                files = component_files(read_checkpoint(Path(trunk.source)), scratch)
            except MtregError:
                self._trunks[trunk.name] = []
                return []
            flat = [files["embeddings"], *files["layers"], files["pooler"]]
            flat += list(files["tokenizer"].values())
            self._trunks[trunk.name] = [path for path in flat if path is not None]
        return self._trunks[trunk.name]

    def _branch_files(self, version: TaskVersionRecord) -> Iterator[Path]:
        yield self.home.trained(version.task, version.version)
        offered = self.discover().tasks.get(version.task)
        if offered is not None and offered.spec.weights is not None:
            yield Path(offered.spec.weights)


def _hashes_to(path: Path, sha: str) -> bool:
    try:
        return path.is_file() and sha256_file(path) == sha
    except OSError:
        return False


def _check_bundle(
    home: Home, objects: ObjectStore, bundle: BundleRecord, broken: set[str], repair: bool
) -> Finding | None:
    root = home.bundle(bundle.id)
    if not root.exists() and objects.remote is not None:
        return None  # not materialised on this machine yet: nothing here to be damaged
    problems = _bundle_dir_problems(root, bundle)
    if not problems:
        return None
    problem = "; ".join(problems)
    missing = sorted({sha for sha in bundle.manifest.files.values() if sha in broken})
    if missing:
        todo = f"repair its objects first ({', '.join(s[:12] for s in missing)})"
        return Finding(BUNDLE, bundle.id, problem, todo=todo)
    if not repair:
        return Finding(BUNDLE, bundle.id, problem, todo="run `mtreg verify --repair`")
    remove_bundle_dir(root)
    write_bundle(home.bundles, bundle.manifest, objects)
    return Finding(BUNDLE, bundle.id, problem, repaired=True)


def _bundle_dir_problems(root: Path, bundle: BundleRecord) -> list[str]:
    """Return what is wrong with bundle ``bundle``'s directory ``root``."""
    try:
        raw = (root / MANIFEST).read_bytes()
    except OSError:
        return [f"{MANIFEST} is missing"]
    problems = []
    if hashlib.sha256(raw).hexdigest() != bundle.id:
        problems.append(f"{MANIFEST} was edited (it does not hash to the bundle id)")
    problems += [f"{p.file} {p.problem}" for p in bundle_problems(root, bundle.manifest)]
    return problems


def _onnx_entries(home: Home) -> list[Path]:
    folder = home.onnx_cache
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_onnx(entry: Path, repair: bool) -> Finding | None:
    try:
        manifest, ident = read_bundle_manifest(entry)
        info = read_onnx_info(entry)
        found = onnx_problems(entry, info, ident) + bundle_problems(entry, manifest)
        problems = [f"{p.file} {p.problem}" for p in found]
    except MtregError as exc:
        problems = [str(exc)]
    if not problems:
        return None
    problem = "; ".join(problems)
    if not repair:
        return Finding(ONNX, entry.name, problem, todo="run `mtreg verify --repair`")
    remove_bundle_dir(entry)
    return Finding(
        ONNX, entry.name, problem, repaired=True, todo="deleted: serving exports it again"
    )
