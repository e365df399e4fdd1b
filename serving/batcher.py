"""Dynamic micro-batching: a bounded queue of pending requests and one inference thread.

Each :class:`Pending` is one request's rows, admitted against the bundle that was current
when it arrived. The thread takes the oldest, waits at most ``max_wait_ms`` (counted from
its arrival) for more to fill ``max_batch_size`` inputs, and runs the requests that came
next *for the same bundle* together: after a hot reload the old bundle finishes its
requests before the new one starts, and it is freed when the last of them is done.
Inference runs outside the event loop: torch releases the GIL, so the server keeps
accepting requests meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtreg.runtime.inference import Row
from mtreg.serving.metrics import ServeMetrics

log = logging.getLogger("mtreg.serving")

Results = list[dict[str, Any]]
# Runs rows on a bundle: (bundle, rows, timings) -> one result per row, storing each
# branch's compute time in timings (``LoadedBundle.run``).
Runner = Callable[[Any, Sequence[Row], dict[str, float]], Results]


class QueueFull(Exception):
    """The queue holds ``queue_size`` inputs already: try again later (HTTP 503)."""


class ShuttingDown(Exception):
    """The server is draining and takes no new work (HTTP 503)."""


@dataclass(eq=False)
class Pending:
    """One queued request: its rows and where to deliver their results.

    ``done(results, error)`` is called once, from the inference thread, with either the
    results (one per row) or the exception that stopped them.
    """

    bundle: Any
    rows: list[Row]
    done: Callable[[Results | None, BaseException | None], None]
    arrived: float = field(default_factory=time.monotonic)
    batch: int = 0  # inputs of the micro-batch(es) it ran in, set before ``done``


class Batcher:
    """The bounded queue and the thread that empties it."""

    def __init__(
        self,
        run: Runner,
        metrics: ServeMetrics,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 512,
    ) -> None:
        self.run = run
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self._pending: deque[Pending] = deque()
        self._queued = 0  # inputs in self._pending
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mtreg-inference", daemon=True)

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        return self._queued

    def start(self) -> None:
        """Start the inference thread."""
        self._thread.start()

    def submit(self, pending: Pending) -> None:
        """Queue ``pending``.

        Raises:
            QueueFull: it does not fit in the queue. ShuttingDown: the batcher is stopping.
        """
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._queued + len(pending.rows) > self.queue_size:
                raise QueueFull(
                    f"the queue is full ({self._queued} of {self.queue_size} inputs waiting)"
                )
            self._pending.append(pending)
            self._queued += len(pending.rows)
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, finish the queued ones (for at most ``timeout`` seconds), then
        fail whatever is left with ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left = list(self._pending)
            self._pending.clear()
            self._queued = 0
        for pending in left:
            pending.done(None, ShuttingDown("the server shut down before this request ran"))

    def _take(self) -> list[Pending] | None:
        """Wait for work; return the next batch of requests, or None once stopped and empty."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = first.arrived + self.max_wait
            while self._queued < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._pending.popleft()]
            size = len(first.rows)
            while self._pending:
                after = self._pending[0]
                if after.bundle is not first.bundle or size + len(after.rows) > self.max_batch_size:
                    break
                batch.append(self._pending.popleft())
                size += len(after.rows)
            self._queued -= size
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _chunks(self, bundle: Any, rows: list[Row]) -> Results:
        """Run ``rows`` in forward passes of at most ``max_batch_size`` inputs."""
        out: Results = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            timings: dict[str, float] = {}
            began = time.perf_counter()
            out.extend(self.run(bundle, chunk, timings))
            self.metrics.batch_seconds.observe(time.perf_counter() - began)
            self.metrics.batch_size.observe(len(chunk))
            self.metrics.branches_ran(bundle.branches, chunk, timings)
        return out

    def _run(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        rows = [row for pending in batch for row in pending.rows]
        for pending in batch:
            self.metrics.queue_wait.observe(now - pending.arrived)
            pending.batch = len(rows)
        try:
            results = self._chunks(batch[0].bundle, rows)
        except Exception:
            if len(batch) == 1:
                self._fail(batch[0])
                return
            # One request broke the batch: run each alone so only that one fails.
            for pending in batch:
                try:
                    pending.done(self._chunks(pending.bundle, pending.rows), None)
                except Exception:
                    self._fail(pending)
            return
        start = 0
        for pending in batch:
            pending.done(results[start : start + len(pending.rows)], None)
            start += len(pending.rows)
        for row in rows:
            for task in row.tasks:
                self.metrics.task_inputs.labels(task=task).inc()

    def _fail(self, pending: Pending) -> None:
        log.exception("inference failed for a request of %d inputs", len(pending.rows))
        self.metrics.failures.inc()
        pending.done(None, RuntimeError("inference failed; see the server log"))
