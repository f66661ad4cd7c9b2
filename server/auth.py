"""Bearer-token authentication and the signed, opaque list cursors.

Tenant tokens are itsdangerous signatures (fixed salt, SHA-256 HMAC) over
``[tenant, token_id]``, or ``[tenant, token_id, expires]`` for a token with a lifetime
(``expires``: wall-clock UTC seconds since the epoch, so the expiry is signed and survives
restarts). A token is accepted only while it has not expired, one of the keyring's active
keys signed it (:mod:`server.keyring`), and the registry still lists that token id for that
tenant, so revocation and tenant deletion take effect at once and survive restarts (both
are audit entries, replayed at start). The operator's token is a random secret the store
keeps (the file store: ``<data-dir>/admin.token``); the store says whether a token is it.
Every kind of bad token gets the same 401.

A token or cursor counts only in exactly the form it was issued (:func:`issued_form`):
itsdangerous' decoder is lenient (it drops non-ASCII and non-alphabet characters, adds
missing padding and ignores the spare bits of the last base64 character), so without
this check ``token + "="``, ``token + "\xff"`` or a signature with ``@@@`` inside would
verify as the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from itsdangerous import BadData, BadSignature, URLSafeSerializer
from itsdangerous.encoding import base64_decode, base64_encode

from actors.store import Store
from actors.tenants.registry import TenantRegistry
from server.keyring import Clock, Keyring, rfc3339
from server.problems import Problem

TOKEN_SALT = "vm-tenant.token.v1"
#: verified signatures remembered (a bound, not a tuning knob: far above active tokens)
VERIFIED_CACHE_SIZE = 65536
CURSOR_SALT = "vm-tenant.cursor.v1"
UNAUTHORIZED = "a valid bearer token is required"
NOT_ISSUED = "`cursor` was not issued by this server"
#: what URLSafeSerializer emits: base64url payload (``.``-prefixed when compressed), a dot,
#: base64url signature; no padding, nothing else
_SIGNED_RE = re.compile(r"\.?([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")


def issued_form(text: str) -> bool:
    """Whether ``text`` is spelt exactly as URLSafeSerializer spells what it signs.

    Beyond the alphabet, each base64 part must be the canonical encoding of what it
    decodes to, so the unused low bits of a last character cannot vary either.
    """
    match = _SIGNED_RE.fullmatch(text)
    if match is None:
        return False
    for part in match.groups():
        try:
            if base64_encode(base64_decode(part)) != part.encode():
                return False
        except BadData:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the operator, or one token of one tenant."""

    kind: Literal["admin", "tenant"]
    tenant: str | None
    token_id: str


class Authority:
    """Issues and checks tenant tokens and list cursors; checks the admin token.

    ``signing_key`` is the store's keyring, or a single secret (a keyring kept in memory).
    ``admin`` is the admin token itself, or the store's check of one. ``clock`` gives
    wall-clock seconds, injectable so that tests can let tokens expire.
    """

    def __init__(
        self,
        signing_key: str | Keyring,
        admin: str | Callable[[str], bool],
        *,
        clock: Clock = time.time,
    ) -> None:
        if isinstance(signing_key, str):
            signing_key = Keyring.in_memory(signing_key, clock)
        self.keyring = signing_key
        self._clock = clock
        if isinstance(admin, str):
            expected = admin.encode()
            admin = lambda token: hmac.compare_digest(token.encode(), expected)  # noqa: E731
        self._is_admin = admin
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
    def for_store(cls, store: Store, *, clock: Clock = time.time) -> Authority:
        """The store's keyring and admin token (``KeyringError``: the keyring is unusable)."""
        return cls(Keyring.open(store.token_keys, clock), store.admin_token_valid, clock=clock)

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
        if self._is_admin(token):
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
        if not issued_form(token):
            raise Problem("unauthorized", UNAUTHORIZED)
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
        if not issued_form(cursor):
            raise Problem("invalid_request", NOT_ISSUED)
        self._rebuild()
        try:
            payload = self._cursors.loads(cursor)
        except BadSignature:
            raise Problem("invalid_request", NOT_ISSUED) from None
        if not isinstance(payload, list) or len(payload) != 2 or payload[0] != tenant:
            raise Problem("invalid_request", NOT_ISSUED)
        return str(payload[1])


def _bearer(header: str | None) -> str:
    if not header:
        raise Problem("unauthorized", UNAUTHORIZED)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token or len(token) > 4096:
        raise Problem("unauthorized", UNAUTHORIZED)
    return token
