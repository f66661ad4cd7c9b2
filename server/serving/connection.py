"""One accepted connection: Hypercorn's sans-IO protocol over a Trio stream, one writer.

This replaces Hypercorn 0.18's ``trio.tcp_server.TCPServer``, which can end the whole
server on one abandoned request: its close path (``send_eof``) runs without the lock its
writes take, so when the app answers while the peer's end of file makes the protocol
write an error response, one of the two writes finds the stream busy. The
``BusyResourceError`` that raises is not caught per connection and ends the server.

Here every write to the stream - response bytes, the end of file, the close - happens
under one lock, and nothing writes after the close: that race cannot occur. And since a
connection is the peer's to break, anything else a connection raises is caught at its
edge: logged (:class:`~server.serving.failures.ConnectionFailures`), and only that
connection ends.

Every phase has a deadline. The connection keeps the deadline of the phase it is in as
a number (:attr:`Connection.deadline`: a phase change costs an assignment), and the
server's reaper (:meth:`~server.serving.listener.Connections.reap`) ends the connections
whose deadline has passed by cancelling the one scope their whole work runs in:

========== ============================================ ==============================
phase      the connection is ...                        it ends at
========== ============================================ ==============================
idle       waiting for a request, no byte of it yet     idle start + keep_alive_timeout
head       receiving a request head (or TLS handshake)  first byte + head_timeout
body       receiving a request body                     head complete + body_timeout
handling   answering a complete request                 no deadline of ours: the app's
========== ============================================ ==============================

An idle connection whose peer did send, but whose bytes the server has not read yet
(a busy event loop after a burst), is not the peer's fault: it gets a head deadline
instead of ending. Once the socket is closed (the answer is out and HTTP says close, or
the peer is gone), what still runs of the connection gets ``CLOSE_GRACE`` to finish: a
protocol task can wait for an event that a write to a vanished peer will never bring
(Hypercorn's HTTP/1.1 reader, paused behind a pipelined request), and must not hold the
connection's place for ever. A write that cannot finish within ``send_timeout`` (a peer that
stopped reading) ends the connection too. An ending connection is closed without an
answer (its peer has not finished asking), cancelling its app task if one waits for a
body.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import ssl
import sys
import termios
from collections import Counter

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.task_group import TaskGroup
from hypercorn.typing import AppWrapper, ConnectionState, WorkerContext

from server.serving.admission import Admission
from server.serving.failures import Address, ConnectionFailures
from server.serving.options import ServingOptions
from server.serving.protocol import Protocol

MAX_RECV = 2**16
#: how long a close may take to flush (TLS close_notify) before it is forced, and how
#: long the connection's tasks get to finish once its socket is closed
CLOSE_GRACE = 1.0


class Connection:
    """Serves HTTP on one stream until either side ends it or its deadline passes."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        *,
        client: Address | None,
        server: Address | None,
        options: ServingOptions,
        failures: ConnectionFailures,
        admission: Admission | None = None,
        counts: Counter[str] | None = None,
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
        self._admission = admission
        self._counts: Counter[str] = Counter() if counts is None else counts
        self._send_lock = trio.Lock()
        self._closed = False
        self._watchdog = trio.CancelScope()
        #: when the current phase ends (see the module's table)
        self.deadline = math.inf
        self._protocol: Protocol | None = None
        self._idle = True
        self._waiting = False
        now = trio.current_time()
        self.waiting_since = now
        self._idle_since = now
        self._head_since: float | None = None
        self._busy_since = now

    def shed(self) -> None:
        """End now, to make room for another connection (it leaves the admission then)."""
        if not self._watchdog.cancel_called:  # two newcomers may ask the same one
            self._counts["shed"] += 1
            self._watchdog.cancel()

    def has_unread(self) -> bool:
        """Whether the peer sent bytes the server has not read yet."""
        stream = self._stream
        sock = (
            stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
        )
        try:
            count = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return True  # closing already: nothing to gain from shedding it
        return int.from_bytes(count, sys.byteorder) > 0

    def expire(self, now: float) -> str | None:
        """The deadline has passed: end, unless unread bytes show the server was late.

        Returns the phase that ran out of time (``idle``, ``head``, ``body``), or None.
        """
        if self._idle and self._head_since is None and self.has_unread():
            self._head_since = now
            self._rearm()
            return None
        self._watchdog.cancel()
        if self._closed:
            return None
        if self._idle:
            return "idle" if self._head_since is None else "head"
        return "body"

    def end_if_idle(self) -> None:
        """Shutdown has begun: an idle connection ends now (a busy one when done)."""
        if self._idle:
            self._watchdog.cancel()

    async def run(self) -> None:
        """Serve until the end; never raises (but Cancelled from outside)."""
        try:
            with self._watchdog:
                try:
                    await self._serve()
                except* Exception as group:
                    self._failures.report(self.client, group)
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _serve(self) -> None:
        stream = self._stream
        alpn: str | None = "http/1.1"
        tls = isinstance(stream, trio.SSLStream)
        if isinstance(stream, trio.SSLStream):
            self._head_since = self._idle_since
            self._rearm()
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError:
                return
            alpn = stream.selected_alpn_protocol()
            self._idle_since, self._head_since = trio.current_time(), None
        self._rearm()
        async with TaskGroup() as task_group:
            self._protocol = Protocol(
                self._app,
                self._config,
                self._context,
                task_group,
                ConnectionState(self._state.copy()),
                tls,
                self.client,
                self._server,
                self._protocol_send,
                alpn,
            )
            await self._protocol.initiate()
            await self._read(self._protocol)

    async def _read(self, protocol: Protocol) -> None:
        stream = self._stream
        while True:
            try:
                data = await stream.receive_some(MAX_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                break
            if self._idle and self._head_since is None:
                self._head_since = trio.current_time()
                self._rearm()
            await protocol.handle(RawData(data=bytes(data)))
            if not data:
                break
            if not self._idle:
                self._rearm()
        await protocol.handle(Closed())

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if not self._idle:
                # An answer on its way: the body phase may be over although the reader has
                # not come back to say so (it waits behind a pipelined request).
                self._rearm()
            if not await self._write(event.data) and self._protocol is not None:
                await self._protocol.handle(Closed())
        elif isinstance(event, Updated):
            if event.idle:
                self._idle, self._idle_since = True, trio.current_time()
                self._head_since = None
            elif self._idle:
                self._idle, self._busy_since = False, trio.current_time()
                self._head_since = None
            self._rearm()
        elif isinstance(event, Closed):
            await self._close()
            if self._protocol is not None:
                await self._protocol.handle(Closed())

    def _rearm(self) -> None:
        """Set the watchdog's deadline for the phase the connection is in now."""
        if self._closed:
            return  # the close's grace period runs; no phase extends it
        options = self._options
        protocol = self._protocol
        if self._idle:
            if self._context.terminated.is_set():
                self._watchdog.cancel()
                return
            if self._head_since is None:
                deadline = self._idle_since + options.keep_alive_timeout
            else:
                deadline = self._head_since + options.head_timeout
            waiting = True
        else:
            since = protocol.receiving(self._busy_since) if protocol else None
            deadline = math.inf if since is None else since + options.body_timeout
            waiting = protocol is None or not protocol.handling()
        self.deadline = deadline
        if waiting is not self._waiting and self._admission is not None:
            self._waiting = waiting
            if waiting:
                self.waiting_since = trio.current_time()
                self._admission.waiting(self)
            else:
                self._admission.working(self)

    async def _write(self, data: bytes) -> bool:
        """Send ``data`` whole, or close the connection: True if it went out."""
        async with self._send_lock:
            if self._closed:
                return False
            if not data:
                return True
            # Shielded: a write cut in the middle would leave half a frame on the wire;
            # bounded instead, so that a peer who stops reading cannot hold it forever.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._options.send_timeout
                try:
                    await self._stream.send_all(data)
                    return True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if scope.cancelled_caught:
                self._counts["timeout_send"] += 1
            self._mark_closed()
            await self._release()
            return False

    async def _close(self) -> None:
        if self._closed:
            return
        # Marked first: a write queued behind the lock finds the connection closed.
        self._mark_closed()
        # Shielded from the start: the app's task that asks for the close is often
        # cancelled right then (Quart ends a request's tasks once its response is out),
        # and a close cut short at the lock would leave the socket open for good.
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                await self._release()

    def _mark_closed(self) -> None:
        self._closed = True
        self.deadline = trio.current_time() + CLOSE_GRACE

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
