"""No peer can end the process: abandoned requests against a real ``vm-tenant serve``.

The attack: a request head that announces a body, one byte of it, then the peer goes
away (``shutdown(SHUT_WR)`` and close, or a plain close). The app answers before it has
the body (401 without a token, 404, 405), or waits for it (a valid token), while the
peer's end of file arrives: the two paths used to write to the socket at the same time,
and the error that made ended the whole server. Each variant runs 1,000 times against one
server, several at once, over HTTP/1.1 and HTTP/2; the server must then still answer an
honest client, and must not have needed its last-resort guard (the race itself is gone).
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import h2.errors
import h2.events
import httpx
import pytest

from conftest import LiveServer, bearer
from peers import (
    H2Peer,
    abandoned_h2_request,
    abandoned_request,
    h2_request,
    honest_status,
    raw_answer,
)

ROUNDS = 1000
BODY_HEAD = b"Host: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"


def head(method: str, path: str, extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\n".encode() + BODY_HEAD + extra + b"\r\n"


def tenant_token(server: LiveServer) -> str:
    response = httpx.post(
        f"{server.url}/v1/admin/tenants",
        json={"id": "honest", "quota": {"vcpus": 4, "memory_mib": 4096, "vms": 4}},
        headers=bearer(server.admin_token),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def assert_still_serving(server: LiveServer, token: str) -> None:
    assert server.proc is not None
    assert server.proc.poll() is None, "the server exited:\n" + "".join(server.log[-60:])
    assert honest_status(server.url) == 200
    spawn = httpx.post(
        f"{server.url}/v1/vms",
        json={"vcpus": 1, "memory_mib": 256, "image": "debian-12"},
        headers=bearer(token),
        timeout=30,
    )
    assert spawn.status_code == 201, spawn.text
    assert h2_request(server.url, h2_headers("GET", "/healthz"))[0] == 200
    guarded = [line for line in server.log if "connection failed" in line]
    assert not guarded, "the guard had to catch errors:\n" + "".join(guarded[:5])


def h2_headers(method: str, path: str, extra: list[tuple[str, str]] = []) -> list[tuple[str, str]]:  # noqa: B006
    return [(":method", method), (":path", path), (":scheme", "http"), (":authority", "x"), *extra]


def run_rounds(*attacks: partial[None]) -> None:
    """Each attack ``ROUNDS`` times, the attacks side by side."""
    with ThreadPoolExecutor(len(attacks)) as pool:
        futures = [pool.submit(lambda a=a: [a() for _ in range(ROUNDS)]) for a in attacks]
        for future in futures:
            future.result()


def test_an_abandoned_body_after_an_early_401_never_ends_the_server(
    live_server: LiveServer,
) -> None:
    token = tenant_token(live_server)
    url = live_server.url
    run_rounds(
        partial(abandoned_request, url, head("POST", "/v1/vms"), b"{", half_close=True),
        partial(abandoned_request, url, head("POST", "/v1/vms"), b"{", half_close=False),
    )
    assert_still_serving(live_server, token)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/no/such/route"), ("PATCH", "/v1/vms"), ("PUT", "/healthz")],
    ids=["404", "405", "405-healthz"],
)
def test_an_abandoned_body_after_a_404_or_405_never_ends_the_server(
    live_server: LiveServer, method: str, path: str
) -> None:
    token = tenant_token(live_server)
    url = live_server.url
    run_rounds(
        partial(abandoned_request, url, head(method, path), b"{", half_close=True),
        partial(abandoned_request, url, head(method, path), b"{", half_close=False),
    )
    assert_still_serving(live_server, token)


def test_an_abandoned_body_with_a_valid_token_never_ends_the_server(
    live_server: LiveServer,
) -> None:
    token = tenant_token(live_server)
    auth = f"Authorization: Bearer {token}\r\n".encode()
    url = live_server.url
    run_rounds(
        partial(abandoned_request, url, head("POST", "/v1/vms", auth), b"{", half_close=True),
        partial(abandoned_request, url, head("POST", "/v1/vms", auth), b'{"vc', half_close=False),
    )
    assert_still_serving(live_server, token)


def test_an_abandoned_http2_body_never_ends_the_server(live_server: LiveServer) -> None:
    token = tenant_token(live_server)
    url = live_server.url
    post = h2_headers("POST", "/v1/vms", [("content-length", "1000")])
    authorised = [*post, ("authorization", f"Bearer {token}")]
    run_rounds(
        partial(abandoned_h2_request, url, post, b"{"),
        partial(abandoned_h2_request, url, authorised, b"{"),
        partial(abandoned_h2_request, url, h2_headers("PATCH", "/v1/vms", post[4:]), b"{"),
    )
    assert_still_serving(live_server, token)


def test_http2_data_after_an_early_answer_is_refused_politely(live_server: LiveServer) -> None:
    """The rest of a body whose answer (401) already went out: RST_STREAM(NO_ERROR), and
    the connection goes on (this used to raise KeyError and end the server)."""
    token = tenant_token(live_server)
    for _ in range(50):
        peer = H2Peer(live_server.url)
        try:
            peer.conn.send_headers(1, h2_headers("POST", "/v1/vms", [("content-length", "9")]))
            peer.conn.send_data(1, b"{")
            peer.flush()
            response = peer.wait_for(h2.events.ResponseReceived)
            assert dict(response.headers)[b":status"] == b"401"
            peer.wait_for(h2.events.StreamEnded)
            peer.conn.send_data(1, b'"vcpus":')
            peer.flush()
            reset = peer.wait_for(h2.events.StreamReset)
            assert (reset.stream_id, reset.error_code) == (1, h2.errors.ErrorCodes.NO_ERROR)
            peer.conn.send_headers(3, h2_headers("GET", "/healthz"), end_stream=True)
            peer.flush()
            again = peer.wait_for(h2.events.ResponseReceived)
            assert (again.stream_id, dict(again.headers)[b":status"]) == (3, b"200")
        finally:
            peer.close()
    assert_still_serving(live_server, token)


PLAIN = [(b":scheme", b"http"), (b":authority", b"x")]


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"GET"), (b":path", b"/\xff\xfe"), *PLAIN],
        [(b":method", b"G\xc3\xa9T"), (b":path", b"/healthz"), *PLAIN],
        [(b":method", b"CONNECT"), (b":authority", b"x:443")],
    ],
    ids=["non-ascii-path", "non-ascii-method", "connect-without-path"],
)  # fmt: skip
def test_malformed_http2_request_heads_reset_their_stream_only(
    live_server: LiveServer, headers: list[tuple[bytes, bytes]]
) -> None:
    token = tenant_token(live_server)
    for _ in range(20):
        peer = H2Peer(live_server.url)
        try:
            peer.conn.send_headers(1, headers, end_stream=True)
            peer.flush()
            reset = peer.wait_for(h2.events.StreamReset, h2.events.ConnectionTerminated)
            assert isinstance(reset, h2.events.StreamReset), reset
            assert reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
            peer.conn.send_headers(3, h2_headers("GET", "/healthz"), end_stream=True)
            peer.flush()
            again = peer.wait_for(h2.events.ResponseReceived)
            assert dict(again.headers)[b":status"] == b"200"
        finally:
            peer.close()
    assert_still_serving(live_server, token)


HOSTILE_HEADS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n",
    b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/vms/%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"GET /\r\n",
]


def test_hostile_and_random_bytes_never_break_a_connection_handler(
    live_server: LiveServer,
) -> None:
    """Odd but parseable heads, then random bytes as HTTP/1.1 and after an HTTP/2
    preface (a fixed seed, so a failure repeats): every connection ends as HTTP says,
    none by an error of the server's."""
    token = tenant_token(live_server)
    noise = random.Random(20261130)
    attacks = [partial(abandoned_request, live_server.url, head, b"", half_close=True)
               for head in HOSTILE_HEADS]  # fmt: skip
    for _ in range(300):
        blob = noise.randbytes(noise.randint(1, 2000))
        attacks.append(partial(abandoned_request, live_server.url, blob, b"", half_close=True))
        framed = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + noise.randbytes(noise.randint(1, 500))
        attacks.append(partial(abandoned_request, live_server.url, framed, b"", half_close=True))
    for attack in attacks:
        attack()
    assert_still_serving(live_server, token)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
        (b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
    ids=["request-line", "content-length-text", "content-length-twice", "transfer-coding",
         "huge-head"],
)  # fmt: skip
def test_a_request_http_cannot_parse_gets_a_problem_document(
    live_server: LiveServer, head: bytes, status: int
) -> None:
    """Like every error (API.md): a problem document with its code and an X-Request-Id,
    not Hypercorn's empty answer; and never a 5xx for bad input."""
    response, body = raw_answer(live_server.url, head, half_close=True)
    headers = {name.decode(): value.decode() for name, value in response.headers}
    assert response.status_code == status
    assert headers["content-type"] == "application/problem+json"
    assert headers["x-request-id"] and headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["status"] == status and problem["code"] == "invalid_request"
    assert problem["type"] and problem["title"] and problem["detail"]
    assert honest_status(live_server.url) == 200
