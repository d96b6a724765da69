"""Where a decode worker's KV server listens, and the address it advertises to senders.

    bind host     ``ServeConfig.kv_host``: 127.0.0.1 (one machine: the default), 0.0.0.0 / :: (a cluster)
    port          ``ServeConfig.kv_port`` or ``$SPLITSERVE_KV_PORT``: 0 = any free port; a fixed port lets a
                  NetworkPolicy name it (then one decode worker per node: a second one fails to bind)
    advertised    what the worker reports in ``start()`` and senders dial: ``advertised_host`` below,
                  so every worker names its own node, never one host for all
"""

from __future__ import annotations

import ipaddress
import os

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")
ADVERTISE_ENV = "SPLITSERVE_KV_ADVERTISE_HOST"  # read on the worker's node (e.g. a pod's status.podIP)


def advertised_host(bind_host: str, node_ip: str | None, override: str | None = None) -> str:
    """The host a decode worker puts in its KV address (what senders dial).

    ``override`` (``$SPLITSERVE_KV_ADVERTISE_HOST`` on the node, e.g. a pod IP) wins; a worker bound to one
    address advertises that address (127.0.0.1 by default: one machine, as in tests); a worker bound to
    every interface (0.0.0.0 / ::) advertises its node's IP as Ray reports it, or 127.0.0.1 outside Ray."""
    if override:
        return override
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    return node_ip or "127.0.0.1"


def join_host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 literal in brackets."""
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            return f"[{host.strip('[]')}]:{port}"
    except ValueError:
        pass  # a host name
    return f"{host}:{port}"


def port_from_env(environ=os.environ) -> int:
    """``$SPLITSERVE_KV_PORT`` (0 when unset)."""
    return checked_port(environ.get("SPLITSERVE_KV_PORT", "0"), "SPLITSERVE_KV_PORT")


def checked_port(value, where: str = "kv_port") -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise ValueError(f"{where} must be a port number 0..65535 (0: any free port); got {value!r}")
    return port
