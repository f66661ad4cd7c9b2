"""``--trusted-proxies``: the client behind a proxy, from ``X-Forwarded-For``, only if trusted.

Against a real ``vm-tenant serve`` trusting 127.0.0.2 (two loopback addresses make two
peers): a request from 127.0.0.2 is audited with the address its header names, one
from 127.0.0.3 with its own address whatever its header says, and no header, however
malformed, makes anything but an ordinary answer. The walk along the header (trusted
hops skipped, a bad entry ending it) is checked on the layer itself.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from conftest import LiveServer, bearer
from peers import address
from server.serving.proxies import ForwardedFor, parse_networks

TRUSTED = "127.0.0.2"
UNTRUSTED = "127.0.0.3"


@pytest.fixture
def proxied(tmp_path: Any) -> LiveServer:
    env = {"VM_TENANT_TRUSTED_PROXIES": f"{TRUSTED}/32, 10.0.0.0/8"}
    server = LiveServer(tmp_path / "data", env=env).start()
    yield server  # type: ignore[misc]
    server.kill()


def client_from(server: LiveServer, source: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=server.url, transport=transport, timeout=10)


def create_tenant(client: httpx.Client, server: LiveServer, tenant: str, xff: list[str]) -> int:
    headers = [("Authorization", f"Bearer {server.admin_token}")]
    headers += [("X-Forwarded-For", value) for value in xff]
    response = client.post(
        "/v1/admin/tenants",
        json={"id": tenant, "quota": {"vcpus": 1, "memory_mib": 64, "vms": 1}},
        headers=headers,
    )
    return response.status_code


def audited_source(server: LiveServer, tenant: str) -> str | None:
    response = httpx.get(
        f"{server.url}/v1/admin/audit", params={"limit": 1000}, headers=bearer(server.admin_token)
    )
    [entry] = [e for e in response.json()["entries"] if e.get("tenant") == tenant]
    ip: str | None = entry["source"]["ip"]
    return ip


def test_a_trusted_peer_names_the_client_and_an_untrusted_one_cannot(
    proxied: LiveServer,
) -> None:
    with client_from(proxied, TRUSTED) as client:
        assert create_tenant(client, proxied, "via-proxy", ["203.0.113.7"]) == 201
        # Several hops: the right-most address that is not a trusted proxy is the client.
        hops = ["198.51.100.1, 203.0.113.8", "10.1.2.3"]
        assert create_tenant(client, proxied, "via-two-proxies", hops) == 201
        assert create_tenant(client, proxied, "proxy-itself", []) == 201
    with client_from(proxied, UNTRUSTED) as client:
        assert create_tenant(client, proxied, "spoofer", ["203.0.113.9"]) == 201
    assert audited_source(proxied, "via-proxy") == "203.0.113.7"
    assert audited_source(proxied, "via-two-proxies") == "203.0.113.8"
    assert audited_source(proxied, "proxy-itself") == TRUSTED
    assert audited_source(proxied, "spoofer") == UNTRUSTED


MALFORMED = [
    b"",
    b" , ,",
    b"unknown",
    b"999.1.1.1",
    b"203.0.113.7, garbage",
    b"[::1",
    b"1.2.3.4:99999:1",
    b"\xc3\xa9\xff",
    b"1.2.3.4, " * 1500,
    b"2001:db8::1%eth0",
]


def raw_request(server: LiveServer, source: str, head: bytes, body: bytes = b"") -> bytes:
    """Send exactly these bytes (headers a client library would refuse) and read the end."""
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(address(server.url))
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("value", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_header_from_a_trusted_peer_is_not_an_error(
    proxied: LiveServer, value: bytes
) -> None:
    tenant = f"odd-{MALFORMED.index(value)}"
    body = json.dumps({"id": tenant, "quota": {"vcpus": 1, "memory_mib": 64, "vms": 1}})
    head = (
        b"POST /v1/admin/tenants HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {proxied.admin_token}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"X-Forwarded-For: "
        + value
        + b"\r\n\r\n"
    )
    answer = raw_request(proxied, TRUSTED, head, body.encode())
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    # An entry that is not an address ends the walk: the client is the last good hop.
    source = audited_source(proxied, tenant)
    assert source in {TRUSTED, "203.0.113.7", "1.2.3.4"}, source


LAYER = ForwardedFor(lambda *_: None, parse_networks("10.0.0.0/8, 192.0.2.1, 2001:db8::/32"))  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        ("203.0.113.5", [b"198.51.100.1"], "203.0.113.5"),  # untrusted peer: ignored
        ("10.0.0.1", [], "10.0.0.1"),  # no header
        ("10.0.0.1", [b"198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", [b"198.51.100.1, 10.9.9.9, 192.0.2.1"], "198.51.100.1"),
        ("10.0.0.1", [b"198.51.100.1", b"198.51.100.2"], "198.51.100.2"),  # two header lines
        ("10.0.0.1", [b"10.1.1.1, 10.2.2.2"], "10.1.1.1"),  # all trusted: the left-most
        ("10.0.0.1", [b"198.51.100.1, garbage, 10.2.2.2"], "10.2.2.2"),  # walk stops at junk
        ("10.0.0.1", [b"garbage"], "10.0.0.1"),
        ("10.0.0.1", [b"198.51.100.1:4711"], "198.51.100.1"),
        ("10.0.0.1", [b"[2001:db9::1]:4711"], "2001:db9::1"),
        ("10.0.0.1", [b"2001:db9::2"], "2001:db9::2"),
        ("::ffff:10.0.0.1", [b"198.51.100.3"], "198.51.100.3"),  # mapped peer address
        ("2001:db8::5", [b"::ffff:198.51.100.4"], "198.51.100.4"),
        ("10.0.0.1", [b"\xff\xfe, 198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", [b"[2001:db9::1"], "10.0.0.1"),  # no closing bracket
        ("10.0.0.1", [b"fe80::1%eth0"], "10.0.0.1"),  # a zone is no client's address
    ],
)
def test_the_walk_along_the_header(peer: str, headers: list[bytes], client: str) -> None:
    assert LAYER.client_of(peer, [(b"x-forwarded-for", value) for value in headers]) == client


def test_bad_networks_are_named() -> None:
    assert parse_networks(" 10.0.0.0/8 ,, 192.0.2.7 ") == parse_networks("10.0.0.0/8,192.0.2.7")
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_networks("10.0.0.0/33")
