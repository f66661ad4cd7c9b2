"""One accepted connection: Hypercorn's sans-IO protocol over a Trio stream, one writer.

This replaces Hypercorn 0.18's ``trio.tcp_server.TCPServer``, which can end the whole
server on one abandoned request: its close path (``send_eof``) runs without the lock its
writes take, so when the app answers while the peer's end of file makes the protocol
write an error response, one of the two writes finds the stream busy. The
``BusyResourceError`` that raises is not caught per connection and ends the server.

Here every write to the stream - response bytes, the end of file, the close - happens
under one lock, and nothing writes after the close: that race cannot occur. And since a
connection is the peer's to break, anything else a connection raises is caught at its
edge: logged (:class:`ConnectionFailures`), and only that connection ends.

A connection's time is watched by one cancel scope (the watchdog) whose deadline follows
the phase the connection is in, so a phase change costs an assignment, not a task.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.task_group import TaskGroup
from hypercorn.typing import AppWrapper, ConnectionState, WorkerContext

from server.serving.options import ServingOptions
from server.serving.protocol import Protocol

MAX_RECV = 2**16
#: how long a close may take to flush (TLS close_notify) before it is forced
CLOSE_GRACE = 1.0

Address = tuple[str, int]


class ConnectionFailures:
    """Counts and logs the errors that ended a connection (one owner: the server).

    The first error of each kind is logged with its traceback; later ones of that kind
    with one line, so that a peer who can provoke one cannot flood the log with stacks.
    """

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._seen: set[str] = set()
        self.count = 0

    def report(self, peer: Address | None, error: BaseException) -> None:
        self.count += 1
        kind = _kind(error)
        where = f"{peer[0]}:{peer[1]}" if peer else "unknown peer"
        if kind in self._seen:
            self._log.error("connection failed (peer %s): %s: %s", where, kind, error)
            return
        self._seen.add(kind)
        self._log.error("connection failed (peer %s): %s", where, kind, exc_info=error)


def _kind(error: BaseException) -> str:
    """The names of the errors inside ``error``'s groups, e.g. ``"KeyError"``."""
    if isinstance(error, BaseExceptionGroup):
        return ", ".join(sorted({_kind(inner) for inner in error.exceptions}))
    return type(error).__qualname__


class Connection:
    """Serves HTTP on one stream until either side ends it or its deadline passes."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.abc.HalfCloseableStream | trio.SSLStream[Any],
        *,
        client: Address | None,
        server: Address | None,
        options: ServingOptions,
        failures: ConnectionFailures,
    ) -> None:
        self.client = client
        self._app = app
        self._config = config
        self._context = context
        self._state = state
        self._stream = stream
        self._server = server
        self._options = options
        self._failures = failures
        self._send_lock = trio.Lock()
        self._closed = False
        self._idle = True
        self._watchdog = trio.CancelScope()
        self._protocol: Protocol | None = None

    @property
    def idle(self) -> bool:
        """No request in progress: the connection may be closed without losing work."""
        return self._idle

    def end_if_idle(self) -> None:
        """Shutdown has begun: an idle connection ends now (a busy one when done)."""
        if self._idle:
            self._watchdog.cancel()

    async def run(self) -> None:
        """Serve until the end; never raises (but Cancelled from outside)."""
        try:
            with self._watchdog:
                self._enter_idle()
                try:
                    await self._serve()
                except* Exception as group:
                    self._failures.report(self.client, group)
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _serve(self) -> None:
        async with TaskGroup() as task_group:
            self._protocol = Protocol(
                self._app,
                self._config,
                self._context,
                task_group,
                ConnectionState(self._state.copy()),
                False,
                self.client,
                self._server,
                self._protocol_send,
                "http/1.1",
            )
            await self._protocol.initiate()
            await self._read(self._protocol)

    async def _read(self, protocol: Protocol) -> None:
        stream = self._stream
        while True:
            try:
                data = await stream.receive_some(MAX_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            await protocol.handle(RawData(data=bytes(data)))
            if not data:
                break
        await protocol.handle(Closed())

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if not await self._write(event.data) and self._protocol is not None:
                await self._protocol.handle(Closed())
        elif isinstance(event, Updated):
            if event.idle:
                self._enter_idle()
            else:
                self._idle = False
                self._watchdog.deadline = math.inf
        elif isinstance(event, Closed):
            await self._close()
            if self._protocol is not None:
                await self._protocol.handle(Closed())

    def _enter_idle(self) -> None:
        self._idle = True
        if self._context.terminated.is_set():
            self._watchdog.cancel()
        else:
            self._watchdog.deadline = trio.current_time() + self._options.keep_alive_timeout

    async def _write(self, data: bytes) -> bool:
        """Send ``data`` whole, or close the connection: True if it went out."""
        async with self._send_lock:
            if self._closed:
                return False
            # Shielded: a write cut in the middle would leave half a frame on the wire;
            # bounded instead, so that a peer who stops reading cannot hold it forever.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._options.send_timeout
                try:
                    await self._stream.send_all(data)
                    return True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            self._closed = True
            await self._release()
            return False

    async def _close(self) -> None:
        if self._closed:
            return
        # Marked first: a write queued behind the lock finds the connection closed.
        self._closed = True
        async with self._send_lock:
            await self._release()

    async def _release(self) -> None:
        """End the stream: end of file and close, or a forced close. Lock held."""
        stream = self._stream
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_GRACE
            if isinstance(stream, trio.SocketStream):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_eof()
            await stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(stream)
