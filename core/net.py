"""Whether something answers at a network address: the quick check made before handing an
address to a client library that would retry an unreachable one for minutes (Ray's
``ray.init``; gcsfs and the Azure SDK, which back off over six and three attempts)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

# Long enough for a cloud endpoint across a slow link, short enough for a typo to be one
# line now.
CONNECT_TIMEOUT_S = 5.0


def unreachable(host: str, port: int, seconds: float = CONNECT_TIMEOUT_S) -> str | None:
    """Return why nothing accepts a TCP connection at ``host:port`` within ``seconds``
    (``"Connection refused"``, ``"timeout"``, a name that does not resolve), or None when
    something does."""
    try:
        socket.create_connection((host.strip("[]"), port), seconds).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def url_unreachable(url: str, seconds: float = CONNECT_TIMEOUT_S) -> str | None:
    """Return why nothing answers at an ``http(s)://HOST[:PORT]/...`` URL's host and port
    (the scheme's port when it names none), or None when something does."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return unreachable(parts.hostname or "", port, seconds)
