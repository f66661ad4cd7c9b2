"""The last-resort guard of one connection, in process, over real socket pairs.

No known peer input makes a connection raise any more (``test_serving_guard`` checks
those against a real server), so the guard is shown here with a fault injected into
the stream itself: the error is logged once with its traceback, ends that connection
only, and a second connection served beside it is untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from server.serving.connection import Connection
from server.serving.failures import ConnectionFailures
from server.serving.options import ServingOptions

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    headers = [(b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


class Injected(RuntimeError):
    pass


POISON = b"POISON"


class FaultyStream(trio.abc.HalfCloseableStream):
    """A real socket stream that raises an error no handler expects on reading POISON."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if data == POISON:
            raise Injected("injected fault")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def connection(stream: Any, failures: ConnectionFailures) -> Connection:
    return Connection(
        ASGIWrapper(hello),
        Config(),
        WorkerContext(None),
        ConnectionState({}),
        stream,
        client=("127.0.0.9", 4242),
        server=("127.0.0.1", 80),
        options=ServingOptions(),
        failures=failures,
    )


async def read_response(peer: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"hello"):
        chunk = await peer.receive_some()
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    one, two = trio.socket.socketpair()
    return trio.SocketStream(one), trio.SocketStream(two)


async def test_an_unexpected_error_ends_its_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = ConnectionFailures(logging.getLogger("test.serving"))
    bad_server, bad_peer = socket_pair()
    good_server, good_peer = socket_pair()
    with caplog.at_level(logging.ERROR, "test.serving"), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection(FaultyStream(bad_server), failures).run)
            good = connection(good_server, failures)
            nursery.start_soon(good.run)

            await bad_peer.send_all(REQUEST)
            assert (await read_response(bad_peer)).startswith(b"HTTP/1.1 200")
            await bad_peer.send_all(POISON)
            # The fault ends the connection: the peer reads the end of it, nothing else.
            assert await bad_peer.receive_some() == b""
            await bad_peer.aclose()

            for _ in range(3):
                await good_peer.send_all(REQUEST)
                assert (await read_response(good_peer)).startswith(b"HTTP/1.1 200")
            await good_peer.aclose()
    assert failures.count == 1
    [record] = caplog.records
    assert "connection failed (peer 127.0.0.9:4242): Injected" in record.getMessage()
    assert record.exc_info is not None


async def test_a_repeated_kind_of_failure_is_logged_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = ConnectionFailures(logging.getLogger("test.serving"))
    with caplog.at_level(logging.ERROR, "test.serving"), trio.fail_after(10):
        for _ in range(3):
            server, peer = socket_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection(FaultyStream(server), failures).run)
                await peer.send_all(REQUEST)
                await read_response(peer)
                await peer.send_all(POISON)
            await peer.aclose()
    assert failures.count == 3
    assert [record.exc_info is not None for record in caplog.records] == [True, False, False]
