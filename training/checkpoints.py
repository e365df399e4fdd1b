"""Saved training runs shared through a remote store: with ``--store s3://...`` every
finished run of an onboarding search is also written to the store, and a machine that has
no copy of a run takes the store's. So a task retried on another machine (a Ray worker
whose node died, ``mtreg onboard --engine ray``) resumes after the runs it had finished.

::

    <prefix>/onboarding/<task>/<version>/<run key>.safetensors   the run's branch, first
    <prefix>/onboarding/<task>/<version>/<run key>.json          its record, last: complete

A run is named by its key (the hash of its data, trunk and recipe), so a key once written
is never replaced (create-only, like every remote write): a second machine finishing the
same run keeps the first copy. Nothing read is trusted: the caller loads the weights
strictly and checks they are finite (:func:`mtreg.training.stages.load_run`), and trains
the run again otherwise. With a local store nothing happens here: the home holds the runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from mtreg.errors import NotFound

if TYPE_CHECKING:
    from mtreg.artifacts.remote import RemoteStore
    from mtreg.training.job import Job

KIND = "onboarding"


def _names(job: Job, key: str) -> tuple[str, str]:
    base = f"{job.spec.name}/{job.spec.version}/{key}"
    return f"{base}.json", f"{base}.safetensors"


def _remote(job: Job) -> RemoteStore | None:
    return job.registry.objects.remote


def push(job: Job, key: str, meta: Path, weights: Path) -> None:
    """Copy the saved run ``key`` (its files ``meta`` and ``weights``) to the remote store,
    weights first; nothing without a remote store.

    Raises:
        StorageError: the store cannot be used.
    """
    remote = _remote(job)
    if remote is None:
        return
    meta_name, weights_name = _names(job, key)
    remote.upload(KIND, weights_name, weights)
    remote.upload(KIND, meta_name, meta)


def pull(job: Job, key: str, meta: Path, weights: Path) -> None:
    """Put the remote store's copy of run ``key`` at ``weights`` and ``meta`` when this
    machine has no saved run of that key (and the store has one); nothing without a remote
    store.

    Raises:
        StorageError: the store cannot be used.
    """
    remote = _remote(job)
    if remote is None or _has_key(meta, key):
        return
    meta_name, weights_name = _names(job, key)
    if not remote.has(KIND, meta_name):
        return
    meta.parent.mkdir(parents=True, exist_ok=True)
    with suppress(NotFound):  # deleted meanwhile (gc): train the run again
        _download(remote, weights_name, weights)
        _download(remote, meta_name, meta)


def _has_key(meta: Path, key: str) -> bool:
    try:
        return json.loads(meta.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _download(remote: RemoteStore, name: str, target: Path) -> None:
    """Download ``name`` next to ``target``, then rename it there (never half a file)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    os.close(fd)
    try:
        remote.download(KIND, name, Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
