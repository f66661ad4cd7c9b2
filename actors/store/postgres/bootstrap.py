"""The first start on an empty database, and what every replica loads at its start.

:func:`bootstrap` migrates the schema, then, in one transaction under the migration lock
(the lock ``db import`` takes too, so the two cannot interleave), makes what a new log
needs when the database has none: its origin, the operator's token (stored only as its
SHA-256), the first token-signing key and the checkpoint key (Ed25519). Only the replica
that made them gets the admin token back, to write ``<data-dir>/admin.token``; every other
replica finds them made and loads them (:class:`Secrets`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from actors.store import SigningKey
from actors.store.postgres.bridge import Database, Queries
from actors.store.postgres.schema import MIGRATION_LOCK, migrate


@dataclass(frozen=True, slots=True)
class Secrets:
    """What a replica holds of the log's identity and keys."""

    origin: str
    admin_sha256: str
    token_keys: list[SigningKey]
    audit_key: Ed25519PrivateKey


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_admin_token() -> str:
    return "adm-" + secrets.token_urlsafe(32)


async def bootstrap(db: Database) -> tuple[Secrets, str | None]:
    """Migrate, make the log's identity if there is none; returns it and the admin token
    (only to the replica that made it)."""
    await migrate(db)
    made: str | None = None
    async with db.transaction() as con:
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        if await con.fetchval("SELECT count(*) FROM log_meta") == 0:
            made = new_admin_token()
            await _create(con, made)
        loaded = await load_secrets(con)
    return loaded, made


async def _create(con: Queries, admin_token: str) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    now = _now()
    await con.execute(
        "INSERT INTO log_meta (origin, admin_token_sha256) VALUES ($1, $2)",
        f"vm-tenant/{secrets.token_hex(8)}",
        hashlib.sha256(admin_token.encode()).hexdigest(),
    )
    await con.executemany(
        "INSERT INTO signing_keys (id, purpose, created_at, state, secret) "
        "VALUES ($1, $2, $3, 'active', $4)",
        [
            (f"key-{secrets.token_hex(6)}", "token", now, secrets.token_urlsafe(48)),
            (f"audit-{secrets.token_hex(6)}", "audit", now, pem.decode()),
        ],
    )


async def load_token_keys(con: Queries) -> list[SigningKey]:
    rows = await con.fetch(
        "SELECT id, created_at, state, secret, retired_at FROM signing_keys "
        "WHERE purpose = 'token' ORDER BY created_at, id"
    )
    return [
        SigningKey(r["id"], r["created_at"], r["state"], r["secret"], r["retired_at"]) for r in rows
    ]


async def load_secrets(con: Queries) -> Secrets:
    meta = await con.fetchrow("SELECT origin, admin_token_sha256 FROM log_meta")
    pem = await con.fetchval(
        "SELECT secret FROM signing_keys WHERE purpose = 'audit' AND state = 'active' "
        "ORDER BY created_at DESC LIMIT 1"
    )
    if meta is None or pem is None:
        raise ValueError("the database has no log identity (log_meta) or no checkpoint key")
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the checkpoint key in the database is not an Ed25519 key")
    return Secrets(meta["origin"], meta["admin_token_sha256"], await load_token_keys(con), key)


#: NOTIFY channel: the token keyring changed (replicas reload it)
KEYS_CHANNEL = "vm_tenant_keys"


async def save_token_keys(con: Queries, keys: list[SigningKey]) -> None:
    """Store the keyring's keys (in the caller's transaction), and tell the replicas.

    Keys are added or updated, never deleted, so two replicas rotating at the same moment
    both keep their new key; a retirement is one-way (a retired key never comes back).
    """
    await con.executemany(
        "INSERT INTO signing_keys (id, purpose, created_at, state, secret, retired_at) "
        "VALUES ($1, 'token', $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE "
        "SET state = EXCLUDED.state, secret = EXCLUDED.secret, retired_at = EXCLUDED.retired_at "
        "WHERE signing_keys.state = 'active'",
        [(k.id, k.created_at, k.state, k.secret, k.retired_at) for k in keys],
    )
    await con.execute("SELECT pg_notify($1, '')", KEYS_CHANNEL)
