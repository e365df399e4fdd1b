"""Prometheus metrics of one server, in a registry of its own (several apps can live in
one process, as in the tests), optionally recorded a second time on a :class:`Mirror`:
under ``--engine ray`` Ray's metrics, which each node exports with the replica's id as a
tag, so that every replica's series can be scraped while ``/metrics`` through Serve's
proxy is whichever replica answered."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mtreg.artifacts.manifest import TaskEntry
from mtreg.runtime.inference import Row

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A small branch on a small batch computes in well under a millisecond.
BRANCH_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFIX = "mtreg_serve_"


class Mirror(Protocol):
    """Where a server's metrics are also recorded. Each factory returns a metric of that
    kind which records with ``inc(value, tags=...)``, ``observe(value, tags=...)`` or
    ``set(value, tags=...)``, the label values as ``tags``."""

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Any: ...

    def histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...]
    ) -> Any: ...

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Any: ...


class Mirrored:
    """A prometheus_client metric, or one of its labelled children, whose every record is
    made on a mirror metric too. A gauge's ``clear()`` sets each series it had to 0 on the
    mirror (a mirror cannot drop a series); ``set_function`` stays Prometheus's only."""

    def __init__(self, metric: Any, mirror: Any, tags: dict[str, str] | None = None) -> None:
        self._metric, self._mirror, self._tags = metric, mirror, tags or {}
        self._children: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    def labels(self, **values: str) -> Mirrored:
        """Return the child of these label values (given by name, as every caller does)."""
        tags = {k: str(v) for k, v in values.items()}
        self._children[tuple(sorted(tags.items()))] = tags
        return Mirrored(self._metric.labels(**tags), self._mirror, tags)

    def inc(self, amount: float = 1) -> None:
        self._metric.inc(amount)
        if amount > 0:
            self._mirror.inc(amount, tags=self._tags)

    def observe(self, value: float) -> None:
        self._metric.observe(value)
        self._mirror.observe(value, tags=self._tags)

    def set(self, value: float) -> None:
        self._metric.set(value)
        self._mirror.set(value, tags=self._tags)

    def set_function(self, function: Callable[[], float]) -> None:
        self._metric.set_function(function)

    def clear(self) -> None:
        self._metric.clear()
        for tags in self._children.values():
            self._mirror.set(0, tags=tags)
        self._children.clear()


class ServeMetrics:
    """The server's counters, histograms and gauges (names start with :data:`PREFIX`),
    each also recorded on ``mirror`` when one is given."""

    def __init__(self, mirror: Mirror | None = None) -> None:
        self.registry = CollectorRegistry()
        self.mirror = mirror
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

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        metric = Counter(f"{PREFIX}{name}", doc, labels, registry=self.registry)
        if self.mirror is None:
            return metric
        return Mirrored(metric, self.mirror.counter(f"{PREFIX}{name}", doc, labels))

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> Any:
        metric = Histogram(f"{PREFIX}{name}", doc, labels, buckets=buckets, registry=self.registry)
        if self.mirror is None:
            return metric
        return Mirrored(metric, self.mirror.histogram(f"{PREFIX}{name}", doc, buckets, labels))

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        metric = Gauge(f"{PREFIX}{name}", doc, labels, registry=self.registry)
        if self.mirror is None:
            return metric
        return Mirrored(metric, self.mirror.gauge(f"{PREFIX}{name}", doc, labels))

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
