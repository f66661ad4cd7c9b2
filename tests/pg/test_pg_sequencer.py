"""The sequencer: file-store lines from a database queue, per-tenant order, takeover."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio

from actors.journal.chain import ChainVerifier, decode_line
from actors.store.postgres.bridge import Database, DatabaseSettings, open_database
from actors.store.postgres.schema import migrate
from actors.store.postgres.sequencer import (
    FIELDS,
    Acknowledgements,
    Sequencer,
    enqueue,
    leaf_hash,
)
from conftest import Api, audit_lines
from pgcluster import PgDatabase

PROC = Path(__file__).with_name("pg_sequencer_proc.py")


@contextlib.asynccontextmanager
async def migrated(pg: PgDatabase) -> AsyncIterator[Database]:
    async with open_database(DatabaseSettings(pg.dsn)) as db:
        await migrate(db)
        yield db


def entry(tenant: str, n: int) -> dict[str, Any]:
    return {
        "op": "tenant.update",
        "outcome": "succeeded",
        "tenant": tenant,
        "vm": None,
        "source": {"ip": "127.0.0.1", "token_id": "admin"},
        "request_id": f"req-{tenant}-{n}",
        "detail": {"n": n, "name": "ünïcode ✓"},
    }


async def stored_lines(db: Database) -> list[bytes]:
    return [r["line"] for r in await db.fetch("SELECT line FROM audit_log ORDER BY seq")]


def verify(lines: list[bytes]) -> int:
    verifier = ChainVerifier()
    for line in lines:
        verifier.check(line)
    return verifier.seq


async def test_lines_are_byte_for_byte_the_file_stores(api: Api, data_dir: Path,
                                                       pg_db: PgDatabase) -> None:  # fmt: skip
    """The same entries, in the same order, at the same times: the very same bytes."""
    token = (await api.provision("acme")).bearer
    first = await api.spawn(token, name="web-ü")
    assert first.status_code == 201
    await api.spawn(token, vcpus=100)  # rejected: over quota
    vm = (await first.get_json())["id"]
    await api.client.delete(f"/v1/vms/{vm}", headers={"Authorization": token})
    await api.client.post("/v1/admin/tenants/acme/tokens", headers=api.admin)
    file_lines = audit_lines(data_dir)
    file_entries = [decode_line(line) for line in file_lines]
    assert len(file_entries) >= 6

    times = iter([e["ts"] for e in file_entries])
    async with migrated(pg_db) as db:
        async with db.transaction() as con:
            await enqueue(con, [{k: e[k] for k in FIELDS} for e in file_entries])
        sequencer = Sequencer(db, batch=1, clock=lambda: next(times))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sequencer.run)
            while await db.fetchval("SELECT seq FROM audit_head") < len(file_entries):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert await stored_lines(db) == file_lines
        leaves = await db.fetch("SELECT idx, hash FROM merkle_nodes WHERE level = 0 ORDER BY idx")
        assert [bytes(r["hash"]) for r in leaves] == [leaf_hash(line) for line in file_lines]
        assert await db.fetchval("SELECT count(*) FROM audit_queue") == 0


async def write(db: Database, acks: Acknowledgements, tenant: str) -> list[dict[str, Any]]:
    """One decision of ``tenant`` under its row lock, acknowledged once sequenced."""
    with contextlib.ExitStack() as stack:
        async with db.transaction() as con:
            n = await con.fetchval(
                "UPDATE counters SET n = n + 1 WHERE tenant = $1 RETURNING n", tenant
            )
            qids = await enqueue(con, [entry(tenant, n), entry(tenant, n)])
            pending = stack.enter_context(acks.expect(qids))  # before the commit
        with trio.fail_after(120):  # a hang guard, not a measure
            return await pending.wait()


TENANTS = ["a", "b", "c"]


async def storm(db: Database, acks: Acknowledgements, writes: int) -> list[list[dict[str, Any]]]:
    """Two writers per tenant race ``writes`` decisions each; the acknowledged entries."""
    acked: list[list[dict[str, Any]]] = []

    async def writer(tenant: str) -> None:
        for _ in range(writes):
            acked.append(await write(db, acks, tenant))

    async with trio.open_nursery() as nursery:
        for tenant in TENANTS * 2:
            nursery.start_soon(writer, tenant)
    return acked


async def check_chain(db: Database, acked: list[list[dict[str, Any]]]) -> None:
    """No gap, no duplicate, every acknowledged entry stored as acknowledged, tenant order."""
    lines = await stored_lines(db)
    assert verify(lines) == len(lines) == 2 * len(acked)
    stored = {e["seq"]: e for e in map(decode_line, lines)}
    for entries in acked:
        for e in entries:
            assert stored[e["seq"]] == e
    for tenant in TENANTS:
        ns = [e["detail"]["n"] for e in stored.values() if e["tenant"] == tenant]
        # each decision's two entries, decisions in the order the row lock admitted them
        assert ns == sorted(ns) and ns[::2] == list(range(1, len(ns) // 2 + 1))
    assert await db.fetchval("SELECT count(*) FROM audit_queue") == 0
    head = await db.fetchrow("SELECT seq, hash FROM audit_head")
    assert head is not None and (head["seq"], head["hash"]) == (
        len(lines),
        stored[len(lines)]["hash"],
    )


async def test_concurrent_writers_in_tenant_order(pg_db: PgDatabase) -> None:
    async with migrated(pg_db) as db:
        await db.execute("CREATE TABLE counters (tenant text PRIMARY KEY, n int NOT NULL)")
        await db.execute("INSERT INTO counters SELECT unnest($1::text[]), 0", TENANTS)
        acks = Acknowledgements(db)
        async with trio.open_nursery() as nursery:
            await nursery.start(acks.run)
            nursery.start_soon(Sequencer(db, batch=7).run)
            acked = await storm(db, acks, 25)
            nursery.cancel_scope.cancel()
        await check_chain(db, acked)


@contextlib.contextmanager
def sequencer_process(dsn: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(PROC), dsn, "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()


async def leading(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    assert line == "leading\n", f"the sequencer process ended: {proc.poll()}"


async def test_killed_sequencer_is_replaced_without_gap_or_duplicate(pg_db: PgDatabase) -> None:
    async with migrated(pg_db) as db:
        await db.execute("CREATE TABLE counters (tenant text PRIMARY KEY, n int NOT NULL)")
        await db.execute("INSERT INTO counters SELECT unnest($1::text[]), 0", TENANTS)
        with contextlib.ExitStack() as processes:
            first = processes.enter_context(sequencer_process(pg_db.dsn))
            with trio.fail_after(60):  # hang guards
                await leading(first)
            # the standby starts once the lock is taken, so which one leads is known
            second = processes.enter_context(sequencer_process(pg_db.dsn))
            acks = Acknowledgements(db)
            async with trio.open_nursery() as nursery:
                await nursery.start(acks.run)
                storming = trio.Event()
                acked: list[list[dict[str, Any]]] = []

                async def run_storm() -> None:
                    acked.extend(await storm(db, acks, 40))
                    storming.set()

                nursery.start_soon(run_storm)
                while await db.fetchval("SELECT seq FROM audit_head") < 100:
                    await trio.sleep(0.01)
                os.kill(first.pid, signal.SIGKILL)  # in the middle of the storm
                with trio.fail_after(60):
                    await leading(second)
                await storming.wait()
                nursery.cancel_scope.cancel()
            assert first.wait(30) == -signal.SIGKILL
        await check_chain(db, acked)
        assert len(acked) == 40 * len(TENANTS) * 2
