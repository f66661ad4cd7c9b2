"""The connection ceilings' answers, against a real ``vm-tenant serve``, and their metrics.

A peer address over its own ceiling, and a newcomer when every place is held by a
connection the server is working on, get an immediate 503 ``overloaded`` problem with
``Retry-After`` and are closed; others are served meanwhile; a trusted proxy is exempt
from the per-peer ceiling. ``/metrics`` counts the refusals and the deadlines that ran
out.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import LiveServer
from peers import address

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    started: list[LiveServer] = []

    def run(**env: str) -> LiveServer:
        settings = {f"VM_TENANT_{name.upper()}": value for name, value in env.items()}
        settings["VM_TENANT_METRICS_BIND"] = "127.0.0.1:0"
        server = LiveServer(tmp_path / f"data-{len(started)}", env=settings).start()
        started.append(server)
        return server

    yield run
    for server in started:
        server.kill()


def connect_from(server: LiveServer, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(address(server.url))
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def assert_overloaded(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable", answer[:200]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["retry-after"] == "1"
    assert headers["content-type"] == "application/problem+json"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    problem: dict[str, object] = json.loads(body)
    assert problem["status"] == 503 and problem["code"] == "overloaded"
    return problem


def metrics(server: LiveServer) -> str:
    return httpx.get(server.metrics_url, timeout=10).text


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_a_peer_over_its_ceiling_is_refused_and_others_are_served(start: object) -> None:
    server: LiveServer = start(max_connections_per_peer="3")  # type: ignore[operator]
    held = [connect_from(server, "127.0.0.5") for _ in range(3)]
    try:
        extra = connect_from(server, "127.0.0.5")
        problem = assert_overloaded(read_all(extra))
        assert "your address" in str(problem["detail"])
        extra.close()
        other = connect_from(server, "127.0.0.6")
        other.sendall(REQUEST)
        assert read_all(other).startswith(b"HTTP/1.1 200")
        other.close()
    finally:
        for sock in held:
            sock.close()
    text = metrics(server)
    assert sample(text, 'vm_tenant_connections_refused_total{reason="peer"}') == 1


def test_a_trusted_proxy_is_not_held_to_the_per_peer_ceiling(start: object) -> None:
    server: LiveServer = start(  # type: ignore[operator]
        max_connections_per_peer="2", trusted_proxies="127.0.0.7"
    )
    held = [connect_from(server, "127.0.0.7") for _ in range(5)]
    try:
        for sock in held:
            sock.sendall(REQUEST)
        assert all(read_all(sock).startswith(b"HTTP/1.1 200") for sock in held)
    finally:
        for sock in held:
            sock.close()


def stalled_reader(server: LiveServer) -> socket.socket:
    """A connection whose answers the server cannot finish writing: it pipelines large
    answers and reads none, so the server stays busy with it (never shed)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address(server.url))
    sock.setblocking(False)
    request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        while True:
            sock.send(request)
    except BlockingIOError:
        pass
    return sock


def test_when_nobody_can_yield_a_newcomer_is_refused(start: object) -> None:
    long = {name: "600" for name in ("send_timeout", "body_timeout", "head_timeout")}
    server: LiveServer = start(max_connections="3", **long)  # type: ignore[operator]
    held = [stalled_reader(server) for _ in range(3)]
    try:
        newcomer = connect_from(server, "127.0.0.1")
        problem = assert_overloaded(read_all(newcomer))
        assert "retry" in str(problem["detail"])
        newcomer.close()
    finally:
        for sock in held:
            sock.close()
    # Once the server has seen those go, there is room again, long before any deadline:
    # their answers can never be written, and the connections end with their sockets.
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "no room after the held connections closed"
        time.sleep(0.05)
    text = metrics(server)
    assert sample(text, 'vm_tenant_connections_refused_total{reason="full"}') >= 1
    assert sample(text, "vm_tenant_connections_limit") == 3


def test_the_deadlines_that_ran_out_are_counted(start: object) -> None:
    server: LiveServer = start(head_timeout="0.5", keep_alive_timeout="0.5")  # type: ignore[operator]
    partial_head = connect_from(server, "127.0.0.1")
    partial_head.sendall(b"GET /healthz HTTP/1.1\r\n")
    silent = connect_from(server, "127.0.0.1")
    assert read_all(partial_head) == b"" and read_all(silent) == b""
    partial_head.close()
    silent.close()
    text = metrics(server)
    assert sample(text, 'vm_tenant_connection_timeouts_total{phase="head"}') == 1
    assert sample(text, 'vm_tenant_connection_timeouts_total{phase="idle"}') >= 1
    assert sample(text, "vm_tenant_connection_failures_total") == 0
    assert sample(text, "vm_tenant_connections_accepted_total") >= 2
