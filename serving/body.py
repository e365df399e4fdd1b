"""A request's body read under the server's limits: at most ``max_bytes``, all of it within
``timeout_s`` of its headers. Both the app (:class:`mtreg.serving.app.Observe`) and the
middleware mtreg adds to Ray Serve's proxy (:mod:`mtreg.serving.ray_proxy`) read bodies
this way, so a body too large or too slow is refused by whichever sees it first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BodyRefused:
    """Why a body was not read whole: the status and detail of the refusal, its headers,
    and the metrics reason (``body_timeout``) where one is counted."""

    status: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None


async def _read(receive: Callable, limit: int) -> bytes | None:
    """Return the request body, or None as soon as it passes ``limit`` bytes.

    The body is counted as it arrives rather than trusted from Content-Length, which a
    chunked request does not send and any client can understate. Bodies here are JSON that
    is parsed whole anyway, so holding one (at most ``limit`` bytes) costs nothing extra.
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client left: the app will see an empty body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def read_body(receive: Callable, max_bytes: int, timeout_s: float) -> bytes | BodyRefused:
    """Return the whole request body, or why it was refused: 413 past ``max_bytes``; 408
    (closing the connection) when it has not all arrived within ``timeout_s``, so that a
    client trickling bytes cannot hold a connection."""
    try:
        async with asyncio.timeout(timeout_s):
            body = await _read(receive, max_bytes)
    except TimeoutError:
        detail = (
            f"request body not complete after {timeout_s:g} s; send the whole body without pausing"
        )
        return BodyRefused(408, detail, {"Connection": "close"}, "body_timeout")
    if body is None:
        return BodyRefused(413, f"request body over {max_bytes} bytes")
    return body


def replay(body: bytes, receive: Callable) -> Callable:
    """Return an ASGI ``receive`` that yields ``body`` once, then defers to ``receive``
    (which then reports the disconnect when the client goes away)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
