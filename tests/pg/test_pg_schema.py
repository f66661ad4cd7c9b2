"""The schema: created on an empty database, safely by many replicas at once, versioned."""

from __future__ import annotations

import json

import pytest
import trio

from actors.store.postgres.bridge import DatabaseSettings, open_database
from actors.store.postgres.schema import (
    LATEST,
    SchemaError,
    SchemaTooNew,
    known_migrations,
    migrate,
)
from pgcluster import PgDatabase

TABLES = {
    "schema_version", "log_meta", "signing_keys", "tenants", "tokens", "directory_changes",
    "vms", "idempotency", "audit_queue", "audit_log", "audit_head", "merkle_nodes",
    "checkpoints", "heartbeats",
}  # fmt: skip


async def test_first_start_creates_the_schema_and_later_ones_keep_it(pg_db: PgDatabase) -> None:
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        assert await migrate(db) == 0
        rows = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {r["tablename"] for r in rows}
        assert tables == TABLES
        assert await migrate(db) == LATEST
        rows = await db.fetch("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, LATEST + 1))


async def test_concurrent_migrators_apply_each_version_once(pg_db: PgDatabase) -> None:
    """Replicas starting at the same moment: each opens its own pool and migrates."""
    before: list[int] = []
    go = trio.Event()

    async def replica() -> None:
        async with open_database(DatabaseSettings(pg_db.dsn)) as db:
            await db.fetchval("SELECT 1")  # connected: now start together
            await go.wait()
            before.append(await migrate(db))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(replica)
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        go.set()
    # exactly one found the database empty; the others found it migrated
    assert sorted(before) == [0, LATEST, LATEST, LATEST]
    out = pg_db.cluster.psql("SELECT version FROM schema_version ORDER BY version", pg_db.name)
    assert out.split() == [str(v) for v in range(1, LATEST + 1)]


async def test_a_newer_schema_is_refused(pg_db: PgDatabase) -> None:
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        await migrate(db)
        await db.execute(
            "INSERT INTO schema_version (version, description) VALUES ($1, 'from the future')",
            LATEST + 1,
        )
        with pytest.raises(SchemaTooNew, match=f"version {LATEST + 1}"):
            await migrate(db)


async def test_a_database_of_something_else_is_refused(pg_db: PgDatabase) -> None:
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        await db.execute("CREATE TABLE invoices (id int)")
        with pytest.raises(SchemaError, match="no vm-tenant schema"):
            await migrate(db)
        assert await db.fetchval("SELECT to_regclass('schema_version') IS NULL")


async def test_version_2_finds_where_each_tenants_own_entries_start(pg_db: PgDatabase) -> None:
    """A database made by version 1 is upgraded in place: each tenant's latest creation is
    found in the chain (a tenant deleted and created again starts at its second one)."""

    def line(seq: int, tenant: str, op: str, outcome: str = "succeeded") -> bytes:
        return json.dumps({"seq": seq, "tenant": tenant, "op": op, "outcome": outcome}).encode()

    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        first = known_migrations()[0]
        async with db.transaction() as con:
            await con.execute(
                "CREATE TABLE schema_version (version integer PRIMARY KEY, "
                "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await con.execute(first.sql)
            await con.execute("INSERT INTO schema_version (version, description) VALUES (1, 'v1')")
            await con.execute(
                "INSERT INTO tenants (id, quota_vcpus, quota_memory_mib, quota_vms) "
                "VALUES ('acme', 1, 1, 1), ('beta', 1, 1, 1)"
            )
            chain = [
                line(1, "acme", "tenant.create"), line(2, "acme", "tenant.delete"),
                line(3, "beta", "tenant.create"), line(4, "acme", "tenant.create", "failed"),
                line(5, "acme", "tenant.create"), line(6, "acme", "vm.spawn", "requested"),
            ]  # fmt: skip
            await con.executemany(
                "INSERT INTO audit_log (seq, tenant, hash, line) VALUES ($1, $2, '', $3)",
                [(n, json.loads(raw)["tenant"], raw) for n, raw in enumerate(chain, start=1)],
            )
        assert await migrate(db) == 1
        rows = await db.fetch("SELECT id, created_seq FROM tenants ORDER BY id")
        assert [(r["id"], r["created_seq"]) for r in rows] == [("acme", 5), ("beta", 3)]
