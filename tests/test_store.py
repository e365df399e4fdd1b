"""The store on real databases: records in and out, version order, bundle lookups,
savepoints and the write lock."""

from __future__ import annotations

import threading
import time

import pytest

from mtreg.artifacts.manifest import Manifest
from mtreg.errors import MtregError
from mtreg.registry.records import BundleRecord, TaskVersionRecord, TrunkRecord
from mtreg.registry.store import Store

# A manifest of no task: these tests are about ids, members and aliases.
EMPTY_MANIFEST = Manifest.build(
    "tiny", {}, {"layers": []}, {"embeddings": "0" * 64, "layers": [], "tokenizer": {}}, []
)


@pytest.fixture
def store(db_url: str):
    store = Store(db_url)
    with store.transaction(write=True) as tx:
        tx.add_trunk(TrunkRecord("tiny", "bert", 3, {}, {}, {"layers": []}, "/src"))
    yield store
    store.close()


def version(task: str, number: str, **fields) -> TaskVersionRecord:
    values = dict(
        task=task,
        version=number,
        weights_sha256=f"{task}-{number}".ljust(64, "0"),
        fork_depth=1,
        num_layers=1,
        head_kind="classification",
        labels=["a", "b"],
        inputs=["text"],
        max_length=32,
        trunk="tiny",
        trunk_prefix={"depth": 1},
    )
    return TaskVersionRecord(**{**values, **fields})


def test_versions_sort_semantically_and_the_active_one_is_served(store: Store) -> None:
    with store.transaction(write=True) as tx:
        for number in ("1.9.0", "1.10.0", "1.2.0-rc.1", "1.2.0"):
            tx.add_version(version("t", number, description=number))
        tx.set_active("t", "1.2.0")
    with store.transaction() as tx:
        assert [v.version for v in tx.list_versions("t")] == [
            "1.2.0-rc.1",
            "1.2.0",
            "1.9.0",
            "1.10.0",
        ]
        task = tx.get_task("t")
        assert (task.active_version, task.latest_version, task.description) == (
            "1.2.0",
            "1.10.0",
            "1.2.0",
        )
        assert [v.version for v in tx.active_versions("tiny")] == ["1.2.0"]
        assert tx.get_version("t", "1.9.0").labels == ["a", "b"]
    with store.transaction(write=True) as tx:
        tx.set_active("t", None)
    with store.transaction() as tx:
        assert tx.list_tasks() == [] and tx.get_task("t").status == "removed"
        assert [t.name for t in tx.list_tasks(include_removed=True)] == ["t"]


def test_bundles_by_id_prefix_and_alias(store: Store) -> None:
    with store.transaction(write=True) as tx:
        tx.add_version(version("t", "1.0.0"))
        for ident in ("abcdef01" + "0" * 56, "abcdef02" + "0" * 56):
            tx.add_bundle(BundleRecord(ident, "tiny", EMPTY_MANIFEST, {"t": "1.0.0"}))
        tx.set_alias("serving", "abcdef01" + "0" * 56)
    with store.transaction() as tx:
        assert tx.get_bundle("abcdef02").members == {"t": "1.0.0"}
        assert tx.get_bundle("abcde") is None  # too short to be a prefix
        with pytest.raises(MtregError, match="ambiguous"):
            tx.get_bundle("abcdef0")
        assert tx.get_alias("serving").aliases == ["serving"]
        assert tx.get_alias("nosuch") is None
        assert tx.list_aliases() == {"serving": "abcdef01" + "0" * 56}


def test_a_failed_savepoint_undoes_only_itself(store: Store) -> None:
    with store.transaction(write=True) as tx:
        tx.add_version(version("kept", "1.0.0"))
        with pytest.raises(RuntimeError), tx.savepoint():
            tx.add_version(version("lost", "1.0.0"))
            raise RuntimeError
        tx.add_event("probe", "kept", {})
    with store.transaction() as tx:
        assert [t.name for t in tx.list_tasks()] == ["kept"]
        assert [e.kind for e in tx.list_events(subject="kept")] == ["probe"]


def test_a_failed_transaction_writes_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction(write=True) as tx:
        tx.add_version(version("t", "1.0.0"))
        raise RuntimeError
    with store.transaction() as tx:
        assert tx.get_task("t") is None


def test_writers_take_turns(db_url: str, store: Store) -> None:
    """A second writer waits for the first one's commit instead of interleaving."""
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with store.transaction(write=True) as tx:
            holding.set()
            order.append("first begins")
            time.sleep(0.5)
            tx.add_event("first", "", {})
            order.append("first commits")

    other = Store(db_url)
    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    with other.transaction(write=True) as tx:
        order.append("second begins")
        tx.add_event("second", "", {})
    thread.join()
    other.close()
    assert order == ["first begins", "first commits", "second begins"]
