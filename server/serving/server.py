"""Serving ASGI apps on Trio: listening sockets, lifespans, the accept loops, the drain.

This is our counterpart of Hypercorn's ``trio.run.worker_serve`` (which we do not use:
its connections are Hypercorn's ``TCPServer``, see :mod:`server.serving.connection`).
Hypercorn's building blocks still do the protocol work: its config for the protocol
knobs, its ``Lifespan`` for the app's start-up and shut-down, its sans-IO protocols.

Ownership: :func:`serve` owns one nursery for the accept loops and one for every
connection's task; shutdown stops accepting, ends idle connections at once, lets busy
ones finish within ``graceful_timeout``, then cancels what is left and runs the apps'
lifespan shutdown. At start it raises the descriptor limit and sizes the connection
ceiling to what the limit leaves (:mod:`server.serving.descriptors`).
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
from prometheus_client import CollectorRegistry

from server.serving.descriptors import plan, somaxconn
from server.serving.listener import Connections, Site
from server.serving.metrics import ServingCollector
from server.serving.options import ServingOptions
from server.serving.proxies import ForwardedFor

log = logging.getLogger("vm_tenant.serving")


class ListenError(OSError):
    """Serving could not start; ``bind`` names the address it was for."""

    def __init__(self, bind: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.bind = bind


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One app on one ``HOST:PORT`` address.

    ``front`` marks the API that users reach: TLS and trusted proxies apply to it when
    configured. The metrics listener is not a front endpoint: plain HTTP for the scraper,
    whose peer address is never rewritten.
    """

    app: Any
    bind: str
    front: bool = True


def listening_socket(bind: str, backlog: int) -> socket.socket:
    """A non-blocking socket listening on ``HOST:PORT`` (``[v6]:PORT``); OSError if not."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(site: Site) -> str:
    host, port = site.address
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if site.tls else 'http'}://{host}:{port}"


def _protocol_config(options: ServingOptions) -> Config:
    """Hypercorn's config, for the knobs its protocol classes and lifespan read."""
    config = Config()
    config.keep_alive_timeout = options.keep_alive_timeout
    config.graceful_timeout = options.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("vm_tenant.hypercorn")
    return config


def _open_sites(endpoints: Sequence[Endpoint], options: ServingOptions) -> list[Site]:
    sites: list[Site] = []
    try:
        for endpoint in endpoints:
            try:
                sock = listening_socket(endpoint.bind, options.backlog)
            except OSError as error:
                raise ListenError(endpoint.bind, error) from None
            tls = options.tls if endpoint.front else None
            app = endpoint.app
            if endpoint.front and options.trusted_proxies:
                app = ForwardedFor(app, options.trusted_proxies)
            app = ASGIWrapper(app)
            sites.append(Site(app, trio.socket.from_stdlib_socket(sock), tls, {}))
    except BaseException:
        for site in sites:
            site.socket.close()
        raise
    return sites


def _ceiling(options: ServingOptions, bind: str) -> int:
    """The connection ceiling: the configured one, or what descriptors allow if less."""
    budget = plan(options.reserved_fds)
    ceiling = min(options.max_connections, budget.connections)
    if ceiling < 1:
        reason = (
            f"the descriptor limit {budget.limit} leaves no room for connections "
            f"({budget.open_at_start} open, {budget.reserved} reserved)"
        )
        raise ListenError(bind, OSError(errno.EMFILE, reason))
    capped = somaxconn()
    backlog = options.backlog if capped is None else min(options.backlog, capped)
    log.info(
        "serving at most %d connections (%d per peer address): descriptor limit %d, "
        "%d open at start, %d reserved; listen backlog %d%s",
        ceiling,
        options.max_connections_per_peer,
        budget.limit,
        budget.open_at_start,
        budget.reserved,
        backlog,
        f" (net.core.somaxconn {capped} caps {options.backlog})"
        if backlog < options.backlog
        else "",
    )
    return ceiling


async def serve(
    endpoints: Sequence[Endpoint],
    options: ServingOptions,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every endpoint until ``shutdown_trigger`` returns, then drain and return.

    Reports, through ``task_status``, each endpoint's URL (``http://HOST:PORT``, or
    ``https://``) in order once it accepts connections. Raises :class:`ListenError`
    before that if it cannot listen. The connection metrics go to ``registry``.
    """
    config = _protocol_config(options)
    sites = _open_sites(endpoints, options)
    collector: ServingCollector | None = None
    try:
        connections = Connections(options, config, _ceiling(options, endpoints[0].bind))
        collector = ServingCollector(connections)
        if registry is not None:
            registry.register(collector)
        lifespans = [Lifespan(site.app, config, site.state) for site in sites]
        async with trio.open_nursery() as lifespan_tasks:
            for lifespan in lifespans:
                await lifespan_tasks.start(lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
            async with trio.open_nursery() as reaping:
                reaping.start_soon(connections.reap)
                async with trio.open_nursery() as connection_tasks:
                    async with trio.open_nursery() as accepting:
                        for site in sites:
                            accepting.start_soon(connections.accept, site, connection_tasks)
                        task_status.started([_url(site) for site in sites])
                        await shutdown_trigger()
                        accepting.cancel_scope.cancel()
                    for site in sites:
                        site.socket.close()
                    await connections.begin_shutdown()
                    connection_tasks.cancel_scope.deadline = (
                        trio.current_time() + options.graceful_timeout
                    )
                reaping.cancel_scope.cancel()
            for lifespan in lifespans:
                await lifespan.wait_for_shutdown()
            lifespan_tasks.cancel_scope.cancel()
    finally:
        for site in sites:
            site.socket.close()
        if registry is not None and collector is not None:
            registry.unregister(collector)
