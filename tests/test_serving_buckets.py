"""Less waste per request: padding only to the longest input, length-bucketed sub-batches,
tokenisation on a thread of its own, and inference threads from the cores the process may
use. Every answer must be what the plain path (one sub-batch, tokenised inline) gives."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from factories import Checkpoints
from harness import in_thread
from helpers import ONE_TEXT_TASKS, SERVING_TASKS, registered_bundle

from mtreg.runtime.bundle import LoadedBundle, load_bundle
from mtreg.runtime.inference import Row, encode_rows, length_buckets
from mtreg.serving.app import create_app
from mtreg.serving.batcher import Batcher, Pending
from mtreg.serving.config import ServeConfig
from mtreg.serving.metrics import ServeMetrics
from mtreg.serving.reload import load_served
from mtreg.serving.server import cgroup_cpus, usable_cores

TASKS, ONE_TEXT = SERVING_TASKS, ONE_TEXT_TASKS
# Lengths from 1 word to past the tasks' max_length (32 tokens), so buckets form.
TEXTS = [
    "what",
    "the movie was great",
    "i want a refund for my order now because it never came and nobody answers",
    "ok",
    " ".join(["this film is long and slow and the plot goes nowhere at all"] * 4),
    "how do i reset my password",
    "bad",
    "slow service and bad price but the food was fine and the staff were kind",
]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Path:
    tmp = tmp_path_factory.mktemp("buckets")
    return registered_bundle(tmp, checkpoints.copy(tmp / "trunk", num_layers=4), TASKS)


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> LoadedBundle:
    return load_bundle(bundle_dir, backend="torch")


def close(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """Equal structures, numbers within ``tol`` (a different batch changes the last bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, abs_tol=tol)
    return a == b


def mixed_rows(tasks: list[str] | None = None) -> list[Row]:
    """Rows of every length, each asking for a different subset of ``tasks`` (default: a
    mix of one-text tasks and pairs), half of them with logits."""
    rows = []
    for i, text in enumerate(TEXTS * 2):
        if tasks is None:
            asked = ("paraphrase",) if i % 5 == 4 else tuple(ONE_TEXT[: 1 + i % 4])
        else:
            asked = tuple(tasks[: 1 + i % len(tasks)])
        item: Any = (text, TEXTS[(i + 3) % len(TEXTS)]) if asked == ("paraphrase",) else text
        rows.append(Row(item, asked, logits=i % 2 == 0))
    return rows


class Recording:
    """Wraps a bundle's model to record what each call received (and on which thread)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: list[dict[str, Any]] = []

    def __call__(self, input_ids, attention_mask, token_type_ids=None, **kw) -> Any:
        self.calls.append(
            {"mask": attention_mask.clone(), "thread": threading.current_thread().name}
        )
        return self.model(input_ids, attention_mask, token_type_ids, **kw)


@pytest.fixture
def recorded(bundle: LoadedBundle) -> Iterator[Recording]:
    recording = Recording(bundle.model)
    bundle.model = recording
    try:
        yield recording
    finally:
        bundle.model = recording.model


def test_length_buckets_split_by_length_and_keep_every_row() -> None:
    assert length_buckets([]) == []
    assert length_buckets([7]) == [[0]]
    assert length_buckets([9, 9, 9]) == [[0, 1, 2]]
    lengths = [5, 120, 6, 118, 5, 119, 7, 121]
    buckets = length_buckets(lengths, overhead=64)
    assert buckets == [[0, 4, 2, 6], [3, 5, 1, 7]]
    # A large overhead keeps one batch; none splits wherever the length changes.
    assert length_buckets(lengths, overhead=10_000) == [[0, 4, 2, 6, 3, 5, 1, 7]]
    assert len(length_buckets(lengths, overhead=0)) == 7
    for overhead in (0, 16, 64, 1000):
        split = length_buckets(lengths, overhead)
        assert sorted(i for b in split for i in b) == list(range(len(lengths)))
        cost = sum(overhead + len(b) * max(lengths[i] for i in b) for b in split)
        assert cost <= overhead + len(lengths) * max(lengths)


def test_encode_pads_only_to_the_longest_input(bundle: LoadedBundle) -> None:
    rows = [Row(text, ("sentiment",)) for text in TEXTS[:4]]
    (group,) = encode_rows(bundle, rows)
    mask = group.encoded["batch"]["attention_mask"]
    longest = max(
        len(bundle.tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in TEXTS[:4]
    )
    assert mask.shape[1] == longest < 32
    assert bool(mask.any(0).all()), "a column of padding only"


def test_each_sub_batch_is_cut_to_its_own_longest_row(
    bundle: LoadedBundle, recorded: Recording
) -> None:
    rows = [Row(text, ("sentiment", "topics")) for text in TEXTS * 4]
    (group,) = encode_rows(bundle, rows)
    assert len(group.buckets) > 1, "mixed lengths should split"
    bundle.run(rows, encoded=[group])
    assert len(recorded.calls) == len(group.buckets)
    lengths = group.encoded["batch"]["attention_mask"].sum(1).tolist()
    for call, bucket in zip(recorded.calls, group.buckets, strict=True):
        assert call["mask"].shape == (len(bucket), max(lengths[i] for i in bucket))
        assert bool(call["mask"].any(0).all()), "padding beyond the sub-batch's longest row"


@pytest.mark.parametrize(
    "tasks",
    [None, ["sentiment"], ["topics"], ["score"], ["slots"], ["slots", "sentiment", "score"]],
    ids=["mixed", "classification", "multilabel", "regression", "tagging", "three"],
)
def test_bucketed_answers_equal_the_plain_path(bundle: LoadedBundle, tasks: list[str]) -> None:
    rows = mixed_rows(tasks)
    plain = bundle.run(rows, encoded=encode_rows(bundle, rows, buckets=False))
    prepared = encode_rows(bundle, rows)
    assert any(len(g.buckets) > 1 for g in prepared)
    assert close(bundle.run(rows, encoded=prepared), plain)
    # ... and each row alone (no padding at all) answers the same.
    alone = [bundle.run([row])[0] for row in rows]
    assert close(alone, plain)


class Request:
    """A queued request and its answer (results, or the exception that stopped them)."""

    def __init__(self, bundle: LoadedBundle, rows: list[Row]) -> None:
        self.rows = rows
        self.answer: Any = None
        self.answered = threading.Event()
        self.pending = Pending(bundle, rows, self.deliver)

    def deliver(self, results: Any, error: BaseException | None) -> None:
        self.answer = error or results
        self.answered.set()

    def wait(self) -> Any:
        assert self.answered.wait(30), "no answer"
        return self.answer


@pytest.mark.parametrize("pipeline", [True, False], ids=["tokenizer-thread", "inline"])
def test_batcher_answers_each_request_its_own_rows_in_order(
    bundle: LoadedBundle, recorded: Recording, pipeline: bool
) -> None:
    tokenised_on: list[str] = []

    def prepare(b: Any, rows: Any) -> Any:
        tokenised_on.append(threading.current_thread().name)
        return encode_rows(b, rows)

    batcher = Batcher(
        LoadedBundle.run, ServeMetrics(), 8, 20, 512, prepare=prepare, pipeline=pipeline
    )
    batcher.start()
    rows = mixed_rows()
    requests = [Request(bundle, rows[i : i + 1 + i % 3]) for i in range(0, len(rows), 2)]
    for request in requests:
        batcher.submit(request.pending)
    answers = [request.wait() for request in requests]
    batcher.stop()
    assert {call["thread"] for call in recorded.calls} == {"mtreg-inference"}
    for request, answer in zip(requests, answers, strict=True):
        expected = bundle.run(
            request.rows, encoded=encode_rows(bundle, request.rows, buckets=False)
        )
        assert close(answer, expected)
    assert max(r.pending.batch for r in requests) > 3, "requests should have shared batches"
    thread = "mtreg-tokenize" if pipeline else "mtreg-inference"
    assert set(tokenised_on) == {thread}


def test_answered_inputs_are_counted_before_each_answer_and_a_failed_one_is_not(
    bundle: LoadedBundle,
) -> None:
    metrics = ServeMetrics()

    def counted() -> float | None:
        return metrics.registry.get_sample_value(
            "mtreg_serve_task_inputs_total", {"task": "sentiment"}
        )

    def run(b: Any, rows: Any, timings: Any, prepared: Any) -> Any:
        if any(row.item == "boom" for row in rows):
            raise ValueError("a broken input")
        return LoadedBundle.run(b, rows, timings, prepared)

    # One batch of all four requests; "boom" breaks it, so each then runs alone.
    batcher = Batcher(run, metrics, 8, 200, 512, prepare=lambda b, rows: encode_rows(b, rows))
    requests = [
        Request(bundle, [Row(t, ("sentiment",)) for t in texts])
        for texts in (TEXTS[:2], ["boom"], TEXTS[2:3], TEXTS[3:6])
    ]
    seen_at_answer = []
    for request in requests:
        deliver = request.pending.done

        def done(results: Any, error: Any, deliver: Any = deliver) -> None:
            seen_at_answer.append(counted())
            deliver(results, error)

        request.pending.done = done
        batcher.submit(request.pending)
    batcher.start()
    answers = [request.wait() for request in requests]
    batcher.stop()
    assert {r.pending.batch for r in requests} == {7}, "the four requests shared one batch"
    assert isinstance(answers[1], BaseException)
    assert [len(a) for i, a in enumerate(answers) if i != 1] == [2, 1, 3]
    # Each request's inputs were counted before its answer was released.
    assert seen_at_answer == [2, 2, 3, 6]
    assert counted() == 6


def test_the_next_full_batch_is_tokenised_while_one_runs_and_a_partial_one_waits(
    bundle: LoadedBundle,
) -> None:
    events: list[tuple[str, float]] = []

    def slow_run(b: Any, rows: Any, timings: Any, prepared: Any) -> Any:
        events.append(("run", time.monotonic()))
        time.sleep(0.3)  # a long forward pass, so the overlap shows
        out = LoadedBundle.run(b, rows, timings, prepared)
        events.append(("ran", time.monotonic()))
        return out

    def prepare(b: Any, rows: Any) -> Any:
        events.append(("tokenise", time.monotonic()))
        return encode_rows(b, rows)

    batcher = Batcher(slow_run, ServeMetrics(), 4, 1, 512, prepare=prepare)
    batcher.start()
    full = [Request(bundle, [Row(t, ("sentiment",))]) for t in TEXTS]  # 2 batches
    for request in full:
        batcher.submit(request.pending)
    time.sleep(0.1)  # the first batch runs; single rows arrive meanwhile
    late = [Request(bundle, [Row(t, ("topics",))]) for t in TEXTS[:3]]
    for request in late:
        batcher.submit(request.pending)
        time.sleep(0.02)
    answers = [request.wait() for request in full + late]
    batcher.stop()
    kinds = [kind for kind, _ in events]
    # The second full batch was tokenised before the first finished running.
    assert kinds[: kinds.index("ran")].count("tokenise") == 2, kinds
    # The late single rows waited for the model to be free, then ran as one batch of 3.
    assert {r.pending.batch for r in late} == {3}
    assert not any(isinstance(answer, BaseException) for answer in answers)


def test_responses_through_the_server_keep_their_order(bundle_dir: Path) -> None:
    config = ServeConfig(bundle=str(bundle_dir), max_wait_ms=30, max_inputs=16)
    served = load_served(str(bundle_dir), None, "torch")
    app = create_app(config, served, None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    bodies = [
        {
            "inputs": [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 4)],
            "tasks": ONE_TEXT[i % 4 :],
        }
        for i in range(16)
    ]
    with (
        in_thread(server) as url,
        httpx.Client(timeout=30) as client,
        ThreadPoolExecutor(len(bodies)) as pool,
    ):
        answers = list(pool.map(lambda b: client.post(f"{url}/v1/predict", json=b), bodies))
    plain = load_bundle(bundle_dir, backend="torch")
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        rows = [Row(text, tuple(body["tasks"])) for text in body["inputs"]]
        expected = plain.run(rows, encoded=encode_rows(plain, rows, buckets=False))
        assert close(answer.json()["results"], expected), body


def _threads_under(cores: str) -> int:
    code = "from mtreg.serving.server import set_threads; print(set_threads(None))"
    out = subprocess.run(
        ["taskset", "-c", cores, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,  # a pinned interpreter importing torch on a busy machine
    )
    return int(out.stdout.strip())


@pytest.mark.slow
def test_threads_follow_the_cpu_affinity_of_the_process() -> None:
    assert _threads_under("0") == 1
    if len(os.sched_getaffinity(0)) >= 2:
        assert _threads_under("0,1") == 2


@pytest.mark.slow
def test_serve_prints_its_threads(bundle_dir: Path) -> None:
    process = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-m",
            "mtreg",
            "serve",
            "--bundle",
            str(bundle_dir),
            "--port",
            "0",
            "--poll-seconds",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        deadline = time.monotonic() + 60
        while "inference threads" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
        assert "1 inference threads" in line, line
    finally:
        process.kill()
        process.communicate()


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
        ({"cpu.max": "garbage\n"}, None),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_threads(
    tmp_path: Path, files: dict[str, str], cpus: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpus(tmp_path) == cpus
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if cpus is None else min(affinity, math.ceil(cpus))
    assert usable_cores(tmp_path) == expected
