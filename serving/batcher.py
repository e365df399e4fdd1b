"""Dynamic micro-batching: a bounded queue of pending requests, a tokeniser thread and an
inference thread.

Each :class:`Pending` is one request's rows, admitted against the bundle that was current
when it arrived. The tokeniser thread takes the oldest, waits at most ``max_wait_ms``
(counted from its arrival) for more to fill ``max_batch_size`` inputs, takes the requests
that came next *for the same bundle*, tokenises them (``encode_rows``: padded to the
longest input, rows grouped into sub-batches of similar length) and hands them to the
inference thread, so the model never waits on Python tokenisation. While a batch runs it
prepares the next one only once that one is full: a batch taken early would be a small
one. After a hot reload the old bundle finishes its requests before the new one starts,
and it is freed when the last of them is done. Inference runs outside the event loop:
torch releases the GIL, so the server keeps accepting requests meanwhile.
"""

from __future__ import annotations

import logging
import queue
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
# Runs rows on a bundle: (bundle, rows, timings, prepared) -> one result per row, storing
# each branch's compute time in timings (``LoadedBundle.run``).
Runner = Callable[[Any, Sequence[Row], dict[str, float], Any], Results]
# Tokenises rows for a bundle: (bundle, rows) -> what the Runner takes as ``prepared``
# (``mtreg.runtime.inference.encode_rows``).
Preparer = Callable[[Any, Sequence[Row]], Any]


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


@dataclass(eq=False)
class Work:
    """A batch of requests taken from the queue, its rows cut into forward passes of at
    most ``max_batch_size`` inputs (``chunks``: rows and what the Preparer made of them),
    or the exception tokenising them raised (``error``)."""

    batch: list[Pending]
    chunks: list[tuple[list[Row], Any]]
    error: BaseException | None = None


class Batcher:
    """The bounded queue and the threads that empty it.

    ``pipeline``: tokenise on a thread of its own while the previous batch runs (else the
    inference thread tokenises each batch before running it).
    """

    def __init__(
        self,
        run: Runner,
        metrics: ServeMetrics,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 512,
        prepare: Preparer | None = None,
        pipeline: bool = True,
    ) -> None:
        self.run = run
        self.prepare: Preparer = prepare or (lambda bundle, rows: None)
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self._pending: deque[Pending] = deque()
        self._queued = 0  # inputs in self._pending
        self._taken = 0  # batches taken from the queue and not yet run
        self._cond = threading.Condition()
        self._stopping = False
        self._ready: queue.SimpleQueue[Work | None] | None = None
        self._threads = [threading.Thread(target=self._infer, name="mtreg-inference", daemon=True)]
        if pipeline:
            self._ready = queue.SimpleQueue()
            self._threads.append(
                threading.Thread(target=self._tokenize, name="mtreg-tokenize", daemon=True)
            )

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        return self._queued

    def start(self) -> None:
        """Start the inference thread (and the tokeniser thread)."""
        for thread in self._threads:
            thread.start()

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
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, finish the queued ones (for at most ``timeout`` seconds), then
        fail whatever is left with ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in reversed(self._threads):  # the tokeniser first: it feeds the other
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._pending)
            self._pending.clear()
            self._queued = 0
        while self._ready is not None and not self._ready.empty():
            work = self._ready.get_nowait()
            left += work.batch if work is not None else []
        for pending in left:
            pending.done(None, ShuttingDown("the server shut down before this request ran"))

    def _may_take(self) -> bool:
        """Whether the tokeniser may take a batch now (called holding the lock): a full one
        while at most one other is running, else only once nothing runs and the oldest
        request has waited ``max_wait`` (or the batcher is stopping)."""
        if not self._pending:
            return False
        if self._queued >= self.max_batch_size and self._taken <= 1:
            return True
        due = time.monotonic() >= self._pending[0].arrived + self.max_wait
        return self._taken == 0 and (due or self._stopping)

    def _take(self) -> list[Pending] | None:
        """Wait for work; return the next batch of requests, or None once stopped and empty."""
        with self._cond:
            while not self._may_take():
                if self._stopping and not self._pending:
                    return None
                left = None
                if self._pending and self._taken == 0:
                    left = max(0.0, self._pending[0].arrived + self.max_wait - time.monotonic())
                self._cond.wait(left)
            first = self._pending.popleft()
            batch, size = [first], len(first.rows)
            while self._pending:
                after = self._pending[0]
                if after.bundle is not first.bundle or size + len(after.rows) > self.max_batch_size:
                    break
                batch.append(self._pending.popleft())
                size += len(after.rows)
            self._queued -= size
            self._taken += 1
            return batch

    def _prepared(self, batch: list[Pending]) -> Work:
        """Cut ``batch``'s rows into forward passes and tokenise each."""
        rows = [row for pending in batch for row in pending.rows]
        size, bundle = self.max_batch_size, batch[0].bundle
        work = Work(batch, [])
        try:
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                work.chunks.append((chunk, self.prepare(bundle, chunk)))
        except Exception as exc:  # the inference thread retries request by request
            work.error = exc
        return work

    def _tokenize(self) -> None:
        assert self._ready is not None
        while (batch := self._take()) is not None:
            self._ready.put(self._prepared(batch))
        self._ready.put(None)

    def _infer(self) -> None:
        while True:
            if self._ready is not None:
                work = self._ready.get()
            else:
                batch = self._take()
                work = None if batch is None else self._prepared(batch)
            if work is None:
                return
            try:
                self._run(work)
            finally:
                with self._cond:
                    self._taken -= 1
                    self._cond.notify_all()

    def _chunks(self, bundle: Any, chunks: list[tuple[list[Row], Any]]) -> Results:
        """Run each forward pass of ``chunks``; return the results in order."""
        out: Results = []
        for rows, prepared in chunks:
            timings: dict[str, float] = {}
            began = time.perf_counter()
            out.extend(self.run(bundle, rows, timings, prepared))
            self.metrics.batch_seconds.observe(time.perf_counter() - began)
            self.metrics.batch_size.observe(len(rows))
            self.metrics.branches_ran(bundle.branches, rows, timings)
        return out

    def _run(self, work: Work) -> None:
        batch = work.batch
        now = time.monotonic()
        rows = [row for pending in batch for row in pending.rows]
        for pending in batch:
            self.metrics.queue_wait.observe(now - pending.arrived)
            pending.batch = len(rows)
        try:
            if work.error is not None:
                raise work.error
            results = self._chunks(batch[0].bundle, work.chunks)
        except Exception:
            if len(batch) == 1:
                self._fail(batch[0])
                return
            # One request broke the batch: run each alone so only that one fails.
            for pending in batch:
                alone = self._prepared([pending])
                try:
                    if alone.error is not None:
                        raise alone.error
                    self._answer(pending, self._chunks(pending.bundle, alone.chunks))
                except Exception:
                    self._fail(pending)
            return
        start = 0
        for pending in batch:
            self._answer(pending, results[start : start + len(pending.rows)])
            start += len(pending.rows)

    def _answer(self, pending: Pending, results: Results) -> None:
        # Counted before the answer is released, so a scrape that follows a response
        # already includes it.
        for row in pending.rows:
            for task in row.tasks:
                self.metrics.task_inputs.labels(task=task).inc()
        pending.done(results, None)

    def _fail(self, pending: Pending) -> None:
        log.exception("inference failed for a request of %d inputs", len(pending.rows))
        self.metrics.failures.inc()
        pending.done(None, RuntimeError("inference failed; see the server log"))
