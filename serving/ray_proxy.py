"""What mtreg adds to Ray Serve's HTTP proxy: a request whose replica died under it is
sent again, to a live replica, rather than answered 500; and a body too large or too slow
is refused at the proxy, before it holds the body or a replica sees it.

Serve's proxy answers nothing when the replica holding a request dies (uvicorn then sends
a bare 500), and it does not resend the request. Every mtreg endpoint only reads, so
sending a request again is safe: :class:`ProxyGuard` keeps each request's body, and when
the proxy ends a request without starting a response, sends it again (Serve has by then
stopped routing to the dead replica); if that fails too, the client gets 503 with
Retry-After. Serve loads it in each proxy from the import path in
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (:data:`CALLBACK`), which the proxy's node
must have in its environment (``mtreg serve --engine ray`` sets it for the Ray it starts).

The body limits are ``mtreg serve``'s ``max_body_bytes`` and ``body_timeout_s``, read from
:func:`mtreg.core.env.proxy_body_limits` in the proxy's environment (set the same
way; ServeConfig's defaults without them). Serve's proxy has no header timeout or
connection cap to set: on a cluster those belong to the load balancer in front of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mtreg.core import env
from mtreg.serving.body import BodyRefused, read_body, replay
from mtreg.serving.config import ServeConfig

log = logging.getLogger("mtreg.serving")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "mtreg.serving.ray_proxy.middlewares"
RETRY_AFTER_S = 1


class ProxyGuard:
    """ASGI middleware around Serve's proxy: refuses a body past the limits, resends a
    request that got no response."""

    def __init__(
        self,
        app: Any,
        resends: int = 1,
        max_body_bytes: int = ServeConfig.max_body_bytes,
        body_timeout_s: float = ServeConfig.body_timeout_s,
    ) -> None:
        self.app = app
        self.resends = resends
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from mtreg.serving.app import problem

        body = await read_body(receive, self.max_body_bytes, self.body_timeout_s)
        if isinstance(body, BodyRefused):
            refusal = problem(body.status, body.detail, body.headers or None, scope["path"])
            await refusal(scope, receive, send)
            return
        for attempt in range(1 + self.resends):
            if await self._once(scope, body, receive, send):
                return
            log.warning("%s lost with its replica (try %d): resending", scope["path"], attempt + 1)
        detail = "the replica answering this request stopped; send it again"
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        await problem(503, detail, headers, scope["path"])(scope, receive, send)

    async def _once(self, scope: dict, body: bytes, receive: Callable, send: Callable) -> bool:
        """Send the request through the proxy once; return whether a response started."""
        started = False

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay(body, receive), watch)
        except Exception:
            if started:
                raise
            log.exception("the proxy failed before answering %s", scope["path"])
        return started


def middlewares() -> list[Any]:
    """Return the middlewares Serve's proxy adds (its callback, :data:`CALLBACK`)."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyGuard, **env.proxy_body_limits())]
