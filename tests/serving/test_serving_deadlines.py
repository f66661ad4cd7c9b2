"""Every phase of a connection ends, against a real ``vm-tenant serve``.

Each test sets the deadline it watches short and every other one long (60 s), then
checks which one ended the connection: the connection must close while the other
deadlines are still far off, and while the peer is still doing its slow part (a head
or a body that would take a minute to trickle in). Nothing here measures how fast.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from conftest import LiveServer, Provision, bearer
from peers import address

LONG = "60"
#: the hang guard of every wait below; well inside the LONG deadlines
GUARD = 30


def server_with(tmp_path: object, **deadlines: str) -> LiveServer:
    env = {
        "VM_TENANT_KEEP_ALIVE_TIMEOUT": LONG,
        "VM_TENANT_HEAD_TIMEOUT": LONG,
        "VM_TENANT_BODY_TIMEOUT": LONG,
        "VM_TENANT_RATE_LIMIT": "0",
    }
    env.update({f"VM_TENANT_{name.upper()}": value for name, value in deadlines.items()})
    return LiveServer(tmp_path / "data", env=env).start()  # type: ignore[operator]


@pytest.fixture
def servers(tmp_path: object) -> object:
    started: list[LiveServer] = []

    def start(**deadlines: str) -> LiveServer:
        server = server_with(tmp_path, **deadlines)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


async def connect(server: LiveServer) -> trio.SocketStream:
    host, port = address(server.url)
    return await trio.open_tcp_stream(host, port)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with trio.fail_after(GUARD):
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def closed_while(stream: trio.SocketStream, trickle: bytes) -> bytes:
    """Send ``trickle`` a byte every 0.2 s (a minute's worth) while waiting for the close;
    returns what the server sent. Fails if the trickle ends before the server closes."""
    async with trio.open_nursery() as nursery:

        async def drip() -> None:
            for byte in trickle:
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    return
                await trio.sleep(0.2)
            raise AssertionError("the peer finished before the server closed on it")

        nursery.start_soon(drip)
        received = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    return received


async def test_a_response_to_connection_close_or_http_1_0_ends_the_connection(
    servers: object,
) -> None:
    server = servers()  # type: ignore[operator]
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\n\r\n",
    ):
        stream = await connect(server)
        await stream.send_all(request)
        answer = await read_until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        await stream.aclose()


async def test_an_idle_keep_alive_connection_is_closed(servers: object) -> None:
    server = servers(keep_alive_timeout="0.5")  # type: ignore[operator]
    stream = await connect(server)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    await stream.aclose()
    silent = await connect(server)
    assert await read_until_closed(silent) == b""
    await silent.aclose()


async def test_a_slow_request_head_is_cut_off(servers: object) -> None:
    server = servers(head_timeout="1")  # type: ignore[operator]
    stream = await connect(server)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 300 + b"\r\n\r\n"
    assert await closed_while(stream, head) == b""
    await stream.aclose()


async def test_a_slow_request_body_is_cut_off(servers: object, provision: Provision) -> None:
    server = servers(body_timeout="1")  # type: ignore[operator]
    async with server.client() as client:
        token = (await provision(client, bearer(server.admin_token), "slow")).token
    body = b'{"vcpus": 1, "memory_mib": 256, "image": "' + b"d" * 300 + b'"}'
    stream = await connect(server)
    await stream.send_all(
        b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    await closed_while(stream, body)
    await stream.aclose()
    # Nothing of the cut request happened; the server goes on serving.
    async with server.client() as client:
        vms = await client.get("/v1/vms", headers=bearer(token))
        assert vms.status_code == 200 and vms.json()["vms"] == []


async def test_a_peer_that_stops_reading_does_not_hold_its_connection(
    servers: object,
) -> None:
    """A pipelining peer that never reads: its answers fill the buffers, a write stalls,
    and the send deadline ends the connection."""
    server = servers(send_timeout="1")  # type: ignore[operator]
    stream = await connect(server)
    stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(GUARD):
        with pytest.raises(trio.BrokenResourceError):
            while True:
                await stream.send_all(request)
    await stream.aclose()
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/healthz")).status_code == 200
