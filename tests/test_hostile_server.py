"""``mtreg serve`` under hostile and careless clients (issue 19, family 6), on a registry in
SQLite and in PostgreSQL: clients that trickle request heads or bodies or send nothing are
dropped while normal requests keep their latency; a connection limit answers 503; idle
keep-alive connections close; SIGTERM under load answers 503 rather than resetting
connections; a failed hot reload stops showing in /metrics once the alias moves back.

Every server listens on 127.0.0.1 only, and every slow client is bounded in number and time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import Checkpoints
from harness import Databases, in_thread, start_serve
from helpers import publish_tasks

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.registry.api import Registry
from mtreg.serving.app import create_app
from mtreg.serving.config import ServeConfig
from mtreg.serving.reload import load_served
from mtreg.serving.server import build_server

TASKS = [
    ("sentiment", ("classification", ("neg", "pos")), 2, 1, ("text",)),
    ("score", ("regression", ()), 4, 0, ("text",)),
]
BODY = {"inputs": ["the movie was great", "how do i reset my password"]}
HEAD = b"POST /v1/predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"


class Hosted:
    """A registry (on one of the module's databases) holding TASKS, with `serving` set."""

    def __init__(self, root: Path, url: str, checkpoints: Checkpoints) -> None:
        self.root, self.url, self.home = root, url, root / "home"
        folder = checkpoints.copy(root / "trunk", num_layers=4)
        self.checkpoint = read_checkpoint(folder)
        self.registry = self.open()
        self.registry.add_trunk("tiny", folder)
        self.publish("1.0.0", seed=0)
        self.registry.set_alias("serving", "latest")

    def open(self) -> Registry:
        """Return a new Registry on the same database and home (one per thread)."""
        registry = Registry(url=self.url, home=self.home)
        registry.plugins_dirs = (self.root / "plugins",)
        return registry

    def publish(self, version: str, seed: int) -> str:
        """Register every task at ``version``; return the id of the new `latest` bundle."""
        publish_tasks(self.root, self.checkpoint, TASKS, {t[0]: version for t in TASKS}, seed)
        self.registry.discover(refresh=True)
        self.registry.register(all=True)
        return self.registry.bundle("latest").id


@pytest.fixture(scope="module")
def hosted(
    databases: Databases, tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints
) -> Iterator[Hosted]:
    h = Hosted(tmp_path_factory.mktemp("hosted"), databases.new(), checkpoints)
    yield h
    h.registry.close()


@contextmanager
def hosting(hosted: Hosted, follow: bool = False, **options: Any) -> Iterator[str]:
    """Run the server ``mtreg serve`` runs (build_server) in a thread on a free loopback
    port, serving alias `serving` (and following it when ``follow``); yield its URL."""
    config = ServeConfig(bundle="serving", **options)
    with hosted.open() as registry:
        served = load_served("serving", None, "torch", registry)
    app = create_app(config, served, hosted.open if follow else None)
    server = build_server(app, log_level="warning")
    with in_thread(server) as url:
        yield url


def metric(url: str, name: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Slow:
    """A raw connection that sends ``chunks`` one per tick, and what became of it."""

    chunks: list[bytes]
    sock: socket.socket
    sent: int = 0
    received: bytes = b""
    closed_after: float | None = None

    def read(self, elapsed: float) -> None:
        """Take what the server sent; note when it closed the connection."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.received += data
        if not data:
            self.closed_after = elapsed

    def send_next(self, elapsed: float) -> None:
        """Send the next chunk, if any is left."""
        if self.sent < len(self.chunks):
            try:
                self.sock.send(self.chunks[self.sent])
                self.sent += 1
            except BlockingIOError:
                pass
            except OSError:
                self.closed_after = elapsed


def trickle(url: str, scripts: list[list[bytes]], seconds: float, tick: float = 0.2) -> list[Slow]:
    """Open one connection per script, send a chunk per ``tick``, and stop after
    ``seconds`` or once the server closed them all; return what became of each."""
    port = int(url.rsplit(":", 1)[1])
    clients = [Slow(chunks, socket.create_connection(("127.0.0.1", port))) for chunks in scripts]
    for client in clients:
        client.sock.setblocking(False)
    began = next_send = time.monotonic()
    try:
        while (elapsed := time.monotonic() - began) < seconds:
            live = [c for c in clients if c.closed_after is None]
            if not live:
                break
            for client in live:
                client.read(elapsed)  # before sending, so a 408 is read before any reset
            if time.monotonic() >= next_send:
                for client in live:
                    if client.closed_after is None:
                        client.send_next(elapsed)
                next_send += tick
            time.sleep(0.01)
    finally:
        for client in clients:
            client.sock.close()
    return clients


def latencies(
    client: httpx.Client, url: str, count: int, until: threading.Thread | None = None
) -> list[float]:
    """Time ``count`` predictions (and more while ``until`` runs); return the seconds."""
    times = []
    while len(times) < count or (until is not None and until.is_alive()):
        began = time.perf_counter()
        response = client.post(f"{url}/v1/predict", json=BODY)
        times.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text
    return times


def summary(times: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``times``."""
    return statistics.median(times), statistics.quantiles(times, n=100)[98]


@pytest.mark.slow
def test_slow_clients_are_dropped_while_normal_requests_keep_their_latency(
    hosted: Hosted,
) -> None:
    body_head = HEAD + b"content-length: 200\r\n\r\n"
    scripts = (
        [[HEAD[i : i + 1] for i in range(len(HEAD))]] * 20  # the head, a byte per tick
        + [[body_head, *[b"{", b'"', b"i"] * 20]] * 20  # the head at once, the body trickled
        + [[]] * 20  # connects and sends nothing
    )
    timeout = 1.5
    options = {"header_timeout_s": timeout, "body_timeout_s": timeout, "max_wait_ms": 1}
    # Without TCP_NODELAY the body waits for the ACK of the headers: 40 ms of delayed ACK.
    nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with hosting(hosted, **options) as url, httpx.Client(transport=nodelay, timeout=30) as client:
        latencies(client, url, 10)  # warm up
        alone = latencies(client, url, 40)
        outcome: list[Slow] = []
        slow = threading.Thread(target=lambda: outcome.extend(trickle(url, scripts, 10)))
        slow.start()
        time.sleep(0.2)
        beside = latencies(client, url, 40, until=slow)
        slow.join()
        dropped = {
            reason: metric(url, f'mtreg_serve_dropped_total{{reason="{reason}"}}')
            for reason in ("header_timeout", "body_timeout")
        }
        assert client.get(f"{url}/healthz").status_code == 200
    heads, bodies, idle = outcome[:20], outcome[20:40], outcome[40:]
    for c in outcome:
        assert c.closed_after is not None and c.closed_after < timeout + 2, c.closed_after
    for c in heads:
        assert c.received.startswith(b"HTTP/1.1 408 "), c.received
        assert b"request headers not complete after 1.5 s" in c.received
    for c in bodies:
        assert c.received.startswith(b"HTTP/1.1 408 "), c.received
        assert b"request body not complete after 1.5 s" in c.received
    assert all(c.received == b"" for c in idle)
    assert dropped == {"header_timeout": 40, "body_timeout": 20}
    (p50, p99), (p50_beside, p99_beside) = summary(alone), summary(beside)
    print(
        f"\npredict latency alone p50 {p50 * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms; beside 60 "
        f"slow clients ({len(beside)} requests) p50 {p50_beside * 1e3:.1f} ms "
        f"p99 {p99_beside * 1e3:.1f} ms"
    )
    # Generous: the slow clients' driver shares this process (and its GIL) with the server.
    assert p50_beside < 3 * p50 + 0.05
    assert p99_beside < 5 * p99 + 0.25


def test_a_connection_past_the_limit_gets_a_503_with_retry_after(hosted: Hosted) -> None:
    with hosting(hosted, max_connections=3, header_timeout_s=20) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            with httpx.Client(timeout=10) as client:
                refused = client.post(f"{url}/v1/predict", json=BODY)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            assert "most connections open (3)" in refused.json()["detail"]
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while (answer := httpx.post(f"{url}/v1/predict", json=BODY)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.05)
        assert metric(url, 'mtreg_serve_dropped_total{reason="connection_limit"}') >= 1


def read_response(sock: socket.socket) -> bytes:
    """Read one whole response (head and a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0
    ):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_idle_keep_alive_and_a_slow_second_request_are_closed(hosted: Hosted) -> None:
    with hosting(hosted, keep_alive_s=0.5, header_timeout_s=1) as url:
        port = int(url.rsplit(":", 1)[1])
        request = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            idle.sendall(request)
            assert read_response(idle).startswith(b"HTTP/1.1 200 ")
            began = time.monotonic()
            assert idle.recv(65536) == b""  # closed by the server, not by the 5 s timeout
            assert time.monotonic() - began < 2
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(request)
            assert read_response(slow).startswith(b"HTTP/1.1 200 ")
            began = time.monotonic()
            for byte in request[:-2]:  # keep-alive idleness never lasts 0.5 s
                if select.select([slow], [], [], 0.05)[0]:
                    break  # the server answered: stop sending
                slow.send(bytes([byte]))
            answer = read_response(slow)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"headers not complete" in answer
            assert time.monotonic() - began < 2.5


BIG_HEAD = b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncookie: " + b"a" * 20_000 + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "piece", "status", "says"),
    [
        # A 20 KB head, past the 16 KB bound: whole in one read, and in pieces (where h11
        # itself notices, and uvicorn would answer a plain-text 400).
        (BIG_HEAD, len(BIG_HEAD), b"HTTP/1.1 431 ", "headers exceed 16 KB, the server's limit"),
        (BIG_HEAD, 4096, b"HTTP/1.1 431 ", "headers exceed 16 KB, the server's limit"),
        (b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n", 1024, b"HTTP/1.1 400 ", "not valid HTTP"),
    ],
    ids=["header-too-large", "header-too-large-in-pieces", "malformed-header"],
)
def test_a_request_head_h11_refuses_gets_a_json_problem(
    hosted: Hosted, head: bytes, piece: int, status: bytes, says: str
) -> None:
    with hosting(hosted) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(head), piece):
                sock.sendall(head[start : start + piece])
                time.sleep(0.02)  # each piece its own read
            answer = read_response(sock)
            assert sock.recv(65536) == b""  # and the connection is closed
        assert answer.startswith(status), answer[:200]
        top, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in top.lower()
        assert says in json.loads(body)["detail"]
        assert httpx.get(f"{url}/healthz").status_code == 200  # the server carries on
        too_large = metric(url, 'mtreg_serve_dropped_total{reason="header_too_large"}')
        assert too_large == (1 if b"431" in status else 0)


def test_a_failed_reload_stops_showing_once_the_alias_moves_back(hosted: Hosted) -> None:
    good = hosted.registry.bundle("serving").id
    with hosting(hosted, follow=True, poll_seconds=0.05) as url:
        broken = hosted.publish(f"1.1.{len(hosted.registry.bundles())}", seed=7)
        (hosted.registry.home.bundle(broken) / "branches/sentiment.safetensors").unlink()
        hosted.registry.set_alias("serving", broken)
        deadline = time.monotonic() + 20
        while metric(url, "mtreg_serve_reload_failed") != 1:
            assert time.monotonic() < deadline, "the failed load was not reported"
            time.sleep(0.05)
        hosted.registry.set_alias("serving", good)
        while metric(url, "mtreg_serve_reload_failed") != 0:
            assert time.monotonic() < deadline, "the failure still shows after it ended"
            time.sleep(0.05)
        assert metric(url, 'mtreg_serve_reloads_total{result="failed"}') == 1
        assert httpx.post(f"{url}/v1/predict", json=BODY).json()["bundle"] == good


def _client_loop(url: str, outcomes: list[Any], deadline: float) -> None:
    """Predict until the server answers 503 or refuses the connection; record answers."""
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            try:
                response = client.post(f"{url}/v1/predict", json=BODY)
            except httpx.ConnectError:
                outcomes.append("refused")
                return
            except httpx.TransportError as exc:  # reset or closed mid-request
                outcomes.append(repr(exc))
                return
            outcomes.append(response)
            if response.status_code != 200:
                return


# The limits' options, as a deployment would give them (each client holds one connection).
LIMITS = ["--header-timeout", "5", "--body-timeout", "5", "--keep-alive", "2"]
LIMITS += ["--max-connections", "64"]


@pytest.mark.slow
def test_sigterm_under_load_answers_503_rather_than_resetting(hosted: Hosted) -> None:
    process, url = start_serve(
        "--bundle", "serving", "--threads", "1", "--log-level", "warning", "--max-wait-ms", "1",
        *LIMITS,
        env={**os.environ, "MTREG_DATABASE_URL": hosted.url, "MTREG_HOME": str(hosted.home)},
    )  # fmt: skip
    try:
        outcomes: list[Any] = []
        clients = [
            threading.Thread(target=_client_loop, args=(url, outcomes, time.monotonic() + 60))
            for _ in range(8)
        ]
        for t in clients:
            t.start()
        loaded_by = time.monotonic() + 60
        while sum(not isinstance(o, str) for o in outcomes) < 16:  # under load
            assert time.monotonic() < loaded_by, outcomes
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(60)
        assert process.wait(timeout=60) == 0, process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    broken = [o for o in outcomes if isinstance(o, str) and o != "refused"]
    assert not broken, broken
    answers = [o for o in outcomes if not isinstance(o, str)]
    assert {a.status_code for a in answers} <= {200, 503}
    assert sum(a.status_code == 200 for a in answers) >= 16
    for a in answers:
        if a.status_code == 503:
            assert a.headers["retry-after"] == "1" and "shutting down" in a.json()["detail"]
    print(
        f"\nunder SIGTERM: {len(answers)} answers, "
        f"{sum(a.status_code == 503 for a in answers)} of them 503, "
        f"{outcomes.count('refused')} connections refused"
    )


@pytest.mark.parametrize(
    "options",
    [{"header_timeout_s": 0}, {"body_timeout_s": -1}, {"keep_alive_s": 0}, {"max_connections": 0}],
)
def test_config_refuses_limits_that_would_drop_every_client(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"timeouts must be positive|connections must be"):
        ServeConfig(**options)
