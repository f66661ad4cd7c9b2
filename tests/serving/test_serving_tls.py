"""HTTPS on the bind address, with a certificate the test makes (``trustme``).

A real ``vm-tenant serve`` with ``VM_TENANT_TLS_CERT``/``VM_TENANT_TLS_KEY`` answers over
TLS, HTTP/1.1 and HTTP/2 by ALPN, and nothing in plain HTTP. Files that cannot serve
(missing, not PEM, a key of another certificate, a key with a passphrase, one without
the other) stop the start with one line and exit 2, before anything is created.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from conftest import LiveServer
from peers import address


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """The server's certificate chain and key, another certificate's key, and bad files."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    other = ca.issue_cert("127.0.0.1")
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "other_key", "ca")}
    leaf.private_key_and_cert_chain_pem.write_to_path(files["cert"])
    leaf.private_key_pem.write_to_path(files["key"])
    other.private_key_pem.write_to_path(files["other_key"])
    ca.cert_pem.write_to_path(files["ca"])
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    files["locked_key"] = tmp_path / "locked.pem"
    files["locked_key"].write_bytes(
        key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    files["junk"] = tmp_path / "junk.pem"
    files["junk"].write_text("not a certificate\n")
    return files


@pytest.fixture
def https_server(tmp_path: Path, pems: dict[str, Path]) -> LiveServer:
    env = {"VM_TENANT_TLS_CERT": str(pems["cert"]), "VM_TENANT_TLS_KEY": str(pems["key"])}
    server = LiveServer(tmp_path / "data", env=env).start()
    yield server  # type: ignore[misc]
    server.kill()


async def test_the_api_answers_over_https_with_http2_and_http1(
    https_server: LiveServer, pems: dict[str, Path]
) -> None:
    assert https_server.url.startswith("https://127.0.0.1:")
    verify = ssl.create_default_context(cafile=str(pems["ca"]))
    for http2 in (False, True):
        async with httpx.AsyncClient(
            base_url=https_server.url, verify=verify, http2=http2, timeout=10
        ) as client:
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            admin = {"Authorization": f"Bearer {https_server.admin_token}"}
            tenants = await client.get("/v1/admin/tenants", headers=admin)
            assert tenants.status_code == 200


def test_plain_http_to_the_https_port_gets_no_answer(
    https_server: LiveServer, pems: dict[str, Path]
) -> None:
    with socket.create_connection(address(https_server.url), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1 200" not in data
    # ... and the server goes on serving TLS.
    verify = ssl.create_default_context(cafile=str(pems["ca"]))
    assert httpx.get(f"{https_server.url}/healthz", verify=verify).status_code == 200


@pytest.mark.parametrize(
    ("cert", "key", "says"),
    [
        ("missing", "key", "cannot read the TLS certificate"),
        ("junk", "key", "holds no PEM certificate"),
        ("cert", "junk", "holds no PEM private key"),
        ("cert", "other_key", "the key does not belong to the certificate"),
        ("cert", "locked_key", "is protected by a passphrase"),
        ("cert", None, "HTTPS needs both tls_cert and tls_key"),
    ],
    ids=["missing", "junk-cert", "junk-key", "mismatched", "passphrase", "cert-alone"],
)
def test_unusable_tls_files_stop_the_start_in_one_line(
    tmp_path: Path, pems: dict[str, Path], cert: str, key: str | None, says: str
) -> None:
    data_dir = tmp_path / "never-created"
    argv = [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(data_dir)]
    argv += ["--bind", "127.0.0.1:0", "--tls-cert", str(pems.get(cert, tmp_path / cert))]
    if key is not None:
        argv += ["--tls-key", str(pems[key])]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(problems) == 1 and says in problems[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not data_dir.exists()
