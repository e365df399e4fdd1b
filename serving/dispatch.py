"""Queueing planned rows on the batcher and waiting for their results: the one path every
protocol (``/v1``, ``/v2``) takes, so that their requests share micro-batches and get the
same answers. Refusals are raised as :class:`Refused`; each protocol words them its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from mtreg.runtime.inference import Row
from mtreg.serving.access import current_note
from mtreg.serving.batcher import Batcher, Pending, QueueFull, Results, ShuttingDown
from mtreg.serving.config import ServeConfig
from mtreg.serving.metrics import ServeMetrics
from mtreg.serving.plan import answers
from mtreg.serving.reload import Served


class Refused(Exception):
    """The server will not answer now: ``status`` (503, or 500 when inference failed),
    ``str(error)`` says why, ``headers`` go on the response (Retry-After)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.headers = headers


class Host(Protocol):
    """What dispatching needs of the server (``mtreg.serving.app.ServerState`` is one)."""

    config: ServeConfig
    metrics: ServeMetrics
    batcher: Batcher
    served: Served
    draining: bool
    started: bool


def _retry(host: Host) -> dict[str, str]:
    return {"Retry-After": str(host.config.retry_after_s)}


def refuse_if_draining(host: Host) -> None:
    """Raise Refused (503) once the server is shutting down."""
    if host.draining:
        host.metrics.dropped.labels(reason="draining").inc()
        detail = "the server is shutting down; send the request again (to another instance)"
        raise Refused(503, detail, _retry(host))


def task_versions(served: Served, rows: Sequence[Row]) -> dict[str, str]:
    """Return task -> version answering, for the branches ``rows`` run (bundle names only).

    A shadow candidate runs beside its task's stable version, which answers: stable
    branches (named as their task) come last, so their version is the one kept.
    """
    branches, asked = served.bundle.branches, {t for row in rows for t in row.tasks}
    names = sorted(asked, key=lambda name: (branches[name].name == name, name))
    return dict(sorted({branches[n].name: branches[n].version for n in names}.items()))


def count_errors(metrics: ServeMetrics, versions: dict[str, str], reason: str) -> None:
    """Count one failed request for each task version in ``versions``."""
    for task, version in versions.items():
        metrics.task_errors.labels(task=task, version=version, reason=reason).inc()


def _settle(future: asyncio.Future, results: Results | None, error: BaseException | None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable:
    """Return a Pending.done callback that hands the outcome to ``future`` on ``loop``."""

    def done(results: Results | None, error: BaseException | None) -> None:
        # RuntimeError: the loop closed during shutdown, and nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, results, error)

    return done


async def dispatch(host: Host, served: Served, rows: list[Row]) -> Results:
    """Queue ``rows`` (checked by :func:`mtreg.serving.plan.plan_rows`) on bundle
    ``served`` and return their results, one per row; note the request for the access log
    and the per-task metrics.

    Raises:
        Refused: 503 (queue full, shutting down) or 500 (inference failed).
    """
    metrics, note = host.metrics, current_note()
    versions = task_versions(served, rows)
    note.bundle, note.tasks, note.inputs = served.id, versions, len(rows)
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    pending = Pending(served.bundle, rows, _deliver(loop, future))
    began = time.perf_counter()
    try:
        host.batcher.submit(pending)
        for task in versions:
            metrics.task_requests.labels(task=task).inc()
        results = await future
    except QueueFull as exc:
        metrics.rejected.inc()
        reason, error = "queue_full", Refused(503, str(exc), _retry(host))
    except ShuttingDown as exc:
        reason, error = "shutting_down", Refused(503, str(exc), _retry(host))
    except RuntimeError as exc:  # the batcher's word for a failed inference
        reason, error = "failed", Refused(500, str(exc))
    else:
        note.batch = pending.batch
        seconds = time.perf_counter() - began
        for task, version in versions.items():
            metrics.task_seconds.labels(task=task, version=version).observe(seconds)
        return answers(served.bundle, results, metrics, seconds)
    count_errors(metrics, versions, reason)
    raise error
