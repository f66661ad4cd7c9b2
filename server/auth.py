"""Bearer-token authentication and the signed, opaque list cursors.

Tenant tokens are itsdangerous signatures (fixed salt, SHA-256 HMAC) over
``[tenant, token_id]``; a token is accepted only while the registry still lists that token
id for that tenant, so revocation and tenant deletion take effect at once and survive
restarts (both are audit entries, replayed at start). The operator's token is a random
secret kept in ``<data-dir>/admin.token``. Every kind of bad token gets the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from itsdangerous import BadSignature, URLSafeSerializer

from actors.fsutil import create_private
from actors.registry import TenantRegistry
from server.problems import Problem

TOKEN_SALT = "vm-tenant.token.v1"
CURSOR_SALT = "vm-tenant.cursor.v1"
UNAUTHORIZED = "a valid bearer token is required"


def load_or_create_secret(path: Path, make: str) -> str:
    """Read a secret file, creating it (mode 0600) first when it does not exist yet."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_private(path, (make + "\n").encode())
    return path.read_text().strip()


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / "admin.token"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the operator, or one token of one tenant."""

    kind: Literal["admin", "tenant"]
    tenant: str | None
    token_id: str


class Authority:
    """Issues and checks tenant tokens and list cursors; checks the admin token."""

    def __init__(self, signing_key: str, admin_token: str) -> None:
        signer = {"digest_method": hashlib.sha256}
        self._tokens = URLSafeSerializer(signing_key, salt=TOKEN_SALT, signer_kwargs=signer)
        self._cursors = URLSafeSerializer(signing_key, salt=CURSOR_SALT, signer_kwargs=signer)
        self._admin = admin_token.encode()

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> Authority:
        signing_key = load_or_create_secret(
            data_dir / "keys" / "token-signing.key", secrets.token_urlsafe(48)
        )
        admin = load_or_create_secret(
            admin_token_path(data_dir), "adm-" + secrets.token_urlsafe(32)
        )
        return cls(signing_key, admin)

    def issue(self, tenant: str, token_id: str) -> str:
        token = self._tokens.dumps([tenant, token_id])
        assert isinstance(token, str)
        return token

    def authenticate(self, header: str | None, registry: TenantRegistry) -> Principal:
        """The principal behind an ``Authorization`` header, or a 401 problem."""
        token = _bearer(header)
        if hmac.compare_digest(token.encode(), self._admin):
            return Principal("admin", None, "admin")
        try:
            payload = self._tokens.loads(token)
        except BadSignature:
            raise Problem("unauthorized", UNAUTHORIZED) from None
        if (
            not isinstance(payload, list)
            or len(payload) != 2
            or not all(isinstance(part, str) for part in payload)
        ):
            raise Problem("unauthorized", UNAUTHORIZED)
        tenant, token_id = payload
        if not registry.token_valid(tenant, token_id):
            raise Problem("unauthorized", UNAUTHORIZED)
        return Principal("tenant", tenant, token_id)

    def cursor(self, tenant: str, after: str) -> str:
        cursor = self._cursors.dumps([tenant, after])
        assert isinstance(cursor, str)
        return cursor

    def read_cursor(self, tenant: str, cursor: str) -> str:
        """The VM id a cursor continues after; 400 for a cursor this server did not issue."""
        try:
            payload = self._cursors.loads(cursor)
        except BadSignature:
            raise Problem("invalid_request", "`cursor` was not issued by this server") from None
        if not isinstance(payload, list) or len(payload) != 2 or payload[0] != tenant:
            raise Problem("invalid_request", "`cursor` was not issued by this server")
        return str(payload[1])


def _bearer(header: str | None) -> str:
    if not header:
        raise Problem("unauthorized", UNAUTHORIZED)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token or len(token) > 4096:
        raise Problem("unauthorized", UNAUTHORIZED)
    return token
