"""The knobs of our HTTP serving, in one frozen value the settings layer fills in."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingOptions:
    """Deadlines and ceilings of every listener of one ``vm-tenant serve`` process.

    Times are seconds. The defaults are those documented in ``docs/serving.md``;
    ``server.settings`` is where an operator changes them.
    """

    #: an idle connection (no request in progress, no byte of the next) closes after this
    keep_alive_timeout: float = 5.0
    #: from its first byte (or the TLS handshake's), a request head must be in within this
    head_timeout: float = 10.0
    #: from its head, a request body must be in within this (a total, not a rate)
    body_timeout: float = 30.0
    #: a response write that cannot finish within this long ends its connection
    send_timeout: float = 30.0
    #: in-flight requests get this long to finish after shutdown begins
    graceful_timeout: float = 25.0
    #: connections held at once, all listeners together (lowered to what descriptors allow)
    max_connections: int = 4096
    #: connections held at once by one peer address (trusted proxies are exempt)
    max_connections_per_peer: int = 256
    #: descriptors kept free of connections, for the journal, snapshots and the fleet
    reserved_fds: int = 128
    #: the listen backlog (the kernel caps it at net.core.somaxconn)
    backlog: int = 4096
    #: HTTPS on the API endpoint when set
    tls: ssl.SSLContext | None = None
    #: peers whose X-Forwarded-For names the client
    trusted_proxies: tuple[Network, ...] = ()
