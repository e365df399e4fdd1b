"""What mtreg adds to Ray Serve's HTTP proxy: a request whose replica died under it is
sent again, to a live replica, rather than answered 500.

Serve's proxy answers nothing when the replica holding a request dies (uvicorn then sends
a bare 500), and it does not resend the request. Every mtreg endpoint only reads, so
sending a request again is safe: :class:`ResendLost` keeps each request's body, and when
the proxy ends a request without starting a response, sends it again (Serve has by then
stopped routing to the dead replica); if that fails too, the client gets 503 with
Retry-After. Serve loads it in each proxy from the import path in
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (:data:`CALLBACK`), which the proxy's node
must have in its environment (``mtreg serve --engine ray`` sets it for the Ray it starts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mtreg.serving")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "mtreg.serving.ray_proxy.middlewares"
RETRY_AFTER_S = 1


async def _whole_body(receive: Callable) -> bytes:
    """Return the request body. Serve's proxy holds each body whole anyway to hand it to a
    replica, so keeping it here adds no exposure; the replica enforces the size limit."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class ResendLost:
    """ASGI middleware around Serve's proxy: resends a request that got no response."""

    def __init__(self, app: Any, resends: int = 1) -> None:
        self.app = app
        self.resends = resends

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await _whole_body(receive)
        for attempt in range(1 + self.resends):
            if await self._once(scope, body, receive, send):
                return
            log.warning("%s lost with its replica (try %d): resending", scope["path"], attempt + 1)
        from mtreg.serving.app import problem

        detail = "the replica answering this request stopped; send it again"
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        await problem(503, detail, headers, scope["path"])(scope, receive, send)

    async def _once(self, scope: dict, body: bytes, receive: Callable, send: Callable) -> bool:
        """Send the request through the proxy once; return whether a response started."""
        started = False
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()  # then the client's disconnect, when it goes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except Exception:
            if started:
                raise
            log.exception("the proxy failed before answering %s", scope["path"])
        return started


def middlewares() -> list[Any]:
    """Return the middlewares Serve's proxy adds (its callback, :data:`CALLBACK`)."""
    from starlette.middleware import Middleware

    return [Middleware(ResendLost)]
