"""Behind a reverse proxy: who the client is, from ``X-Forwarded-For``, when it can be told.

:class:`ForwardedFor` is an ASGI layer in front of the app. Only when the peer (the
address the connection comes from) is inside one of the trusted networks does it read
``X-Forwarded-For`` (every such header, in order, as one comma-separated list): walking
it from the right, past the addresses that are themselves trusted proxies, the first
that is not is the client. It replaces the scope's ``client``, so the app (the audit's
``source.ip``, the request log) sees the client without knowing a proxy was there. From
any other peer the header is ignored: anyone can send it.

An entry that is not an IP address (``unknown``, a name, garbage) ends the walk: nothing
to its left can be trusted, so the client is the last address walked past (the nearest
trusted proxy, or the peer itself when the right-most entry is bad). Entries may carry a
port (``192.0.2.1:4711``, ``[2001:db8::1]:4711``), which is dropped; IPv6 zones
(``fe80::1%eth0``) are not addresses here. What the app sees is always the address in
its normal text form, never the header's own bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from server.serving.options import Network

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

HEADER = b"x-forwarded-for"
#: entries looked at, at most: a proxy chain is a handful of hops, not thousands
MAX_HOPS = 32


def parse_networks(text: str) -> tuple[Network, ...]:
    """``CIDR[,CIDR...]`` (a bare address is a /32 or /128); ValueError names a bad one."""
    networks: list[Network] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR network") from None
    return tuple(networks)


class ForwardedFor:
    """Rewrites the scope's ``client`` from ``X-Forwarded-For`` for trusted peers only."""

    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self._trusted = trusted

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self._trusted)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if client is not None:
                forwarded = self.client_of(client[0], scope["headers"])
                if forwarded != client[0]:
                    scope = {**scope, "client": (forwarded, 0)}
        await self.app(scope, receive, send)

    def client_of(self, peer: str, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """Who the client is for a request from ``peer`` with these headers."""
        current = _address(peer)
        if current is None or not self.trusts(current):
            return peer
        values = [value for name, value in headers if name == HEADER]
        if not values:
            return peer
        entries = b",".join(values).split(b",")
        for entry in reversed(entries[-MAX_HOPS:]):
            hop = _address(entry.strip().decode("latin-1"))
            if hop is None:
                break
            current = hop
            if not self.trusts(hop):
                break
        return str(current)


def _address(text: str) -> Address | None:
    """The IP address in ``text`` (bracketed or with a port allowed), or None."""
    if text.startswith("["):
        text, bracket, _ = text[1:].partition("]")
        if not bracket:
            return None
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None  # a zone names an interface of whoever wrote it: no client's
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address
