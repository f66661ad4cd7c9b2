"""Moving a single-node data dir into an empty database (``vm-tenant db import``).

What moves: the whole chain (every stored line, with its seq and hash: the same chain and
the same Merkle tree, every complete subtree of it), the signed checkpoints, the state
the node served (tenants with quotas and allocations, tokens, VMs, idempotency records:
the snapshot plus the fold of the entries after it, exactly what the node rebuilds at its
start), the token-signing keyring, the checkpoint key, the log's origin and the
operator's token (as its hash).

Everything is written in one transaction that first checks the database is empty, so the
import either happens whole or not at all, and a database that holds anything (another
log, or a replica's first start that won the race) is left untouched
(:class:`ImportRefused`). The data dir is only read, and is verified first: a damaged
chain is refused, and an incomplete last line (a write that was never acknowledged) is
left behind. Stop the node before importing; what it writes afterwards does not move.

VMs the node left in doubt (``spawning``, ``destroying``, ``unknown``) arrive with no
owner and an expired lease, so the first replica to look resolves them, as the node
itself would have at its next start.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio
from cryptography.hazmat.primitives import serialization

from actors.journal import snapshot
from actors.journal.chain import VerifyReport, decode_line
from actors.journal.checkpoint import origin_path, read_checkpoints, read_origin
from actors.journal.merkle import Frontier
from actors.journal.segments import iter_chunks
from actors.journal.verify import verify_data_dir
from actors.state import IN_DOUBT_STATES, ProxyState
from actors.store.postgres.bridge import Connection, Database
from actors.store.postgres.schema import MIGRATION_LOCK, migrate
from actors.store.postgres.sequencer import leaf_hash
from actors.store.postgres.tree import extend, insert_nodes

#: lines inserted per statement
BATCH = 5000

#: where the single node keeps what moves (the data dir layout of API.md and the keys'
#: own files; the keyring's format is the one ``server/keyring.py`` writes)
ADMIN_TOKEN = "admin.token"
KEYRING = Path("keys") / "token-signing.keyring.json"
LEGACY_TOKEN_KEY = Path("keys") / "token-signing.key"
AUDIT_KEY = Path("keys") / "audit-ed25519.key"


class ImportRefused(Exception):
    """The import was not made (the database is not empty, or the data dir is unusable)."""


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What moved."""

    entries: int
    head_seq: int
    head_hash: str
    tenants: int
    vms: int
    checkpoints: int


class _KeyringKey(msgspec.Struct):
    id: str
    created_at: str
    state: str
    secret: str | None
    retired_at: str | None = None


class _Keyring(msgspec.Struct):
    version: int
    keys: list[_KeyringKey]


@dataclass(slots=True)
class _Source:
    """Everything read from the data dir before the transaction starts."""

    report: VerifyReport
    state: ProxyState
    admin_sha256: str
    token_keys: list[_KeyringKey]
    audit_key_pem: str
    audit_key_created: str
    checkpoints: list[dict[str, Any]]
    #: the log's origin (``keys/audit-origin``), None for a data dir from before it
    origin: str | None


def _read_source(data_dir: Path) -> _Source:
    if not (data_dir / "audit").is_dir():
        raise ImportRefused(f"{data_dir} is not a data dir (it has no audit/)")
    report = verify_data_dir(data_dir)
    if not report.intact:
        raise ImportRefused(
            f"the audit chain of {data_dir} is {report.verdict} at seq {report.bad_seq}: "
            f"{report.reason}"
        )
    try:
        state = snapshot.replay(data_dir).state
        admin = (data_dir / ADMIN_TOKEN).read_text().strip()
        audit_pem = (data_dir / AUDIT_KEY).read_text()
        token_keys = _token_keys(data_dir)
    except (OSError, snapshot.SnapshotError, msgspec.MsgspecError) as error:
        raise ImportRefused(f"cannot read {data_dir}: {error}") from error
    try:
        serialization.load_pem_private_key(audit_pem.encode(), password=None)
    except ValueError as error:
        raise ImportRefused(f"{data_dir / AUDIT_KEY} is not a usable key: {error}") from None
    checkpoints = [c for c in read_checkpoints(data_dir) if c is not None]
    origin: str | None = None
    if origin_path(data_dir).exists():
        try:
            origin = read_origin(data_dir)
        except (OSError, ValueError) as error:
            raise ImportRefused(f"cannot read the log's origin: {error}") from None
    return _Source(
        report,
        state,
        hashlib.sha256(admin.encode()).hexdigest(),
        token_keys,
        audit_pem,
        _modified(data_dir / AUDIT_KEY),
        checkpoints,
        origin,
    )


def _modified(path: Path) -> str:
    """When a key file was written (keys made before their time was recorded)."""
    return dt.datetime.fromtimestamp(int(path.stat().st_mtime), dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def _token_keys(data_dir: Path) -> list[_KeyringKey]:
    keyring = data_dir / KEYRING
    if keyring.exists():
        return msgspec.json.decode(keyring.read_bytes(), type=_Keyring).keys
    # a data dir from before the keyring: its single key becomes the first one
    legacy = data_dir / LEGACY_TOKEN_KEY
    secret = legacy.read_text().strip()
    return [_KeyringKey(f"key-{secrets.token_hex(6)}", _modified(legacy), "active", secret)]


async def import_data_dir(db: Database, data_dir: Path, *, within: float = 3600.0) -> ImportReport:
    """Import ``data_dir`` into the (empty) database; raises :class:`ImportRefused`.

    The log's name for its signed notes is the data dir's own (``keys/audit-origin``):
    the log keeps its identity, so its stored checkpoints still verify and a witness or
    a tenant that kept a checkpoint goes on checking; a data dir from before the origin
    gets a new one.
    """
    source = await trio.to_thread.run_sync(_read_source, data_dir)
    await migrate(db)
    async with db.transaction(within=within) as con:
        # the lock a replica's first start also takes: the two cannot interleave
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        if not await _empty(con):
            raise ImportRefused("the database is not empty: nothing was imported")
        await con.execute(
            "INSERT INTO log_meta (origin, admin_token_sha256) VALUES ($1, $2)",
            source.origin or f"vm-tenant/{secrets.token_hex(8)}",
            source.admin_sha256,
        )
        await _import_keys(con, source)
        created = await _import_chain(con, data_dir, source.report)
        await _import_state(con, source.state, created)
    state = source.state
    return ImportReport(
        source.report.entries,
        source.report.head_seq,
        source.report.head_hash,
        len(state.tenants),
        sum(len(t.vms) for t in state.tenants.values()),
        len(source.checkpoints),
    )


async def _empty(con: Connection) -> bool:
    return not await con.fetchval(
        """
        SELECT EXISTS (SELECT 1 FROM log_meta) OR EXISTS (SELECT 1 FROM signing_keys)
            OR EXISTS (SELECT 1 FROM tenants) OR EXISTS (SELECT 1 FROM audit_queue)
            OR EXISTS (SELECT 1 FROM audit_log) OR EXISTS (SELECT 1 FROM checkpoints)
            OR (SELECT seq FROM audit_head) <> 0
        """
    )


async def _import_keys(con: Connection, source: _Source) -> None:
    rows = [
        (key.id, "token", key.created_at, key.state, key.secret, key.retired_at)
        for key in source.token_keys
    ]
    public = serialization.load_pem_private_key(source.audit_key_pem.encode(), None).public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    audit_id = "audit-" + hashlib.sha256(raw).hexdigest()[:12]
    rows.append((audit_id, "audit", source.audit_key_created, "active", source.audit_key_pem, None))
    await con.executemany(
        "INSERT INTO signing_keys (id, purpose, created_at, state, secret, retired_at) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        rows,
    )
    await con.executemany(
        "INSERT INTO checkpoints (seq, hash, ts, signature, root, note) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (c["seq"], c["hash"], c["ts"], c["signature"], c.get("root"), c.get("note"))
            for c in source.checkpoints
        ],
    )


async def _import_chain(con: Connection, data_dir: Path, report: VerifyReport) -> dict[str, int]:
    """Every complete line up to the verified head, as stored, with the tree's nodes;
    returns the seq of each tenant's latest creation (where its own entries start)."""
    created: dict[str, int] = {}
    frontier = Frontier()
    seqs: list[int] = []
    tenants: list[str | None] = []
    hashes: list[str] = []
    lines: list[bytes] = []
    last_ts: str | None = None

    async def flush() -> None:
        await con.execute(
            "INSERT INTO audit_log (seq, tenant, hash, line) "
            "SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[])",
            seqs, tenants, hashes, lines,
        )  # fmt: skip
        sql, args = insert_nodes(extend(frontier, [leaf_hash(line) for line in lines]))
        await con.execute(sql, *args)
        for column in (seqs, tenants, hashes, lines):
            column.clear()

    for chunk in iter_chunks(data_dir / "audit"):
        for line in chunk.lines:  # a torn last line comes as chunk.torn: left behind
            entry = decode_line(line)
            if entry["seq"] > report.head_seq:
                break
            seqs.append(entry["seq"])
            tenants.append(entry["tenant"])
            hashes.append(entry["hash"])
            lines.append(line)
            last_ts = entry["ts"]
            if entry["op"] == "tenant.create" and entry["outcome"] == "succeeded":
                created[entry["tenant"]] = entry["seq"]
            if len(seqs) == BATCH:
                await flush()
    if seqs:
        await flush()
    await con.execute(
        "UPDATE audit_head SET seq = $1, hash = $2, ts = $3",
        report.head_seq,
        report.head_hash,
        last_ts,
    )
    return created


async def _import_state(con: Connection, state: ProxyState, created: dict[str, int]) -> None:
    tenants = state.tenants.values()
    await con.executemany(
        "INSERT INTO tenants (id, quota_vcpus, quota_memory_mib, quota_vms, allocated_vcpus, "
        "allocated_memory_mib, allocated_vms, created_seq) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [
            (t.id, t.quota.vcpus, t.quota.memory_mib, t.quota.vms,
             t.allocated_vcpus, t.allocated_memory, len(t.vms), created.get(t.id))
            for t in tenants
        ],
    )  # fmt: skip
    await con.executemany(
        "INSERT INTO tokens (tenant, token_id) VALUES ($1, $2)",
        [(t.id, token) for t in tenants for token in sorted(state.directory.tokens(t.id))],
    )
    await con.executemany(
        "INSERT INTO vms (id, tenant, vcpus, memory_mib, image, name, created_at, state, "
        "settled_state, idempotency_key, doubt, lease_expires) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
        "CASE WHEN $12 THEN now() END)",
        [
            (vm.id, t.id, vm.vcpus, vm.memory_mib, vm.image, vm.name, vm.created_at, vm.state,
             vm.settled_state, vm.idempotency_key, vm.doubt, vm.state in IN_DOUBT_STATES)
            for t in tenants
            for vm in t.vms.values()
        ],
    )  # fmt: skip
    await con.executemany(
        "INSERT INTO idempotency (tenant, key, request_hash, status, body, created) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        [
            (t.id, key, record.request_hash, record.status,
             None if record.body is None else msgspec.json.encode(record.body).decode(),
             record.created)
            for t in tenants
            for key, record in t.idempotency.items()
        ],
    )  # fmt: skip
