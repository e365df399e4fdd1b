"""Prometheus metrics of one server, in a registry of its own (several apps can live in
one process, as in the tests)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mtreg.artifacts.manifest import TaskEntry
from mtreg.runtime.inference import Row

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A small branch on a small batch computes in well under a millisecond.
BRANCH_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFIX = "mtreg_serve_"


class ServeMetrics:
    """The server's counters, histograms and gauges (names start with :data:`PREFIX`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        http, task = ("endpoint", "status"), ("task",)
        self.requests = self._counter("requests", "HTTP requests by endpoint and status.", http)
        self.latency = self._histogram(
            "request_seconds", "HTTP request latency by endpoint.", LATENCY_BUCKETS, ("endpoint",)
        )
        self.task_inputs = self._counter("task_inputs", "Inputs answered, per task.", task)
        self.task_requests = self._counter(
            "task_requests", "Predict requests asking for a task.", task
        )
        self.batch_size = self._histogram("batch_size", "Inputs per micro-batch.", BATCH_BUCKETS)
        self.batch_seconds = self._histogram(
            "batch_seconds", "Inference time per micro-batch.", LATENCY_BUCKETS
        )
        self.queue_wait = self._histogram(
            "queue_wait_seconds", "Time a request waited before its batch ran.", LATENCY_BUCKETS
        )
        self.rejected = self._counter(
            "rejected", "Requests refused with 503 because the queue was full."
        )
        self.failures = self._counter("inference_failures", "Requests whose inference raised.")
        self.reloads = self._counter(
            "reloads", "Hot reload attempts by result (loaded, failed).", ("result",)
        )
        self.reload_failed = self._gauge(
            "reload_failed",
            "1 while the alias names a bundle that failed to load (the old one serves).",
        )
        self.poll_errors = self._counter(
            "poll_errors", "Registry look-ups of the alias that failed."
        )
        self.bundle = self._gauge("bundle", "1 for the bundle being served.", ("bundle",))
        self.dropped = self._counter(
            "dropped",
            "Requests refused or connections closed by the server's limits, by reason "
            "(header_timeout, header_too_large, body_timeout, connection_limit, draining).",
            ("reason",),
        )
        self.queue_depth = self._gauge("queue_depth", "Inputs waiting for a batch.")
        self.access_dropped = self._counter(
            "access_log_dropped", "Access log lines dropped because the writer fell behind."
        )
        self._declare_per_version()

    def _declare_per_version(self) -> None:
        # Task and version labels come from the served bundle only, never from a request,
        # so that a client naming made-up tasks cannot grow the number of series.
        version = ("task", "version")
        self.task_seconds = self._histogram(
            "task_request_seconds",
            "Time from queueing to answer of requests asking a task, per task version.",
            LATENCY_BUCKETS,
            version,
        )
        self.task_errors = self._counter(
            "task_errors",
            "Requests asking a task that failed, per task version and reason "
            "(bad_request, queue_full, shutting_down, failed).",
            (*version, "reason"),
        )
        self.shadow_rows = self._counter(
            "shadow_rows",
            "Rows a shadow candidate answered beside the stable version, per task, candidate "
            "version and whether the answers agreed (true, false).",
            (*version, "agree"),
        )
        self.branch_seconds = self._histogram(
            "branch_seconds",
            "Compute time of a task version's branch in one micro-batch (torch backend), "
            "for stable and candidate versions alike.",
            BRANCH_BUCKETS,
            version,
        )
        self.branch_rows = self._counter(
            "branch_rows", "Rows a task version's branch ran on (torch backend).", version
        )

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"{PREFIX}{name}", doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> Histogram:
        return Histogram(f"{PREFIX}{name}", doc, labels, buckets=buckets, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"{PREFIX}{name}", doc, labels, registry=self.registry)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the queue depth at every scrape."""
        self.queue_depth.set_function(depth)

    def serving(self, bundle_id: str) -> None:
        """Mark ``bundle_id`` as the bundle being served (and no other)."""
        self.bundle.clear()
        self.bundle.labels(bundle=bundle_id).set(1)

    def branches_ran(
        self, branches: Mapping[str, TaskEntry], rows: Sequence[Row], timings: Mapping[str, float]
    ) -> None:
        """Observe each branch's compute time in ``timings`` (branch name -> seconds, from
        one micro-batch of ``rows``) and count the rows it ran on, labelled by the task and
        version ``branches`` names for it."""
        for name, seconds in timings.items():
            entry = branches[name]
            labels = {"task": entry.name, "version": entry.version}
            self.branch_seconds.labels(**labels).observe(seconds)
            self.branch_rows.labels(**labels).inc(sum(name in row.tasks for row in rows))

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
