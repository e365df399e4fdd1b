"""Prometheus metrics of one server, in a registry of its own (several apps can live in
one process, as in the tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The server's counters, histograms and gauges (names start with ``mtreg_serve_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mtreg_serve_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mtreg_serve_request_seconds",
            "HTTP request latency by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.task_inputs = Counter(
            "mtreg_serve_task_inputs", "Inputs answered, per task.", ["task"], registry=r
        )
        self.task_requests = Counter(
            "mtreg_serve_task_requests",
            "Predict requests asking for a task.",
            ["task"],
            registry=r,
        )
        self.batch_size = Histogram(
            "mtreg_serve_batch_size",
            "Inputs per micro-batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "mtreg_serve_batch_seconds",
            "Inference time per micro-batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mtreg_serve_queue_wait_seconds",
            "Time a request waited before its batch ran.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "mtreg_serve_rejected",
            "Requests refused with 503 because the queue was full.",
            registry=r,
        )
        self.failures = Counter(
            "mtreg_serve_inference_failures", "Requests whose inference raised.", registry=r
        )
        self.reloads = Counter(
            "mtreg_serve_reloads",
            "Hot reload attempts by result (loaded, failed).",
            ["result"],
            registry=r,
        )
        self.reload_failed = Gauge(
            "mtreg_serve_reload_failed",
            "1 while the alias names a bundle that failed to load (the old one serves).",
            registry=r,
        )
        self.poll_errors = Counter(
            "mtreg_serve_poll_errors", "Registry look-ups of the alias that failed.", registry=r
        )
        self.bundle = Gauge(
            "mtreg_serve_bundle", "1 for the bundle being served.", ["bundle"], registry=r
        )
        self.queue_depth = Gauge(
            "mtreg_serve_queue_depth", "Inputs waiting for a batch.", registry=r
        )

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the queue depth at every scrape."""
        self.queue_depth.set_function(depth)

    def serving(self, bundle_id: str) -> None:
        """Mark ``bundle_id`` as the bundle being served (and no other)."""
        self.bundle.clear()
        self.bundle.labels(bundle=bundle_id).set(1)

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
