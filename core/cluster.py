"""Joining or starting Ray: the one way ``serve --engine ray`` and ``onboard --engine ray``
connect to a cluster.

An address is ``HOST:PORT`` (or ``ray://HOST:PORT``), ``auto`` (Ray's own lookup of a
cluster started on this machine), or nothing: ``$RAY_ADDRESS`` when it is set, else a new
Ray started for this command on loopback. A plain ``ray.init()`` would instead join
whatever Ray another command started on this machine (found through ``/tmp/ray``).
"""

from __future__ import annotations

import os
from typing import Any

from mtreg.core.net import CONNECT_TIMEOUT_S, unreachable
from mtreg.errors import MtregError


def check_reachable(address: str, seconds: float = CONNECT_TIMEOUT_S) -> None:
    """Check that something accepts connections at ``address`` within ``seconds``;
    ``auto`` is left to Ray.

    Raises:
        MtregError: the address is not ``HOST:PORT``, or nothing answers there; one line.
    """
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise MtregError(f"invalid Ray address {address!r}: write HOST:PORT (or auto)")
    # ray.init itself retries an unreachable address for minutes before it gives up.
    if reason := unreachable(host, int(port), seconds):
        raise MtregError(
            f"cannot reach the Ray cluster at {address} ({reason}): start it (`ray start "
            "--head`) or fix --address"
        )


def connect(ray: Any, address: str | None, **options: Any) -> bool:
    """Join the cluster at ``address`` (see the module docstring), passing this process's
    ``MTREG_*`` settings to its workers and ``options`` to ``ray.init``.

    Returns:
        True if this call connected, so the caller must ``ray.shutdown()``; False when the
        process already was a Ray driver (it keeps its connection).

    Raises:
        MtregError: the address is invalid or unreachable, or Ray refuses; one line.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    else:
        # A Ray started for this command serves this machine only: no dashboard, loopback,
        # and no guess at an outside address (which fails in a network namespace).
        options = {"include_dashboard": False, "_node_ip_address": "127.0.0.1", **options}
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("MTREG_")}
    try:
        ray.init(
            address=address or "local",
            runtime_env={"env_vars": forwarded} if forwarded else None,
            **options,
        )
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if address is None:
            raise MtregError(f"cannot start a local Ray: {first}") from None
        raise MtregError(
            f"cannot join the Ray cluster at {address}: {first}; start it (`ray start "
            "--head`) or fix --address"
        ) from None
    return True
