"""The middleware mtreg adds to Ray Serve's proxy (:mod:`mtreg.serving.ray_proxy`), driven
through ASGI here: bodies too large or too slow are refused before the proxy hands them on,
and a request that got no answer is sent again once, then refused with Retry-After. The
same middleware inside a real Serve proxy is tests/test_ray_serve.py's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from mtreg.core.env import PROXY_BODY_TIMEOUT_ENV as BODY_TIMEOUT_ENV
from mtreg.core.env import PROXY_MAX_BODY_ENV as MAX_BODY_ENV
from mtreg.serving.ray_proxy import ProxyGuard, middlewares


class Proxy:
    """Stands in for Serve's proxy app: records each body it is handed; answers 200 with it
    unless told to lose the first ``lose`` requests (end without a response)."""

    def __init__(self, lose: int = 0) -> None:
        self.lose = lose
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        if len(self.bodies) <= self.lose:
            return  # the replica died: no response started
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})


def run(
    guard: ProxyGuard, chunks: list[bytes], path: str = "/v1/predict", stall: bool = False
) -> tuple[int, dict[str, str], Any]:
    """Send ``chunks`` as one request's body (then hang when ``stall``); return the status,
    headers and body (JSON when it parses) the client got."""
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1 or stall}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a client that stopped sending
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(guard(scope, receive, send))
    start = sent[0]
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        return start["status"], headers, json.loads(body)
    except ValueError:
        return start["status"], headers, body


def test_a_body_within_the_limits_is_handed_on_whole() -> None:
    proxy = Proxy()
    status, _, body = run(ProxyGuard(proxy, max_body_bytes=10), [b'{"a":', b"1}"])
    assert (status, body, proxy.bodies) == (200, {"a": 1}, [b'{"a":1}'])


@pytest.mark.parametrize("path", ["/v1/predict", "/v2/models/sentiment/infer"])
def test_a_body_over_the_limit_is_413_before_the_proxy_holds_it(path: str) -> None:
    proxy = Proxy()
    status, _, body = run(ProxyGuard(proxy, max_body_bytes=10), [b"x" * 6, b"y" * 5], path)
    assert status == 413
    assert proxy.bodies == []
    # the server's own refusal shapes: /v1's problem, the Open Inference Protocol's error
    key = "error" if path.startswith("/v2") else "detail"
    assert body == {key: "request body over 10 bytes"}


def test_a_body_that_stops_arriving_is_408_and_the_connection_closed() -> None:
    proxy = Proxy()
    guard = ProxyGuard(proxy, body_timeout_s=0.2)
    status, headers, body = run(guard, [b'{"inputs": '], stall=True)
    assert status == 408
    assert headers["connection"] == "close"
    assert "not complete after 0.2 s" in body["detail"]
    assert proxy.bodies == []


def test_a_request_lost_with_its_replica_is_sent_again_with_its_body() -> None:
    proxy = Proxy(lose=1)
    status, _, body = run(ProxyGuard(proxy), [b'{"inputs": ["hi"]}'])
    assert (status, body) == (200, {"inputs": ["hi"]})
    assert proxy.bodies == [b'{"inputs": ["hi"]}'] * 2


def test_a_request_lost_twice_is_503_with_retry_after() -> None:
    proxy = Proxy(lose=2)
    status, headers, body = run(ProxyGuard(proxy), [b"{}"])
    assert status == 503
    assert headers["retry-after"] == "1"
    assert "send it again" in body["detail"]
    assert len(proxy.bodies) == 2


def test_the_proxy_takes_its_limits_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_BODY_ENV, "123")
    monkeypatch.setenv(BODY_TIMEOUT_ENV, "2.5")
    (middleware,) = middlewares()
    assert middleware.cls is ProxyGuard
    assert middleware.kwargs == {"max_body_bytes": 123, "body_timeout_s": 2.5}
    monkeypatch.delenv(MAX_BODY_ENV)
    monkeypatch.delenv(BODY_TIMEOUT_ENV)
    assert middlewares()[0].kwargs == {}  # ServeConfig's defaults
