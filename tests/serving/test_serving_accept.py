"""The accept loop survives running out of descriptors, in process, with a real limit.

The connection ceiling keeps connections from using up the descriptors; this is about
the case it cannot see: something else took them. The test lowers this process's own
``RLIMIT_NOFILE`` to what is open, so that ``accept`` fails with ``EMFILE`` while
clients wait in the backlog; the server logs it, keeps its loop, and serves those
clients once the limit is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
from typing import Any

import pytest
import trio

from server.serving import Endpoint, ServingOptions, serve

CLIENTS = 5


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


def ask(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


async def test_emfile_on_accept_pauses_the_loop_and_serving_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = trio.Event()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with caplog.at_level(logging.ERROR, "vm_tenant.serving"), trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            [url] = await nursery.start(
                lambda task_status: serve(
                    [Endpoint(hello, "127.0.0.1:0")],
                    ServingOptions(),
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            port = int(url.rsplit(":", 1)[1])
            # The clients' sockets exist before the limit drops; connecting needs none.
            clients = [socket.socket() for _ in range(CLIENTS)]
            open_now = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, hard))
            try:
                for client in clients:
                    client.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        client.connect(("127.0.0.1", port))
                while not any("accept failed" in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.01)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for client in clients:
                    client.setblocking(True)
                    client.settimeout(10)
                answers = [await trio.to_thread.run_sync(ask, client) for client in clients]
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for client in clients:
                    client.close()
            stop.set()
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers
    [failure] = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert "Too many open files" in failure.getMessage()
