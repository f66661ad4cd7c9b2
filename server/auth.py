"""Bearer-token authentication and the signed, opaque list cursors.

Tenant tokens are itsdangerous signatures (fixed salt, SHA-256 HMAC) over
``[tenant, token_id]``, or ``[tenant, token_id, expires]`` for a token with a lifetime
(``expires``: wall-clock UTC seconds since the epoch, so the expiry is signed and survives
restarts). A token is accepted only while it has not expired, one of the keyring's active
keys signed it (:mod:`server.keyring`), and the registry still lists that token id for that
tenant, so revocation and tenant deletion take effect at once and survive restarts (both
are audit entries, replayed at start). The operator's token is a random secret kept in
``<data-dir>/admin.token``. Every kind of bad token gets the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from itsdangerous import BadSignature, URLSafeSerializer

from actors.fsutil import create_private
from actors.tenants.registry import TenantRegistry
from server.keyring import Clock, Keyring, rfc3339
from server.problems import Problem

TOKEN_SALT = "vm-tenant.token.v1"
#: verified signatures remembered (a bound, not a tuning knob: far above active tokens)
VERIFIED_CACHE_SIZE = 65536
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
    """Issues and checks tenant tokens and list cursors; checks the admin token.

    ``signing_key`` is the data dir's keyring, or a single secret (a keyring kept in memory).
    ``clock`` gives wall-clock seconds, injectable so that tests can let tokens expire.
    """

    def __init__(
        self, signing_key: str | Keyring, admin_token: str, *, clock: Clock = time.time
    ) -> None:
        if isinstance(signing_key, str):
            signing_key = Keyring.in_memory(signing_key, clock)
        self.keyring = signing_key
        self._clock = clock
        self._admin = admin_token.encode()
        # token -> (tenant, token_id, expires): what a good signature said. Verifying
        # costs an HMAC key derivation, a MAC and a JSON decode per request; a token
        # string always verifies the same way under the same keys, so the answer is kept
        # until the keyring changes. Expiry and the registry are still checked every time.
        self._verified: dict[str, tuple[str, str, int | None]] = {}
        self._built = -1
        self._rebuild()

    def _rebuild(self) -> None:
        """Serializers over the keyring's current secrets (last signs, all verify)."""
        if self._built == self.keyring.version:
            return
        keys = self.keyring.secrets
        signer = {"digest_method": hashlib.sha256}
        self._tokens = URLSafeSerializer(keys, salt=TOKEN_SALT, signer_kwargs=signer)
        self._cursors = URLSafeSerializer(keys, salt=CURSOR_SALT, signer_kwargs=signer)
        self._verified.clear()
        self._built = self.keyring.version

    @classmethod
    def for_data_dir(cls, data_dir: Path, *, clock: Clock = time.time) -> Authority:
        keyring = Keyring.open(data_dir / "keys", clock)
        admin = load_or_create_secret(
            admin_token_path(data_dir), "adm-" + secrets.token_urlsafe(32)
        )
        return cls(keyring, admin, clock=clock)

    def expiry(self, ttl_seconds: int | None) -> int | None:
        """When a token issued now with this lifetime expires (None: never)."""
        return None if ttl_seconds is None else int(self._clock()) + ttl_seconds

    @staticmethod
    def expires_at(expires: int | None) -> str | None:
        return None if expires is None else rfc3339(expires)

    def issue(self, tenant: str, token_id: str, expires: int | None = None) -> str:
        self._rebuild()
        # A token without a lifetime keeps the original two-member payload.
        payload = [tenant, token_id] if expires is None else [tenant, token_id, expires]
        token = self._tokens.dumps(payload)
        assert isinstance(token, str)
        return token

    def authenticate(self, header: str | None, registry: TenantRegistry) -> Principal:
        """The principal behind an ``Authorization`` header, or a 401 problem."""
        token = _bearer(header)
        if hmac.compare_digest(token.encode(), self._admin):
            return Principal("admin", None, "admin")
        self._rebuild()
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = claims
        tenant, token_id, expires = claims
        if expires is not None and self._clock() >= expires:
            raise Problem("unauthorized", UNAUTHORIZED)
        if not registry.token_valid(tenant, token_id):
            raise Problem("unauthorized", UNAUTHORIZED)
        return Principal("tenant", tenant, token_id)

    def _verify(self, token: str) -> tuple[str, str, int | None]:
        """The claims of a token signed by an active key, or a 401 problem."""
        try:
            payload = self._tokens.loads(token)
        except BadSignature:
            raise Problem("unauthorized", UNAUTHORIZED) from None
        if (
            not isinstance(payload, list)
            or len(payload) not in (2, 3)
            or not all(isinstance(part, str) for part in payload[:2])
            or (len(payload) == 3 and type(payload[2]) is not int)
        ):
            raise Problem("unauthorized", UNAUTHORIZED)
        return payload[0], payload[1], payload[2] if len(payload) == 3 else None

    def cursor(self, tenant: str, after: str) -> str:
        self._rebuild()
        cursor = self._cursors.dumps([tenant, after])
        assert isinstance(cursor, str)
        return cursor

    def read_cursor(self, tenant: str, cursor: str) -> str:
        """The VM id a cursor continues after; 400 for a cursor this server did not issue."""
        self._rebuild()
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
