"""How a server batched during a measurement, from its own ``/metrics``: inputs per
micro-batch and how long requests waited for their batch.

A closed loop of clients keeps a fixed number of requests in flight; time a request
spends on its way to the batcher (a proxy hop) is time it does not wait there, so batches
run smaller. bench/fleet.py shows these beside each engine's throughput.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

BATCH = "mtreg_serve_batch_size"
WAIT = "mtreg_serve_queue_wait_seconds"


def scrape(url: str) -> dict[str, float]:
    """Return the ``_sum`` and ``_count`` of the batch-size and queue-wait histograms
    at ``url``/metrics (one replica's, behind Ray Serve)."""
    import httpx

    return parse(httpx.get(f"{url}/metrics", timeout=30).text)


def parse(text: str) -> dict[str, float]:
    """Return the ``_sum`` and ``_count`` samples of :data:`BATCH` and :data:`WAIT` in
    the Prometheus exposition ``text``."""
    wanted = {f"{name}_{part}" for name in (BATCH, WAIT) for part in ("sum", "count")}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def batching(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Return the mean inputs per batch and the mean queue wait (ms) between two scrapes;
    None where no batch ran."""

    def mean(name: str, scale: float = 1.0) -> float | None:
        count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        return round(scale * total / count, 1) if count else None

    return {"inputs_per_batch": mean(BATCH), "queue_wait_ms": mean(WAIT, 1000.0)}
