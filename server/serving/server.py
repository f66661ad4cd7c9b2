"""Serving ASGI apps on Trio: listening sockets, the accept loops, lifespans, the drain.

This is our counterpart of Hypercorn's ``trio.run.worker_serve`` (which we do not use:
its connections are Hypercorn's ``TCPServer``, see :mod:`server.serving.connection`).
Hypercorn's building blocks still do the protocol work: its config for the protocol
knobs, its ``Lifespan`` for the app's start-up and shut-down, its sans-IO protocols.

Ownership: :func:`serve` owns one nursery for the accept loops and one for every
connection's task; shutdown stops accepting, ends idle connections at once, lets busy
ones finish within ``graceful_timeout``, then cancels what is left and runs the apps'
lifespan shutdown.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState

from server.serving.connection import Address, Connection, ConnectionFailures
from server.serving.options import ServingOptions

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
CAPACITY_PAUSE = 0.1
BACKLOG = 1024


class ListenError(OSError):
    """A listening socket could not be made; ``bind`` names the address that failed."""

    def __init__(self, bind: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.bind = bind


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One app on one ``HOST:PORT`` address."""

    app: Any
    bind: str


class _Site:
    """What one endpoint serves with: its app wrapper, lifespan state and socket."""

    def __init__(self, endpoint: Endpoint, config: Config) -> None:
        self.app: AppWrapper = ASGIWrapper(endpoint.app)
        self.state: LifespanState = {}
        self.lifespan = Lifespan(self.app, config, self.state)
        try:
            listening = listening_socket(endpoint.bind)
        except OSError as error:
            raise ListenError(endpoint.bind, error) from None
        self.socket = trio.socket.from_stdlib_socket(listening)
        self.url = f"http://{_format_address(self.socket.getsockname())}"


def listening_socket(bind: str) -> socket.socket:
    """A non-blocking socket listening on ``HOST:PORT`` (``[v6]:PORT``); OSError if not."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _format_address(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """The live connections of one :func:`serve`, and how they end at shutdown."""

    def __init__(self, options: ServingOptions) -> None:
        self.options = options
        self.config = _protocol_config(options)
        self.context = WorkerContext(None)
        self.failures = ConnectionFailures(log)
        self.connections: set[Connection] = set()

    async def accept(self, site: _Site, nursery: trio.Nursery) -> None:
        """Accept connections on ``site`` forever, each served in ``nursery``."""
        listener = site.socket
        server_address = _address(listener.getsockname())
        while True:
            try:
                sock, peer = await listener.accept()
            except OSError as error:
                if error.errno in CAPACITY_ERRNOS:
                    log.error("accept failed: %s; retrying in %ss", error, CAPACITY_PAUSE)
                    await trio.sleep(CAPACITY_PAUSE)
                elif error.errno not in IGNORED_ACCEPT_ERRNOS:
                    raise
                continue
            connection = Connection(
                site.app,
                self.config,
                self.context,
                ConnectionState(site.state),
                trio.SocketStream(sock),
                client=_address(peer),
                server=server_address,
                options=self.options,
                failures=self.failures,
            )
            nursery.start_soon(self._run, connection)

    async def _run(self, connection: Connection) -> None:
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)

    async def begin_shutdown(self) -> None:
        """No more requests: idle connections end now, busy ones after their response."""
        await self.context.terminated.set()
        for connection in list(self.connections):
            connection.end_if_idle()


def _address(address: Any) -> Address:
    return (str(address[0]), int(address[1]))


def _protocol_config(options: ServingOptions) -> Config:
    """Hypercorn's config, for the knobs its protocol classes read."""
    config = Config()
    config.keep_alive_timeout = options.keep_alive_timeout
    config.graceful_timeout = options.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("vm_tenant.hypercorn")
    return config


async def serve(
    endpoints: Sequence[Endpoint],
    options: ServingOptions,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every endpoint until ``shutdown_trigger`` returns, then drain and return.

    Reports, through ``task_status``, each endpoint's URL (``http://HOST:PORT``) in order
    once it accepts connections. A bind that fails raises :class:`ListenError` before.
    """
    server = Server(options)
    sites: list[_Site] = []
    try:
        for endpoint in endpoints:
            sites.append(_Site(endpoint, server.config))
        async with trio.open_nursery() as lifespans:
            for site in sites:
                await lifespans.start(site.lifespan.handle_lifespan)
                await site.lifespan.wait_for_startup()
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for site in sites:
                        accepting.start_soon(server.accept, site, connections)
                    task_status.started([site.url for site in sites])
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
                for site in sites:
                    site.socket.close()
                await server.begin_shutdown()
                connections.cancel_scope.deadline = trio.current_time() + options.graceful_timeout
            for site in sites:
                await site.lifespan.wait_for_shutdown()
            lifespans.cancel_scope.cancel()
    finally:
        for site in sites:
            site.socket.close()
