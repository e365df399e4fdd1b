"""Registering a task version: a plugin's task checked against its trunk (a candidate), then
written inside a write transaction by the version rules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtreg.artifacts.objects import sha256_file
from mtreg.errors import IncompatibleTrunk, InvalidWeights, MtregError
from mtreg.registry.lookup import require_trunk
from mtreg.registry.outcomes import Registration
from mtreg.registry.records import TaskVersionRecord, TrunkRecord
from mtreg.registry.versioning import decide

if TYPE_CHECKING:
    from mtreg.artifacts.branch_file import BranchMeta
    from mtreg.core.spec import TaskSpec
    from mtreg.plugins.loader import LoadedTask
    from mtreg.registry.store import Store
    from mtreg.registry.writing import Write


@dataclass(frozen=True)
class Candidate:
    """A plugin's task version whose weights were checked against its trunk."""

    record: TaskVersionRecord
    weights: Path
    plugin: str


def check_candidate(store: Store, loaded: LoadedTask) -> Candidate:
    """Validate one plugin task against its trunk; read weights, write nothing.

    Returns:
        The candidate: the version record to add and the weights file to store.

    Raises:
        MtregError: the task names no trunk. NotFound: its trunk is not registered.
        InvalidWeights: no, unreadable or mismatched weights. IncompatibleTrunk: the
        weights were trained on another trunk.
    """
    spec = loaded.spec
    if spec.trunk is None:
        raise MtregError(
            f"task {spec.name!r} names no trunk: set TaskSpec(trunk=...) in its plugin"
        )
    if spec.weights is None:
        raise InvalidWeights(
            f"task {spec.name!r} has no weights yet: train it with `mtreg onboard {spec.name}`"
        )
    with store.transaction() as tx:
        trunk = require_trunk(tx, spec.trunk)
    meta = _read_meta(spec, trunk)
    _check_trained_on(spec, trunk, meta)
    return Candidate(_version_record(loaded, trunk, meta), Path(spec.weights), loaded.plugin)


def _read_meta(spec: TaskSpec, trunk: TrunkRecord) -> BranchMeta:
    """Return the metadata of the task's branch file, read strictly, naming this version."""
    # The branch reader needs torch: only when weights are registered, never for `mtreg list`.
    from mtreg.artifacts.branch_file import read_branch
    from mtreg.artifacts.config import TrunkConfig

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
    return meta


def _check_trained_on(spec: TaskSpec, trunk: TrunkRecord, meta: BranchMeta) -> None:
    """Refuse weights whose trunk prefix does not match ``trunk``'s fingerprint."""
    # Fingerprints hash tensors (torch): only when weights are registered.
    from mtreg.artifacts.fingerprint import TrunkFingerprint

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


def _version_record(loaded: LoadedTask, trunk: TrunkRecord, meta: BranchMeta) -> TaskVersionRecord:
    spec = loaded.spec
    training = meta.training or {}
    return TaskVersionRecord(
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


def apply_candidate(write: Write, candidate: Candidate, dry_run: bool) -> Registration:
    """Register one validated candidate inside ``write``'s transaction.

    Returns:
        What registering it does (or, with ``dry_run``, would do).

    Raises:
        IncompatibleTrunk: the task is registered on another trunk. AlreadyExists,
        InvalidVersion: the version rules refuse it. InvalidWeights: the weights changed
        since they were checked.
    """
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
        sha = write.put_object(candidate.weights)
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
