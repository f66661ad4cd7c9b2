"""The accept loop: each new connection admitted, refused, or made room for, then served.

:class:`Connections` owns the live connections of one :func:`~server.serving.serve`:
it accepts them, applies the ceilings (:mod:`server.serving.admission`), runs each in
the nursery it is given, and ends them at shutdown. Running out of descriptors in
``accept`` itself (``EMFILE`` and kin, when something other than connections used them
up) pauses the loop briefly and is logged at most once per ``CAPACITY_LOG_EVERY``
seconds; it never ends the loop. One reaper task ends the connections whose phase
deadline has passed (:mod:`server.serving.connection` has the phases).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState

from server.serving.admission import Admission, refuse
from server.serving.connection import Connection
from server.serving.failures import Address, ConnectionFailures
from server.serving.options import Network, ServingOptions

log = logging.getLogger("vm_tenant.serving")

#: accept errors that mean "out of descriptors or memory for now": wait and retry
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept errors that concern only the connection being accepted (it is gone)
IGNORED_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED", "EPERM", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)  # fmt: skip
CAPACITY_PAUSE = 0.05
CAPACITY_LOG_EVERY = 10.0
#: how often the reaper looks for connections past their deadline (their precision)
REAP_EVERY = 0.25
FULL = "the server holds as many connections as it may; retry shortly"
PEER_FULL = "too many connections from your address; retry shortly"


class Site:
    """One listening socket and what its connections serve (one app, TLS or not)."""

    def __init__(
        self,
        app: AppWrapper,
        sock: trio.socket.SocketType,
        tls: ssl.SSLContext | None,
        state: LifespanState,
    ) -> None:
        self.app = app
        self.socket = sock
        self.tls = tls
        self.state = state
        self.address: Address = _address(sock.getsockname())


class Connections:
    """The live connections of one server: admitted, served, and ended at shutdown."""

    def __init__(
        self,
        options: ServingOptions,
        config: Config,
        ceiling: int,
        log_failures: logging.Logger = log,
    ) -> None:
        self.options = options
        self.config = config
        self.context = WorkerContext(None)
        self.failures = ConnectionFailures(log_failures)
        self.admission = Admission(ceiling, options.max_connections_per_peer)
        self.live: set[Connection] = set()
        #: what happened to connections, by kind (the metrics read it when scraped)
        self.counts: Counter[str] = Counter()
        self._exempt = _exemption(options.trusted_proxies)
        self._capacity_logged_at = -CAPACITY_LOG_EVERY

    async def accept(self, site: Site, nursery: trio.Nursery) -> None:
        """Accept connections on ``site`` until cancelled, each served in ``nursery``."""
        listener = site.socket
        admission = self.admission
        counts = self.counts
        while True:
            try:
                sock, peer = await listener.accept()
            except OSError as error:
                if error.errno not in CAPACITY_ERRNOS:
                    if error.errno in IGNORED_ACCEPT_ERRNOS:
                        continue
                    raise
                await self._pause(error)
                continue
            ip = str(peer[0])
            if admission.peer_full(ip) and not self._exempt(ip):
                counts["refused_peer"] += 1
                refuse(sock, PEER_FULL)
                continue
            if not await admission.make_room():
                counts["refused_full"] += 1
                refuse(sock, FULL)
                continue
            counts["accepted"] += 1
            admission.enter(ip)
            nursery.start_soon(self._serve, site, sock, (ip, int(peer[1])))

    async def _pause(self, error: OSError) -> None:
        self.counts["accept_errors"] += 1
        now = trio.current_time()
        if now - self._capacity_logged_at >= CAPACITY_LOG_EVERY:
            self._capacity_logged_at = now
            log.error(
                "accept failed: %s (%d times so far); pausing accepts %ss at a time",
                error,
                self.counts["accept_errors"],
                CAPACITY_PAUSE,
            )
        await trio.sleep(CAPACITY_PAUSE)

    async def _serve(self, site: Site, sock: trio.socket.SocketType, peer: Address) -> None:
        plain = trio.SocketStream(sock)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = plain
        if site.tls is not None:
            stream = trio.SSLStream(plain, site.tls, server_side=True, https_compatible=True)
        connection = Connection(
            site.app,
            self.config,
            self.context,
            ConnectionState(site.state),
            stream,
            client=peer,
            server=site.address,
            options=self.options,
            failures=self.failures,
            admission=self.admission,
            counts=self.counts,
        )
        self.live.add(connection)
        try:
            await connection.run()
        finally:
            self.live.discard(connection)
            self.admission.leave(peer[0], connection)

    async def reap(self) -> None:
        """End, every ``REAP_EVERY`` seconds, the connections past their deadline."""
        while True:
            await trio.sleep(REAP_EVERY)
            now = trio.current_time()
            for connection in [c for c in self.live if c.deadline <= now]:
                if phase := connection.expire(now):
                    self.counts[f"timeout_{phase}"] += 1

    async def begin_shutdown(self) -> None:
        """No more requests: idle connections end now, busy ones after their response."""
        await self.context.terminated.set()
        for connection in list(self.live):
            connection.end_if_idle()


def _address(address: Any) -> Address:
    return (str(address[0]), int(address[1]))


def _exemption(networks: tuple[Network, ...]) -> Callable[[str], bool]:
    """Whether a peer address is exempt from the per-peer ceiling (a trusted proxy)."""
    if not networks:
        return lambda ip: False

    def exempt(ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in networks)

    return exempt
