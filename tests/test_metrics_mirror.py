"""The server's metrics recorded a second time on a mirror (Ray's, under ``--engine ray``:
:class:`mtreg.serving.ray_engine.RayMirror`): every record reaches both with the same
label values, through a real app answering real requests. Ray's own export of them, each
replica tagged, is tests/test_ray_serve.py's."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from factories import Checkpoints
from helpers import SERVING_TASKS, registered_bundle
from prometheus_client.parser import text_string_to_metric_families

from mtreg.serving.metrics import ServeMetrics


class Recorded:
    """One mirror metric: what was recorded on it, per tag set."""

    def __init__(self, kind: str, labels: tuple[str, ...], buckets: tuple = ()) -> None:
        self.kind, self.labels, self.buckets = kind, labels, buckets
        self.values: dict[tuple, list[float]] = defaultdict(list)

    def _record(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.labels), (tags, self.labels)  # every declared tag, only
        assert all(isinstance(v, str) for v in tags.values())
        self.values[tuple(sorted(tags.items()))].append(value)

    inc = observe = set = _record


class Recording:
    """A :class:`~mtreg.serving.metrics.Mirror` that keeps what it was given."""

    def __init__(self) -> None:
        self.metrics: dict[str, Recorded] = {}

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Recorded:
        return self.metrics.setdefault(name, Recorded("counter", labels))

    def histogram(self, name: str, doc: str, buckets: tuple, labels: tuple[str, ...]) -> Recorded:
        return self.metrics.setdefault(name, Recorded("histogram", labels, buckets))

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Recorded:
        return self.metrics.setdefault(name, Recorded("gauge", labels))


def prometheus(metrics: ServeMetrics) -> dict[tuple[str, tuple], float]:
    """Return (sample name, sorted labels) -> value of the Prometheus side."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_every_metric_has_a_mirror_of_its_kind_and_buckets() -> None:
    mirror = Recording()
    metrics = ServeMetrics(mirror)
    families = {f.name: f.type for f in ServeMetrics().registry.collect()}
    assert set(mirror.metrics) == set(families)
    assert {name: m.kind for name, m in mirror.metrics.items()} == families
    assert mirror.metrics["mtreg_serve_batch_size"].buckets == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert metrics.render()  # the Prometheus side renders as before


def test_a_cleared_gauge_goes_to_zero_on_the_mirror() -> None:
    mirror = Recording()
    metrics = ServeMetrics(mirror)
    metrics.serving("a" * 64)
    metrics.serving("b" * 64)
    bundle = mirror.metrics["mtreg_serve_bundle"].values
    assert bundle[(("bundle", "a" * 64),)] == [1, 0]
    assert bundle[(("bundle", "b" * 64),)] == [1]
    on_prometheus = {labels for name, labels in prometheus(metrics) if "bundle" in name}
    assert on_prometheus == {(("bundle", "b" * 64),)}  # Prometheus drops the old series


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Path:
    tmp = tmp_path_factory.mktemp("mirror")
    return registered_bundle(tmp, checkpoints.copy(tmp / "trunk", num_layers=4), SERVING_TASKS[:2])


def test_a_served_request_is_recorded_on_both(bundle_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from mtreg.runtime.bundle import load_bundle
    from mtreg.serving.app import create_app
    from mtreg.serving.config import ServeConfig
    from mtreg.serving.reload import Served

    mirror = Recording()
    served = Served(load_bundle(bundle_dir, backend="torch"), "x" * 64)
    app = create_app(ServeConfig(bundle=str(bundle_dir)), served, mirror=mirror)
    with TestClient(app) as client:
        for _ in range(3):
            assert client.post("/v1/predict", json={"inputs": ["good", "bad"]}).status_code == 200
        assert client.post("/v1/predict", json={"inputs": []}).status_code == 422
        sides = prometheus(app.state.server.metrics)
    requests = mirror.metrics["mtreg_serve_requests"].values
    ok = (("endpoint", "/v1/predict"), ("status", "200"))
    bad = (("endpoint", "/v1/predict"), ("status", "422"))
    assert sum(requests[ok]) == 3 == sides[("mtreg_serve_requests_total", ok)]
    assert sum(requests[bad]) == 1 == sides[("mtreg_serve_requests_total", bad)]
    task = SERVING_TASKS[0][0]
    inputs = mirror.metrics["mtreg_serve_task_inputs"].values[(("task", task),)]
    assert sum(inputs) == 6 == sides[("mtreg_serve_task_inputs_total", (("task", task),))]
    batches = mirror.metrics["mtreg_serve_batch_size"].values[()]
    assert sum(batches) == 6 == sides[("mtreg_serve_batch_size_sum", ())]
    latency: Any = mirror.metrics["mtreg_serve_request_seconds"].values
    assert len(latency[(("endpoint", "/v1/predict"),)]) == 4
