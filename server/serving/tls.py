"""HTTPS: the server's TLS context from a certificate file and a key file.

The context offers TLS 1.2 and 1.3 only, HTTP/2 and HTTP/1.1 by ALPN, and no TLS
compression. Loading it is the check: files that are missing, unreadable, not PEM, or a
key that does not belong to the certificate make :class:`TlsError`, whose text is one
line for the operator. A key protected by a passphrase is refused rather than prompted
for: the service starts unattended.
"""

from __future__ import annotations

import ssl
from pathlib import Path

ALPN = ["h2", "http/1.1"]


class TlsError(Exception):
    """The certificate or key cannot be used; the message says which and why."""


def _no_passphrase(key: str) -> str:
    raise TlsError(f"the key {key} is protected by a passphrase; give it unencrypted (mode 0600)")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM, the chain after the leaf) and its ``key``."""
    _check_pem(cert, b"-----BEGIN CERTIFICATE-----", "certificate")
    _check_pem(key, b"PRIVATE KEY-----", "private key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(ALPN)
    try:
        context.load_cert_chain(cert, key, password=lambda: _no_passphrase(key))
    except ssl.SSLError as error:
        reason = _reason(error)
        raise TlsError(f"cannot use the certificate {cert} with the key {key}: {reason}") from None
    except OSError as error:
        raise TlsError(f"cannot read {cert} or {key}: {error.strerror or error}") from None
    return context


def _check_pem(path: str, marker: bytes, what: str) -> None:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"cannot read the TLS {what} {path}: {error.strerror or error}") from None
    if marker not in data:
        raise TlsError(f"{path} holds no PEM {what}")


def _reason(error: ssl.SSLError) -> str:
    if error.reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if error.reason:
        return error.reason.lower().replace("_", " ")
    return "not a valid PEM certificate and key"
