"""Which HTTP protocol speaks on a connection: Hypercorn's HTTP/1.1 or HTTP/2, both guarded.

:class:`Protocol` does what Hypercorn's ``ProtocolWrapper`` does (HTTP/1.1 unless ALPN
chose ``h2``; a switch to HTTP/2 on prior knowledge or an ``h2c`` upgrade), with
:class:`GuardedH2` in place of Hypercorn 0.18's ``H2Protocol``. That one raises out of
its event handling, and so ends the connection's task with an error, on two frames any
peer can send:

- DATA on a stream whose answer already went out (the app answered before reading the
  body, e.g. a 401): its stream is gone from ``streams`` and the lookup raises
  ``KeyError``. RFC 9113 section 8.1 lets a server that has answered ask for the rest of
  the body to stop with ``RST_STREAM(NO_ERROR)``; that is what happens here, after the
  data's flow-control credit is given back so that the connection keeps its window.
- HEADERS whose ``:method`` or ``:path`` is missing or not ASCII (a ``CONNECT`` without
  ``:path``; a raw ``0xff`` byte in the path): decoding them raises. Such a request is
  malformed (RFC 9113 section 8.1.1) and its stream is reset with ``PROTOCOL_ERROR``.

:class:`GuardedH11` is Hypercorn's HTTP/1.1 whose answer to a request h11 cannot parse
(a broken request line, a bad ``Content-Length``, a head over h11's size limit) is a
problem document with an ``X-Request-Id``, like every other error (API.md), instead of
Hypercorn's empty 400 or 431.

It also answers what the connection's deadlines need to know (:meth:`Protocol.receiving`,
:meth:`Protocol.handling`): whether a request body is still on its way, and since when.
Those read Hypercorn's and h11's state (``their_state``, the open streams), which is why
the Hypercorn dependency is pinned below its next minor version.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h11
import msgspec
import trio
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.typing import AppWrapper, ConnectionState, TaskGroup, WorkerContext

from server.problems import problem_body

Send = Callable[[Event], Awaitable[None]]


class GuardedH2(H2Protocol):
    """Hypercorn's HTTP/2 protocol, with the frames it cannot handle answered first, and
    the streams whose request body is still arriving (with when each began)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.receiving: dict[int, float] = {}

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        # One at a time: whether a stream still exists depends on the events before it
        # (a request opens it; an app that answered while earlier ones ran closed it).
        for event in events:
            if self._wanted(event):
                await super()._handle_events([event])
        await self._flush()

    def _wanted(self, event: h2.events.Event) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            if not _well_formed(event.headers):
                self._reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return False
            if event.stream_ended is None:
                self.receiving[event.stream_id] = trio.current_time()
        elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
            self.receiving.pop(event.stream_id, None)
        elif isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            self._reset(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            return False
        return True

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        self.receiving.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, code)


class GuardedH11(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, answering an unparseable request with a problem."""

    async def _send_error_response(self, status_code: int) -> None:
        # h11's hint is 400, 431 for a head over its size limit (kept: it tells the
        # client what to shorten), or 501 for a Transfer-Encoding it does not speak
        # (a 400 here: bad input never gets a 5xx). The code is the input's fault.
        body = problem_body("invalid_request", "the request is not valid HTTP/1.1")
        if status_code != 431:
            status_code = 400
        else:
            body = msgspec.structs.replace(
                body,
                status=431,
                title="Request header fields too large",
                detail="the request head is too large",
            )
        payload = msgspec.json.encode(body)
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(payload)).encode()),
            (b"x-request-id", secrets.token_hex(16).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=payload))
        await self._send_h11_event(h11.EndOfMessage())


def _well_formed(headers: Any) -> bool:
    """Whether the request has an ASCII ``:method`` and ``:path`` (what Hypercorn decodes)."""
    found = 0
    for name, value in headers or ():
        if name in (b":method", b":path"):
            if not value.isascii():
                return False
            found += 1
    return found == 2


class Protocol:
    """The protocol of one connection, switching from HTTP/1.1 to HTTP/2 when asked to."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        task_group: TaskGroup,
        state: ConnectionState,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Send,
        alpn_protocol: str | None,
    ) -> None:
        self._args = (app, config, context, task_group, state, ssl, client, server, send)
        self.inner: GuardedH11 | GuardedH2
        if alpn_protocol == "h2":
            self.inner = GuardedH2(*self._args)
        else:
            self.inner = GuardedH11(*self._args)

    async def initiate(self) -> None:
        await self.inner.initiate()

    def receiving(self, busy_since: float) -> float | None:
        """Since when the oldest request body still on its way has been awaited, or None.

        ``busy_since`` is when the current HTTP/1.1 request's head was complete.
        """
        inner = self.inner
        if isinstance(inner, GuardedH2):
            return min(inner.receiving.values(), default=None)
        if getattr(inner.connection, "their_state", None) is h11.SEND_BODY:
            return busy_since
        return None

    def handling(self) -> bool:
        """Whether some request is complete and its answer not yet: the server is busy."""
        inner = self.inner
        if isinstance(inner, GuardedH2):
            return any(stream not in inner.receiving for stream in inner.streams)
        return getattr(inner.connection, "their_state", None) is not h11.SEND_BODY

    async def handle(self, event: Event) -> None:
        try:
            await self.inner.handle(event)
        except H2ProtocolAssumedError as switch:
            # HTTP/2 with prior knowledge: the connection preface arrived as a request line.
            self.inner = GuardedH2(*self._args)
            await self.inner.initiate()
            if switch.data:
                await self.inner.handle(RawData(data=switch.data))
        except H2CProtocolRequiredError as switch:
            self.inner = GuardedH2(*self._args)
            await self.inner.initiate(switch.headers, switch.settings)
            if switch.data:
                await self.inner.handle(RawData(data=switch.data))
