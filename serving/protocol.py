"""The HTTP/1.1 connection handling of ``mtreg serve``: uvicorn's h11 protocol with the
limits that stop slow or numerous clients from holding the server.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends
its request line and headers a byte at a time (or nothing at all) holds it forever, and its
own connection limit answers a plain-text 503. :class:`GuardedH11` closes a connection whose
request head has not all arrived within ``header_timeout_s`` (answering 408 when part of it
came), answers requests on connections past ``max_connections`` with the server's 503
problem, and lets a draining server answer a connection that has not sent its first request
yet rather than reset it. The body's deadline is the ASGI layer's
(:class:`mtreg.serving.app.Observe`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from mtreg.serving.app import ServerState, problem

# The states of the server's side of h11 while the app is answering a request.
ANSWERING = (h11.SEND_RESPONSE, h11.SEND_BODY)


# h11's own bound on a request head (uvicorn's h11_max_incomplete_event_size unset).
HEAD_LIMIT_BYTES = 16 * 1024


def _raw_response(status: str, detail: str) -> bytes:
    """Return a complete JSON problem response that closes the connection, written raw:
    h11 has no request to answer (none came whole, or it could not be parsed)."""
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def _head_size(buffered: bytes) -> int:
    """Return the size of the request head at the start of ``buffered`` (all of it, when
    its end has not arrived yet)."""
    end = buffered.find(b"\r\n\r\n")
    return len(buffered) if end < 0 else end + 4


def _timeout_response(seconds: float) -> bytes:
    """Return the 408 for a request head not complete after ``seconds``."""
    detail = f"request headers not complete after {seconds:g} s; send them without pausing"
    return _raw_response("408 Request Timeout", detail)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request heads and a connection limit.

    :func:`guarded_protocol` binds ``state`` (the app's ServerState: limits and metrics).
    """

    state: ServerState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.state.config.max_connections:
            self.app = self.refuse  # this connection's request gets a 503, then it closes
        self.await_head()

    def data_received(self, data: bytes) -> None:
        # h11 bounds only a head still incomplete after a read: one that arrives whole in a
        # single read passes at any size. The bound is kept here whatever the reads.
        if self.conn.their_state is h11.IDLE:
            head = _head_size(self.conn.trailing_data[0] + data)
            if head > self.head_limit:
                self.refuse_head(too_large=True)
                return
        super().data_received(data)
        if self.conn.our_state in ANSWERING:
            self.cancel_head_timer()  # the head is in; the body's deadline is the app's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head is due within the timeout of this response's end.
        self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_head_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            # Accepted but no request yet: a client is sending one. It is answered (503,
            # draining) when its head arrives, within the header timeout, not reset.
            return
        super().shutdown()

    def await_head(self) -> None:
        """(Re)start the deadline of the next request head, unless one is being answered."""
        self.cancel_head_timer()
        if not self.transport.is_closing() and self.conn.our_state not in ANSWERING:
            seconds = self.state.config.header_timeout_s
            self.head_timer = self.loop.call_later(seconds, self.head_timed_out)

    def cancel_head_timer(self) -> None:
        """Stop the head's deadline."""
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        """Close the connection; with a 408 when part of a request came (an idle one just
        closes, as after keep-alive)."""
        self.head_timer = None
        if self.transport.is_closing():
            return
        self.state.metrics.dropped.labels(reason="header_timeout").inc()
        partial, _ = self.conn.trailing_data
        if partial and self.conn.our_state is h11.IDLE:
            self.transport.write(_timeout_response(self.state.config.header_timeout_s))
        self.transport.close()

    @property
    def head_limit(self) -> int:
        """The most bytes a request line and its headers may take."""
        return self.config.h11_max_incomplete_event_size or HEAD_LIMIT_BYTES

    def send_400_response(self, msg: str) -> None:
        """Answer a request h11 could not parse (uvicorn's plain-text 400) with a JSON
        problem instead; then close."""
        buffered, _ = self.conn.trailing_data
        self.refuse_head(_head_size(buffered) > self.head_limit)

    def refuse_head(self, too_large: bool) -> None:
        """Answer 431 (the head outgrew :attr:`head_limit`) or 400 (it is not HTTP/1.1) as a
        JSON problem, and close the connection."""
        if too_large:
            self.state.metrics.dropped.labels(reason="header_too_large").inc()
            answer = _raw_response(
                "431 Request Header Fields Too Large",
                f"the request line and headers exceed {self.head_limit // 1024} KB, the "
                "server's limit: send fewer or shorter headers (a large cookie or token?)",
            )
        else:
            answer = _raw_response(
                "400 Bad Request",
                "the request is not valid HTTP/1.1 (its request line or a header is "
                "malformed): fix the client",
            )
        self.cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    async def refuse(self, scope: dict, receive: Any, send: Any) -> None:
        """The ASGI app of a connection past the limit: a 503 problem, then close."""
        config = self.state.config
        self.state.metrics.dropped.labels(reason="connection_limit").inc()
        detail = (
            f"the server has its most connections open ({config.max_connections}); "
            "send the request again later"
        )
        headers = {"Retry-After": str(config.retry_after_s), "Connection": "close"}
        await problem(503, detail, headers)(scope, receive, send)


def guarded_protocol(state: ServerState) -> type[GuardedH11]:
    """Return the protocol class for uvicorn's ``http`` setting, bound to ``state``."""
    return type("GuardedH11", (GuardedH11,), {"state": state})
