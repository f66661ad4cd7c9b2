"""asyncpg inside the Trio run through trio-asyncio, against a real PostgreSQL server."""

from __future__ import annotations

import asyncpg
import pytest
import trio

from actors.errors import AuditUnavailable
from actors.store.postgres.bridge import (
    CommitUnknown,
    Connection,
    Database,
    DatabaseSettings,
    StoreUnavailable,
    open_database,
)
from pgcluster import PgDatabase

STUCK = "SELECT pg_sleep(30)"


def settings(pg: PgDatabase, **overrides: float) -> DatabaseSettings:
    return DatabaseSettings(pg.dsn, **overrides)  # type: ignore[arg-type]


async def busy_backends(db: Database, sql: str) -> int:
    """Other sessions currently running ``sql``."""
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", sql
    )


async def test_statements_and_transactions(pg_db: PgDatabase) -> None:
    async with open_database(settings(pg_db)) as db:
        assert await db.fetchval("SELECT 40 + $1::int", 2) == 42
        await db.execute("CREATE TABLE t (x int PRIMARY KEY)")
        async with db.transaction() as con:
            await con.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(RuntimeError):
            async with db.transaction() as con:
                await con.execute("INSERT INTO t VALUES (2)")
                raise RuntimeError("changed my mind")
        assert [r["x"] for r in await db.fetch("SELECT x FROM t")] == [1]
        # an answer of a working database is not an outage: it passes through
        with pytest.raises(asyncpg.UniqueViolationError):
            await db.execute("INSERT INTO t VALUES (1)")
        assert not issubclass(asyncpg.UniqueViolationError, AuditUnavailable)


async def test_tasks_started_outside_the_loop_use_the_database(pg_db: PgDatabase) -> None:
    """HTTP handlers are started by Hypercorn, outside ``open_loop``: they must work too."""
    send, receive = trio.open_memory_channel[Database](1)
    answers: list[object] = []

    async def handler() -> None:
        db = await receive.receive()
        # (a bare aio_as_trio(fn) here finds no loop: the context variable it reads is
        # only inherited by tasks started inside open_loop)
        answers.append(await db.fetchval("SELECT 'from outside'"))

    async with trio.open_nursery() as outside:
        outside.start_soon(handler)
        async with open_database(settings(pg_db)) as db:
            await send.send(db)
            await trio.testing.wait_all_tasks_blocked()
            while not answers:
                await trio.sleep(0.01)
    assert answers == ["from outside"]


async def test_deadline_cancels_the_query_on_the_server(pg_db: PgDatabase) -> None:
    async with open_database(settings(pg_db, call_timeout=0.5, pool_size=1)) as db:
        with pytest.raises(StoreUnavailable, match="did not answer within"):
            await db.fetchval(STUCK)
        # the one connection of the pool was made clean, not leaked or left busy
        assert await db.fetchval("SELECT 1") == 1
        assert await busy_backends(db, STUCK) == 0


async def test_cancelled_transaction_rolls_back_and_frees_its_connection(
    pg_db: PgDatabase,
) -> None:
    async with open_database(settings(pg_db, pool_size=1, call_timeout=60)) as db:
        await db.execute("CREATE TABLE t (x int)")
        with trio.move_on_after(0.5) as scope:
            async with db.transaction() as con:
                await con.execute("INSERT INTO t VALUES (1)")
                await con.fetchval(STUCK)
        assert scope.cancelled_caught  # a cancellation from outside stays one
        assert await db.fetchval("SELECT count(*) FROM t") == 0
        assert await busy_backends(db, STUCK) == 0
        idle_in_tx = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        )
        assert idle_in_tx == 0


async def test_transaction_deadline(pg_db: PgDatabase) -> None:
    async with open_database(settings(pg_db, transaction_timeout=0.5, call_timeout=60)) as db:
        await db.execute("CREATE TABLE t (x int)")
        with pytest.raises(StoreUnavailable, match="transaction did not finish"):
            async with db.transaction() as con:
                await con.execute("INSERT INTO t VALUES (1)")
                await con.fetchval(STUCK)
        assert await db.fetchval("SELECT count(*) FROM t") == 0


async def test_server_down_is_unavailable_and_service_resumes(pg_own: PgDatabase) -> None:
    cluster = pg_own.cluster
    async with open_database(settings(pg_own)) as db:
        await db.execute("CREATE TABLE t (x int)")
        cluster.stop()
        with pytest.raises(StoreUnavailable):
            await db.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(StoreUnavailable):
            async with db.transaction() as con:
                await con.execute("INSERT INTO t VALUES (2)")
        cluster.start()
        # the pool drops connections the server closed and makes new ones by itself
        await db.execute("INSERT INTO t VALUES (3)")
        assert [r["x"] for r in await db.fetch("SELECT x FROM t")] == [3]


async def test_first_calls_after_a_restart_succeed(pg_own: PgDatabase) -> None:
    """Pooled connections from before a restart are broken; nobody sees that."""
    cluster = pg_own.cluster
    async with open_database(settings(pg_own, pool_size=4)) as db:
        await db.execute("CREATE TABLE t (x int)")
        async with trio.open_nursery() as nursery:  # fill the pool with idle connections
            for _ in range(4):
                nursery.start_soon(db.fetchval, "SELECT pg_sleep(0.2)")
        # Blocking on purpose: the loop gets no chance to see the old connections close,
        # as when a request arrives right after the database came back.
        cluster.stop()
        cluster.start()
        async with db.transaction() as con:
            await con.execute("INSERT INTO t VALUES (1)")
        cluster.stop()
        cluster.start()
        assert await db.fetchval("SELECT count(*) FROM t") == 1


async def test_server_stopping_mid_transaction_commits_nothing(pg_own: PgDatabase) -> None:
    cluster = pg_own.cluster
    async with open_database(settings(pg_own)) as db:
        await db.execute("CREATE TABLE t (x int)")
        with pytest.raises(StoreUnavailable):
            async with db.transaction() as con:
                await con.execute("INSERT INTO t VALUES (1)")
                await trio.to_thread.run_sync(cluster.stop)
                await con.execute("INSERT INTO t VALUES (2)")
        cluster.start()
        assert await db.fetchval("SELECT count(*) FROM t") == 0


async def test_connection_lost_during_commit_is_an_unknown_outcome(pg_db: PgDatabase) -> None:
    """A deferred trigger makes COMMIT slow; the backend is terminated while it runs."""
    async with open_database(settings(pg_db, call_timeout=30)) as db:
        await db.execute(
            """
            CREATE TABLE t (x int);
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
              $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED
              FOR EACH ROW EXECUTE FUNCTION slow_commit();
            """
        )

        async def terminate_committer() -> None:
            while await busy_backends(db, "COMMIT;") == 0:
                await trio.sleep(0.02)
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'COMMIT;'"
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminate_committer)
            with pytest.raises(CommitUnknown):
                async with db.transaction() as con:
                    await con.execute("INSERT INTO t VALUES (1)")
        assert not issubclass(CommitUnknown, AuditUnavailable)  # not "nothing happened"


async def test_notifications_wake_and_report_a_lost_connection(pg_own: PgDatabase) -> None:
    async with (
        open_database(settings(pg_own)) as db,
        db.listen("sequenced", "revoked") as notes,
    ):
        await db.execute("SELECT pg_notify('sequenced', '7'), pg_notify('sequenced', '9')")
        await db.execute("NOTIFY revoked, 'tok-1'")
        seen: dict[str, str] = {}
        while len(seen) < 2 or seen.get("sequenced") != "9":
            seen.update(await notes.wait())
        assert seen == {"sequenced": "9", "revoked": "tok-1"}
        await trio.to_thread.run_sync(pg_own.cluster.stop)
        with trio.fail_after(30), pytest.raises(StoreUnavailable):
            await notes.wait()


async def test_transact_runs_again_after_a_deadlock(pg_db: PgDatabase) -> None:
    async with open_database(settings(pg_db)) as db:
        await db.execute(
            "CREATE TABLE t (id int PRIMARY KEY, n int); INSERT INTO t VALUES (1, 0), (2, 0)"
        )
        first_locked = [trio.Event(), trio.Event()]
        attempts = [0, 0]

        def body(me: int) -> object:
            async def run(con: Connection) -> None:
                attempts[me] += 1
                mine, other = (1, 2) if me == 0 else (2, 1)
                await con.execute("UPDATE t SET n = n + 1 WHERE id = $1", mine)
                first_locked[me].set()
                await first_locked[1 - me].wait()
                await con.execute("UPDATE t SET n = n + 1 WHERE id = $1", other)

            return run

        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.transact, body(0))
            nursery.start_soon(db.transact, body(1))
        # the server broke the deadlock by aborting one; that one ran again and succeeded
        assert sorted(attempts) == [1, 2]
        assert [r["n"] for r in await db.fetch("SELECT n FROM t ORDER BY id")] == [2, 2]


async def test_a_database_that_cannot_serve_is_unavailable_not_an_answer(
    pg_db: PgDatabase,
) -> None:
    """Errors by which the server says it cannot serve now (a read-only standby after a
    failover, a statement cut by the operator's timeout, a disk full...) are outages, as
    a lost connection is: 503 to a request, a retry to a background loop. An answer about
    the data (a unique violation) still passes through."""
    async with open_database(settings(pg_db)) as db:
        await db.execute("CREATE TABLE r (x int PRIMARY KEY)")
        read_only = f"ALTER DATABASE {pg_db.name} SET default_transaction_read_only = on"
        await db.execute(read_only)
    async with open_database(settings(pg_db)) as db:
        with pytest.raises(StoreUnavailable, match="read-only"):
            await db.execute("INSERT INTO r VALUES (1)")
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            async with db.transaction() as con:
                await con.execute("SET LOCAL statement_timeout = 50")
                await con.fetchval("SELECT pg_sleep(5)")
        await db.execute(
            f"BEGIN READ WRITE; ALTER DATABASE {pg_db.name} "
            "SET default_transaction_read_only = off; COMMIT"
        )
    async with open_database(settings(pg_db)) as db:
        await db.execute("INSERT INTO r VALUES (1)")
        with pytest.raises(asyncpg.UniqueViolationError):
            await db.execute("INSERT INTO r VALUES (1)")
