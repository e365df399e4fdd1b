"""Reading one trunk, task or bundle that must exist: NotFound says what to do instead."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtreg.artifacts.manifest import folder_hint
from mtreg.errors import NotFound

if TYPE_CHECKING:
    from mtreg.registry.records import BundleRecord, TaskRecord, TrunkRecord
    from mtreg.registry.store import Tx


def require_trunk(tx: Tx, name: str) -> TrunkRecord:
    """Return trunk ``name``.

    Raises:
        NotFound: it is not registered.
    """
    record = tx.get_trunk(name)
    if record is None:
        raise NotFound(
            f"trunk {name!r} is not registered: add it with `mtreg trunk add {name} PATH`"
        )
    return record


def require_task(tx: Tx, name: str) -> TaskRecord:
    """Return task ``name`` (also a removed one).

    Raises:
        NotFound: it was never registered.
    """
    record = tx.get_task(name)
    if record is None:
        raise NotFound(
            f"task {name!r} is not registered: `mtreg list` shows the registered tasks, "
            "`mtreg plugins` the ones plugins offer"
        )
    return record


def require_bundle(tx: Tx, ref: str) -> BundleRecord:
    """Return the bundle named by an alias, a bundle id or a unique id prefix.

    Raises:
        NotFound: nothing by that name (the message lists the aliases).
    """
    record = tx.get_alias(ref) or tx.get_bundle(ref)
    if record is None:
        aliases = ", ".join(sorted(tx.list_aliases())) or "none yet"
        raise NotFound(
            f"no bundle or alias {ref!r}{folder_hint(ref)}: aliases are {aliases}; "
            "`mtreg bundle list` shows bundle ids"
        )
    return record
