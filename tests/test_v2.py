"""The Open Inference Protocol (``/v2``) beside ``/v1``: tritonclient's HTTP client against
a real server, answers equal to ``/v1`` for every head kind, shared micro-batches, version
URLs, the raw-HTTP refusals, per-task metrics and the access log."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import uvicorn
from factories import Checkpoints
from harness import in_thread, start_serve
from helpers import publish_tasks
from tritonclient.utils import InferenceServerException

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.registry.api import Registry
from mtreg.serving.app import create_app
from mtreg.serving.config import ServeConfig
from mtreg.serving.reload import load_served

# (task, head, fork depth, branch layers, inputs): every head kind, and a pair task.
TASKS = [
    ("sentiment", ("classification", ("neg", "pos")), 2, 1, ("text",)),
    ("topics", ("multilabel", ("a", "b", "c")), 0, 1, ("text",)),
    ("score", ("regression", ()), 3, 0, ("text",)),
    ("slots", ("tagging", ("O", "B-x", "I-x")), 2, 1, ("text",)),
    ("paraphrase", ("classification", ("no", "yes")), 3, 1, ("text_a", "text_b")),
]
# Per task: its outputs as (name, datatype, shape in the metadata).
OUTPUTS = {
    "sentiment": [("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("scores", "FP32", [-1, 2])],
    "topics": [("labels", "BOOL", [-1, 3]), ("scores", "FP32", [-1, 3])],
    "score": [("value", "FP32", [-1, 1])],
    "slots": [("spans", "BYTES", [-1])],
    "paraphrase": [("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("scores", "FP32", [-1, 2])],
}
TEXTS = ["the movie was great", "i want a refund for my order now", "what", "slow bad service"]
PAIRS = [("a man plays", "someone is playing"), ("the cat", "a dog barks loudly")]
MAX_INPUTS = 8
INPUTS = {t[0]: t[4] for t in TASKS}
HEADS = {t[0]: t[1] for t in TASKS}


def build_registry(tmp: Path, checkpoints: Checkpoints) -> tuple[Registry, Any]:
    """A registry on a tiny 4-layer trunk holding the TASKS, `serving` set; and the trunk."""
    folder = checkpoints.copy(tmp / "trunk", num_layers=4)
    registry = Registry(url=f"sqlite:///{tmp / 'r.db'}", home=tmp / "home")
    registry.plugins_dirs = (tmp / "plugins",)
    registry.add_trunk("tiny", folder)
    checkpoint = read_checkpoint(folder)
    publish_tasks(tmp, checkpoint, TASKS, {t[0]: "1.0.0" for t in TASKS})
    registry.discover(refresh=True)
    registry.register(all=True)
    registry.set_alias("serving", "latest")
    return registry, checkpoint


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Iterator[Any]:
    registry, _ = build_registry(tmp_path_factory.mktemp("v2"), checkpoints)
    yield registry
    registry.close()


@contextmanager
def running(registry: Any, **options: Any) -> Iterator[str]:
    """Serve the `serving` bundle under uvicorn in a thread; yield the base URL."""
    served = load_served("serving", None, "torch", registry)
    config = ServeConfig(bundle="serving", poll_seconds=0, **options)
    server = uvicorn.Server(uvicorn.Config(create_app(config, served), log_level="warning"))
    with in_thread(server) as url:
        yield url


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("log") / "access.jsonl"


@pytest.fixture(scope="module")
def server(registry: Any, access_log: Path) -> Iterator[str]:
    """One server shared by the module, writing an access log."""
    options = {"max_wait_ms": 20, "max_inputs": MAX_INPUTS, "max_text_chars": 300}
    with running(registry, access_log=str(access_log), **options) as url:
        yield url


HTTP = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32))


def client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"), concurrency=4)


def v1(url: str, task: str, inputs: list[Any]) -> list[dict[str, Any]]:
    """The /v1 answers of ``task`` for ``inputs``."""
    body = {"inputs": [list(i) if isinstance(i, tuple) else i for i in inputs], "tasks": [task]}
    response = HTTP.post(f"{url}/v1/predict", json=body)
    assert response.status_code == 200, response.text
    return [result[task] for result in response.json()["results"]]


def triton_inputs(task: str, binary: bool) -> tuple[list[triton.InferInput], list[Any]]:
    """tritonclient inputs of a batch for ``task`` and the same inputs as /v1 takes them."""
    names = INPUTS[task]
    items: list[Any] = PAIRS if len(names) == 2 else TEXTS
    columns = [TEXTS] if len(names) == 1 else [list(c) for c in zip(*PAIRS, strict=True)]
    out = []
    for name, column in zip(names, columns, strict=True):
        tensor = triton.InferInput(name, [len(items)], "BYTES")
        tensor.set_data_from_numpy(np.array(column, dtype=np.object_), binary_data=binary)
        out.append(tensor)
    return out, items


def close(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """Equal structures, numbers within ``tol`` (another batch pads differently)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, abs_tol=tol)
    return a == b


def text(element: str | bytes) -> str:
    """A BYTES element as tritonclient gives it: str from JSON data, bytes from binary."""
    return element.decode() if isinstance(element, bytes) else element


def as_v1(task: str, outputs: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    """Rebuild one input's /v1 result from the v2 outputs (the documented mapping)."""
    kind, labels = HEADS[task]
    if kind == "classification":
        label = text(outputs["label"][row])
        scores = outputs["scores"][row].tolist()
        assert math.isclose(scores[labels.index(label)], float(outputs["score"][row]), abs_tol=1e-6)
        assert math.isclose(sum(scores), 1, abs_tol=1e-5)
        return {"label": label, "score": float(outputs["score"][row])}
    if kind == "multilabel":
        chosen = [x for x, on in zip(labels, outputs["labels"][row], strict=True) if on]
        scores = dict(zip(labels, outputs["scores"][row].tolist(), strict=True))
        return {"labels": chosen, "scores": scores}
    if kind == "regression":
        return {"value": float(outputs["value"][row][0])}
    return {"spans": json.loads(text(outputs["spans"][row]))}


def test_health_and_server_metadata_through_tritonclient(server: str) -> None:
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "mtreg" and "binary_tensor_data" in meta["extensions"]
    assert c.is_model_ready("sentiment") and c.is_model_ready("sentiment", "1.0.0")
    assert not c.is_model_ready("nosuch") and not c.is_model_ready("sentiment", "9.9.9")


@pytest.mark.parametrize("task", [t[0] for t in TASKS])
def test_model_metadata_names_inputs_and_outputs_per_head_kind(server: str, task: str) -> None:
    meta = client(server).get_model_metadata(task)
    names = INPUTS[task]
    assert meta["name"] == task and meta["versions"] == ["1.0.0"]
    assert meta["inputs"] == [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in names]
    expected = [{"name": n, "datatype": d, "shape": s} for n, d, s in OUTPUTS[task]]
    assert meta["outputs"] == expected
    assert meta["parameters"]["head_kind"] == HEADS[task][0]
    assert client(server).get_model_metadata(task, "1.0.0") == meta


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("task", [t[0] for t in TASKS])
def test_infer_answers_as_v1_does(server: str, task: str, binary: bool) -> None:
    inputs, items = triton_inputs(task, binary)
    result = client(server).infer(task, inputs, request_id=f"req-{task}")
    response = result.get_response()
    assert response["id"] == f"req-{task}" and response["model_version"] == "1.0.0"
    outputs = {name: result.as_numpy(name) for name, _, _ in OUTPUTS[task]}
    for name, _, shape in OUTPUTS[task]:
        assert list(outputs[name].shape) == [len(items), *shape[1:]], name
    expected = v1(server, task, items)
    got = [as_v1(task, outputs, row) for row in range(len(items))]
    assert close(got, expected), (got, expected)


def test_outputs_filter_and_version_url(server: str) -> None:
    body = {
        "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}],
        "outputs": [{"name": "label"}],
        "parameters": {"key": "user-7"},
    }
    response = HTTP.post(f"{server}/v2/models/sentiment/versions/1.0.0/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [o["name"] for o in answer["outputs"]] == ["label"]
    assert answer["outputs"][0]["shape"] == [2] and answer["model_version"] == "1.0.0"
    assert "id" not in answer and answer["parameters"]["bundle"]


@pytest.mark.slow
def test_v1_and_v2_requests_share_batches_and_agree(server: str) -> None:
    def metric(name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", HTTP.get(f"{server}/metrics").text, re.M)
        return float(match.group(1)) if match else 0.0

    def v2(text: str) -> str:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        answer = HTTP.post(f"{server}/v2/models/sentiment/infer", json=body).json()
        return answer["outputs"][0]["data"][0]

    texts = TEXTS * 4
    before = metric("mtreg_serve_batch_size_count")
    with ThreadPoolExecutor(16) as pool:
        v2_labels = pool.map(v2, texts)
        v1_labels = pool.map(lambda t: v1(server, "sentiment", [t])[0]["label"], texts)
        v2_labels, v1_labels = list(v2_labels), list(v1_labels)
    batches = metric("mtreg_serve_batch_size_count") - before
    assert batches < len(texts), "v1 and v2 requests should have shared micro-batches"
    assert v2_labels == v1_labels


def raw(
    body: Any, headers: dict[str, str] | None = None, path: str = "sentiment/infer"
) -> tuple[bytes, dict[str, str], str]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return content, headers or {}, path


def text_input(data: Any, shape: list[int] | None = None, **more: Any) -> dict[str, Any]:
    shape = [len(data)] if shape is None else shape
    return {"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": data, **more}]}


def binary_body(elements: list[bytes], data: bytes | None = None) -> tuple[bytes, dict[str, str]]:
    """A request whose one input is binary BYTES data: each element a 4-byte length and its
    bytes (or ``data`` as given)."""
    if data is None:
        data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    tensor = {"name": "text", "shape": [len(elements)], "datatype": "BYTES"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}]})
    return header.encode() + data, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        (raw(text_input(["x"]), path="nosuch/infer"), 404, "unknown model 'nosuch'"),
        (raw(text_input(["x"]), path="sentiment/versions/9.9.9/infer"), 404, "no version"),
        (raw({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
         400, "send BYTES"),
        (raw(text_input(["a", "b", "c", "d"], [2, 2])), 400, "shape"),
        (raw(text_input(["a", "b"], [3])), 400, "holds 2 elements"),
        (raw(text_input([["a", ["b"]]], [1])), 400, "nested"),
        (raw(text_input([1])), 400, "not text"),
        (raw(text_input(["x"] * (MAX_INPUTS + 1))), 400, f"at most {MAX_INPUTS}"),
        (raw(text_input([])), 400, "empty batch"),
        (raw(text_input([""])), 400, "input 'text'[0]"),
        (raw(text_input(["x" * 301])), 400, "limit is 300"),
        (raw(b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
             b'"data": ["\\ud800"]}]}'), 400, "invalid request"),
        (raw(b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
             b'"data": ["\xff\xfe"]}]}'), 400, "invalid request"),
        (raw(*binary_body([b"fine", b"\xff\xfe not utf-8"])), 400, "input 'text'[1] is not UTF-8"),
        (raw(binary_body([b"x"])[0], {"Inference-Header-Content-Length": "99999"}), 400,
         "Inference-Header-Content-Length"),
        (raw(binary_body([b"x"])[0][:-2], binary_body([b"x"])[1]), 400, "binary_data_size"),
        (raw(binary_body([b"x"])[0] + b"more", binary_body([b"x"])[1]), 400, "sizes add"),
        (raw(*binary_body([b"x"], struct.pack("<I", 10) + b"abc")), 400, "ends inside element 0"),
        (raw(*binary_body([b"x"], b"\1\0")), 400, "ends inside an element's length"),
        (raw({"inputs": [{"name": "other", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}),
         400, "no input 'other'"),
        (raw({"inputs": [{**text_input(["a"])["inputs"][0], "name": "text_a"}]},
             path="paraphrase/infer"), 400, "missing input 'text_b'"),
        (raw({"inputs": [text_input(["x"])["inputs"][0]] * 2}), 400, "given twice"),
        (raw({**text_input(["x"]), "outputs": [{"name": "logits"}]}), 400, "no output 'logits'"),
        (raw({**text_input(["x"]), "extra": 1}), 400, "extra"),
        (raw({"inputs": []}), 400, "inputs"),
        (raw(text_input(None, [1])), 400, "holds no data"),
        (raw(b"not json"), 400, "invalid request"),
        (raw(b"[1, 2]"), 400, "invalid request"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_4xx_with_an_error_body(
    server: str, request_: tuple[bytes, dict[str, str], str], status: int, message: str
) -> None:
    content, headers, path = request_
    response = HTTP.post(f"{server}/v2/models/{path}", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text


def test_bad_gets_and_methods_answer_an_error_body(server: str) -> None:
    for path, status in [("/v2/models/nosuch", 404), ("/v2/models/sentiment/versions/2", 404),
                         ("/v2/models/nosuch/ready", 404), ("/v2/nothing", 404)]:  # fmt: skip
        response = HTTP.get(f"{server}{path}")
        assert response.status_code == status and response.json()["error"], path
    assert HTTP.get(f"{server}/v2/models/sentiment/infer").status_code == 405
    c = client(server)
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.get_model_metadata("nosuch")


def test_metrics_per_task_version_with_bounded_labels(server: str) -> None:
    HTTP.post(f"{server}/v2/models/topics/infer", json=text_input(["fine", "also fine"]))
    HTTP.post(f"{server}/v2/models/topics/infer", json=text_input([""]))
    for i in range(5):  # made-up model names must not become label values
        HTTP.post(f"{server}/v2/models/made-up-{i}/infer", json=text_input(["x"]))
    text = HTTP.get(f"{server}/metrics").text
    assert 'mtreg_serve_task_request_seconds_count{task="topics",version="1.0.0"}' in text
    assert re.search(
        r'mtreg_serve_task_errors_total\{reason="bad_request",task="topics",version="1.0.0"\} '
        r"[1-9]",
        text,
    )
    assert 'endpoint="/v2/models/{task}/infer"' in text
    assert "made-up" not in text
    # The existing names are still there.
    assert 'mtreg_serve_task_inputs_total{task="topics"}' in text


def test_access_log_writes_one_json_line_per_request(registry: Any, tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    with running(registry, access_log=str(log)) as url:
        HTTP.post(f"{url}/v2/models/sentiment/infer", json=text_input(["a", "b"]))
        HTTP.post(f"{url}/v1/predict", json={"inputs": ["x"], "tasks": ["score", "topics"]})
        HTTP.get(f"{url}/v2/models/nosuch")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3
    infer, predict, missing = lines
    assert infer["method"] == "POST" and infer["path"] == "/v2/models/sentiment/infer"
    assert infer["status"] == 200 and infer["tasks"] == {"sentiment": "1.0.0"}
    assert infer["inputs"] == 2 and infer["batch"] >= 2 and len(infer["bundle"]) == 64
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", infer["time"])
    assert infer["ms"] > 0 and infer["client"].startswith("127.0.0.1:")
    assert predict["tasks"] == {"score": "1.0.0", "topics": "1.0.0"}
    assert missing["status"] == 404 and missing["tasks"] == {} and missing["bundle"] is None


@pytest.mark.slow
def test_real_serve_speaks_v2_and_logs_to_stderr(registry: Any) -> None:
    process, url = start_serve(
        "--bundle", str(registry.bundle_path("serving")), "--threads", "1",
        "--access-log", "-", "--log-level", "warning",
    )  # fmt: skip
    try:
        inputs, items = triton_inputs("paraphrase", binary=True)
        result = client(url).infer("paraphrase", inputs)
        assert result.as_numpy("label").shape == (len(items),)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(e["path"] == "/v2/models/paraphrase/infer" and e["status"] == 200 for e in logged)


@pytest.mark.slow
def test_serve_refuses_an_access_log_it_cannot_open(registry: Any, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mtreg", "serve", "--bundle", str(registry.bundle_path("serving")),
         "--access-log", str(tmp_path / "no" / "such" / "dir.log")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot open access log" in result.stderr


@pytest.mark.slow
def test_a_task_with_two_versions_answers_each_by_its_url(
    tmp_path: Path, checkpoints: Checkpoints
) -> None:
    registry, checkpoint = build_registry(tmp_path, checkpoints)
    versions = {t[0]: "1.0.0" for t in TASKS} | {"sentiment": "2.0.0"}
    publish_tasks(tmp_path, checkpoint, TASKS, versions, seed=100)  # new weights
    registry.discover(refresh=True)
    registry.register(["sentiment"])
    registry.rollback("sentiment", "1.0.0")
    registry.release("sentiment", "2.0.0", canary=0)  # only pinned requests reach 2.0.0
    with running(registry) as url:
        c = client(url)
        assert c.get_model_metadata("sentiment")["versions"] == ["1.0.0", "2.0.0"]
        assert c.is_model_ready("sentiment", "2.0.0") and not c.is_model_ready("sentiment", "3")
        answers = {}
        for version in ("1.0.0", "2.0.0"):
            inputs, items = triton_inputs("sentiment", binary=False)
            result = c.infer("sentiment", inputs, model_version=version)
            response = result.get_response()
            assert response["model_version"] == version
            assert response["parameters"]["versions"] == [version] * len(items)
            outputs = {name: result.as_numpy(name) for name, _, _ in OUTPUTS["sentiment"]}
            answers[version] = [as_v1("sentiment", outputs, i) for i in range(len(items))]
            body = {"inputs": items, "tasks": ["sentiment"], "versions": {"sentiment": version}}
            pinned = HTTP.post(f"{url}/v1/predict", json=body).json()["results"]
            expected = [{k: v for k, v in r["sentiment"].items() if k != "version"} for r in pinned]
            assert close(answers[version], expected)
        assert not close(answers["1.0.0"], answers["2.0.0"], tol=1e-9)
        path = f"{url}/v2/models/sentiment/versions/3.0.0/infer"
        missing = HTTP.post(path, json=text_input(["x"]))
        assert missing.status_code == 404 and "1.0.0, 2.0.0" in missing.json()["error"]
        text = HTTP.get(f"{url}/metrics").text
        assert 'mtreg_serve_task_request_seconds_count{task="sentiment",version="2.0.0"}' in text
    registry.close()
