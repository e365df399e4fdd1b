"""``mtreg serve`` through a real server on a free loopback port: endpoints, mixed-task
batching, bad requests, overload, hot reload under load, SIGTERM, and a property-based run
against the OpenAPI spec."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from factories import Checkpoints
from harness import in_thread, start_serve
from helpers import ONE_TEXT_TASKS, SERVING_TASKS, publish_tasks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import load_bundle
from mtreg.serving.app import create_app
from mtreg.serving.config import ServeConfig
from mtreg.serving.plan import plan_rows
from mtreg.serving.reload import Served, load_served

TASKS, ONE_TEXT = SERVING_TASKS, ONE_TEXT_TASKS
TEXTS = [
    "the movie was great",
    "i want a refund for my order now",
    "what",
    "this is not very good but the food was okay",
    "how do i reset my password",
    "slow service and bad price",
]


class Registered:
    """A registry on a tiny 4-layer trunk holding the TASKS, with `serving` set."""

    def __init__(self, tmp: Path, checkpoints: Checkpoints) -> None:
        self.tmp = tmp
        folder = checkpoints.copy(tmp / "trunk", num_layers=4)
        self.checkpoint = read_checkpoint(folder)
        self.url = f"sqlite:///{tmp / 'r.db'}"
        self.home = tmp / "home"
        self.registry = self.open()
        self.registry.add_trunk("tiny", folder)
        self.versions = {name: "1.0.0" for name, *_ in TASKS}
        self.publish()
        self.registry.register(all=True)
        self.registry.set_alias("serving", "latest")

    def open(self) -> Registry:
        """Return a new Registry on the same database and home (one per thread)."""
        registry = Registry(url=self.url, home=self.home)
        registry.plugins_dirs = (self.tmp / "plugins",)
        return registry

    def publish(self, seed: int = 0) -> None:
        """Write the plugin offering every task at its version in ``self.versions``."""
        publish_tasks(self.tmp, self.checkpoint, TASKS, self.versions, seed)
        self.registry.discover(refresh=True)

    def upgrade(self, task: str, version: str, seed: int) -> str:
        """Register a new version of ``task`` (new weights); return the new bundle id."""
        self.versions[task] = version
        self.publish(seed)
        self.registry.register([task])
        return self.registry.bundle("latest").id


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Iterator[Registered]:
    r = Registered(tmp_path_factory.mktemp("serve"), checkpoints)
    yield r
    r.registry.close()


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free loopback port; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    with in_thread(server) as url:
        yield url


@contextmanager
def serving(reg: Registered, follow: bool = False, **options: Any) -> Iterator[str]:
    """A server for the `serving` bundle (following the alias when ``follow``)."""
    config = ServeConfig(bundle="serving", **options)
    with reg.open() as registry:
        served = load_served("serving", None, "torch", registry)
    with running(create_app(config, served, reg.open if follow else None)) as url:
        yield url


@pytest.fixture(scope="module")
def server(reg: Registered) -> Iterator[str]:
    """One batching server shared by the read-only tests."""
    with serving(reg, max_wait_ms=20, max_text_chars=300, max_inputs=16, queue_size=256) as url:
        yield url


# One client for the whole module: a new httpx client builds an SSL context (tens of ms).
HTTP = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64))


def post(url: str, body: Any, timeout: float = 30) -> httpx.Response:
    return HTTP.post(f"{url}/v1/predict", json=body, timeout=timeout)


def close(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """Equal structures, numbers within ``tol`` (padding changes the last float bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, abs_tol=tol)
    return a == b


def metric(url: str, name: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in HTTP.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_endpoints_and_openapi(server: str, reg: Registered) -> None:
    assert HTTP.get(f"{server}/healthz").json() == {"status": "ok", "bundle": None}
    ready = HTTP.get(f"{server}/readyz").json()
    assert ready == {"status": "ready", "bundle": reg.registry.bundle("serving").id}
    tasks = HTTP.get(f"{server}/v1/tasks").json()
    by_name = {t["name"]: t for t in tasks["tasks"]}
    assert sorted(by_name) == sorted(t[0] for t in TASKS)
    assert by_name["paraphrase"]["inputs"] == ["text_a", "text_b"]
    assert by_name["slots"] == {
        "name": "slots",
        "version": "1.0.0",
        "kind": "tagging",
        "labels": ["O", "B-x", "I-x"],
        "inputs": ["text"],
        "fork_depth": 2,
        "max_length": 32,
    }
    spec = HTTP.get(f"{server}/openapi.json").json()
    assert {"/v1/predict", "/v1/tasks", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    response = post(server, {"inputs": ["the movie was great", ["a film", "the movie"]]})
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert sorted(first) == sorted(ONE_TEXT) and sorted(second) == ["paraphrase"]
    assert first["sentiment"]["label"] in ("neg", "pos") and "value" in first["score"]
    assert "spans" in first["slots"] and second["paraphrase"]["label"] in ("no", "yes")
    text = HTTP.get(f"{server}/metrics").text
    assert 'mtreg_serve_requests_total{endpoint="/v1/predict",status="200"}' in text
    for name in ("request_seconds_bucket", "batch_size_bucket", "queue_depth", "task_inputs"):
        assert f"mtreg_serve_{name}" in text


def _mixed_requests() -> list[dict[str, Any]]:
    """Requests asking for different task subsets, texts and pairs, with and without logits."""
    subsets = [["sentiment"], ["score", "slots"], ["topics"], None, ["sentiment", "topics"]]
    requests = []
    for i, text in enumerate(TEXTS * 3):
        tasks = subsets[i % len(subsets)]
        requests.append({"inputs": [text, TEXTS[(i + 1) % len(TEXTS)]], "tasks": tasks})
        if i % 4 == 0:
            requests.append({"inputs": [[text, TEXTS[i % 5]]], "logits": True})
    return requests


@pytest.mark.slow
def test_mixed_task_requests_share_batches_and_match_single_requests(
    server: str, reg: Registered
) -> None:
    requests = _mixed_requests()
    alone = [post(server, body).json() for body in requests]  # one at a time: no sharing
    batches_before = metric(server, "mtreg_serve_batch_size_count")
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda body: post(server, body).json(), requests))
    batches = metric(server, "mtreg_serve_batch_size_count") - batches_before
    assert batches < len(requests) / 2, "concurrent requests should have shared batches"
    for a, b in zip(alone, together, strict=True):
        assert close(a, b), (a, b)
    # ... and both equal the library's own predict on the same bundle.
    bundle = load_bundle(reg.registry.bundle_path("serving"))
    for body, answer in zip(requests, alone, strict=True):
        items = [tuple(i) if isinstance(i, list) else i for i in body["inputs"]]
        tasks = body.get("tasks") or (["paraphrase"] if isinstance(items[0], tuple) else ONE_TEXT)
        expected = bundle.predict(items, tasks=tasks, with_logits=body.get("logits", False))
        assert close(answer["results"], expected), body


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"inputs": ["unterminated', 422, "JSON"),
        (b"not json at all", 422, "JSON"),
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": ["fine"], "tasks": ["nosuch"]}, 422, "unknown task 'nosuch'"),
        ({"inputs": ["fine"], "tasks": []}, 422, "tasks"),
        ({"inputs": [""]}, 422, "inputs"),
        ({"inputs": ["   "]}, 422, "inputs"),
        ({"inputs": ["x" * 301]}, 422, "inputs"),
        ({"inputs": ["x"] * 17}, 422, "inputs"),
        ({"inputs": "a bare string"}, 422, "inputs"),
        ({"inputs": [5]}, 422, "inputs"),
        ({"inputs": [["only one"]]}, 422, "inputs"),
        ({"inputs": [{"text": 3}]}, 422, "inputs"),
        ({"inputs": ["x"], "tasks": "sentiment"}, 422, "tasks"),
        ({"inputs": ["x"], "logits": "yes"}, 422, "logits"),
        ({"inputs": ["x"], "extra": 1}, 422, "extra"),
        ({"inputs": ["a text"], "tasks": ["paraphrase"]}, 422, "reads a pair of texts"),
        ({"inputs": [["a", "b"]], "tasks": ["sentiment"]}, 422, "reads one text"),
        ({"inputs": [{"text_a": "a"}], "tasks": ["paraphrase"]}, 422, "reads a pair"),
        ({"inputs": [{"other": "a"}]}, 422, "no task of this bundle reads"),
        (b'{"inputs": ["\\ud800"]}', 422, "unicode"),
        ([1, 2], 422, "body"),
        (None, 422, "body"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(
    server: str, body: Any, status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = HTTP.post(
        f"{server}/v1/predict", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert message.lower() in response.json()["detail"].lower(), response.text


def test_oversized_body_and_wrong_methods_get_4xx(server: str) -> None:
    huge = json.dumps({"inputs": ["word " * 50] * 20000}).encode()
    response = HTTP.post(
        f"{server}/v1/predict", content=huge, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    # Chunked, so without a Content-Length: the body is counted as it arrives.
    chunked = HTTP.post(
        f"{server}/v1/predict",
        content=(huge[i : i + 65536] for i in range(0, len(huge), 65536)),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413 and "over" in chunked.json()["detail"]
    small = json.dumps({"inputs": ["a good film"]}).encode()
    fine = HTTP.post(
        f"{server}/v1/predict",
        content=iter([small[:5], small[5:]]),
        headers={"content-type": "application/json"},
    )
    assert fine.status_code == 200 and fine.json()["results"]
    assert HTTP.get(f"{server}/v1/predict").status_code == 405
    assert HTTP.get(f"{server}/nothing-here").status_code == 404


def test_overload_gives_503_with_retry_after_not_timeouts(
    reg: Registered, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServeConfig(max_batch_size=1, max_wait_ms=0, queue_size=2, max_inputs=1)
    with reg.open() as registry:
        served = load_served("serving", None, "torch", registry)
    trunk = served.bundle.model.trunk
    slow = trunk.forward

    def slowly(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)  # a busy model: each batch takes 50 ms
        return slow(*args, **kwargs)

    monkeypatch.setattr(trunk, "forward", slowly)
    with running(create_app(config, served)) as url, ThreadPoolExecutor(24) as pool:
        began = time.monotonic()
        body = {"inputs": ["the movie"], "tasks": ["sentiment"]}
        responses = list(pool.map(lambda _: post(url, body, timeout=10), range(48)))
        elapsed = time.monotonic() - began
        rejected = metric(url, "mtreg_serve_rejected_total")
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503}, codes
    assert codes.count(503) == rejected
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "queue is full" in busy.json()["detail"]
    # Rejections are immediate: only the admitted requests' 50 ms batches take time.
    assert elapsed < 0.05 * codes.count(200) + 3


@pytest.mark.slow
def test_hot_reload_under_load_loses_no_request(reg: Registered) -> None:
    old = reg.registry.bundle("serving").id
    body = {"inputs": ["the movie was great", "what"]}
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as session:
            while not stop.is_set() and len(answers) < 3000:
                answers.append(session.post(f"{url}/v1/predict", json=body))

    with serving(reg, follow=True, poll_seconds=0.05, max_wait_ms=2) as url:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        new = reg.upgrade("sentiment", "1.1.0", seed=100)
        assert new != old
        reg.registry.set_alias("serving", new)
        deadline = time.monotonic() + 20
        while not answers or answers[-1].json()["bundle"] != new:
            assert time.monotonic() < deadline, "the server never swapped bundles"
            time.sleep(0.02)
        time.sleep(0.2)
        # A bundle that fails to load leaves the new one serving and shows in /metrics.
        broken = reg.upgrade("sentiment", "1.2.0", seed=200)
        (reg.registry.home.bundle(broken) / "branches/sentiment.safetensors").unlink()
        reg.registry.set_alias("serving", broken)
        deadline = time.monotonic() + 20
        while metric(url, "mtreg_serve_reload_failed") != 1:
            assert time.monotonic() < deadline, "the failed load was not reported"
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join()
        assert metric(url, 'mtreg_serve_reloads_total{result="loaded"}') == 1
        assert metric(url, 'mtreg_serve_reloads_total{result="failed"}') == 1
        assert HTTP.get(f"{url}/readyz").json()["bundle"] == new
        assert post(url, body).json()["bundle"] == new
    reg.registry.set_alias("serving", old)
    assert len(answers) > 20
    assert all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    served_by = [a.json()["bundle"] for a in answers]
    assert served_by[0] == old and served_by[-1] == new and set(served_by) == {old, new}
    # Answers are consistent per bundle: the upgraded task changed, the others did not.
    first = {b: a.json()["results"] for a, b in zip(answers, served_by, strict=True)}
    assert close(first[old][0]["topics"], first[new][0]["topics"])
    assert not close(first[old][0]["sentiment"], first[new][0]["sentiment"], tol=1e-9)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_cleanly(reg: Registered) -> None:
    bundle = str(reg.registry.bundle_path("serving"))
    process, url = start_serve(
        "--bundle", bundle, "--max-batch-size", "4", "--threads", "1", "--log-level", "warning"
    )
    try:
        body = {"inputs": TEXTS * 10}  # 60 inputs in 4-input batches: takes a moment
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(post, url, body) for _ in range(6)]
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        assert codes == [200] * 6
        assert process.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_serve_refuses_a_bundle_it_cannot_load(reg: Registered, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mtreg", "serve", "--bundle", "nosuch-alias"],
        capture_output=True,
        text=True,
        env={**os.environ, "MTREG_DATABASE_URL": reg.url, "MTREG_HOME": str(reg.home)},
        timeout=60,
    )
    assert result.returncode == 1 and "no bundle or alias 'nosuch-alias'" in result.stderr


@pytest.mark.slow
def test_no_request_the_spec_allows_or_forbids_gets_a_500(server: str) -> None:
    # schemathesis' own pytest plugin does not load under pytest 9: drive its Hypothesis
    # strategies directly, valid (positive) and invalid (negative) cases of every operation.
    spec = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in spec.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/tasks", "/metrics"}
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in modes])
    seen: dict[int, int] = {}

    @given(case=cases)
    @settings(
        max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def call(case: Any) -> None:
        response = case.call(timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code == 200 and case.path == "/v1/predict":
            assert len(response.json()["results"]) == len(case.body["inputs"])

    call()
    assert seen.get(200) and seen.get(422), seen  # both valid and invalid requests were made


def test_config_refuses_impossible_limits() -> None:
    with pytest.raises(ValueError, match="exceeds the queue size"):
        ServeConfig(max_inputs=10, queue_size=5)
    with pytest.raises(ValueError):
        replace(ServeConfig(), max_batch_size=0)


def test_served_bundle_ids_are_manifest_hashes(reg: Registered) -> None:
    path = reg.registry.bundle_path("serving")
    assert load_served(str(path), None, "torch").id == reg.registry.bundle("serving").id
    assert isinstance(load_served(str(path), ("sentiment",), "torch"), Served)


@pytest.mark.parametrize("backend", ["onnx", "auto"])
@pytest.mark.slow
def test_onnx_backends_export_a_registry_bundle_once_and_answer_alike(
    reg: Registered, backend: str
) -> None:
    pytest.importorskip("onnxruntime")
    with reg.open() as registry:
        torch_served = load_served("serving", None, "torch", registry)
        onnx_served = load_served("serving", None, backend, registry)
    assert onnx_served.id == torch_served.id
    assert onnx_served.bundle.path.parent == reg.home / "cache" / "onnx"
    rows = plan_rows(torch_served.bundle, [*TEXTS[:3], ["a film", "the movie"]], None, 1000)
    assert close(onnx_served.bundle.run(rows), torch_served.bundle.run(rows))
