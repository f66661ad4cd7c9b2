"""The bridge: asyncpg (asyncio-only) used from the Trio process, through trio-asyncio.

:func:`open_database` opens the one asyncio loop of the process inside the Trio run
(``trio_asyncio.open_loop``) and an asyncpg pool on it; every call into asyncpg goes
through :func:`trio_asyncio.aio_as_trio` bound to that loop, here and nowhere else. The
rest of the process sees Trio functions, asyncpg's records, and our errors.

Errors, by cause (what the caller may conclude)::

    StoreUnavailable (an AuditUnavailable: 503 audit_unavailable)
        the database could not be reached, went away, or did not answer in time, before
        a commit was asked for: nothing of the call or transaction took effect
    CommitUnknown
        the connection failed while COMMIT was in flight: the transaction may or may not
        have committed, and the caller must find out (by reading) before it answers

The server's own errors count as unavailability when their SQLSTATE says it cannot serve
now, whatever is asked (:data:`UNAVAILABLE_SQLSTATES`): a lost connection (class 08),
insufficient resources (53: disk full, out of memory, too many connections), operator
intervention (57: shutting down, starting up, a statement cut by a timeout), a system
error (58: I/O), a read-only database (25006: a standby after a failover), a session
ended for idling in a transaction (25P03). Any other ``asyncpg.PostgresError`` (a unique
violation, a serialisation failure) passes through unchanged: it is an answer from a
working database about the data, and the store decides.

Rough edges of trio-asyncio, and what this module does about them:

- **The loop's lifetime.** asyncpg connections belong to the loop they were made on; the
  loop closes when ``open_loop`` exits, after cancelling the asyncio tasks still running.
  So the pool is created inside the loop and closed (or terminated) before it exits.
- **Which loop.** ``aio_as_trio(fn)`` finds its loop through a context variable that only
  tasks started inside ``open_loop`` inherit; HTTP handler tasks, started by Hypercorn
  outside it, would get "not within a trio_asyncio loop". Every call here passes the
  loop explicitly, so any Trio task of the run may use the database.
- **Cancellation.** A cancelled Trio scope cancels the asyncio task running the asyncpg
  call and then *waits* for that task to finish: asyncpg sends the server a cancel
  request on a second connection, and the query's own connection stays busy until the
  server confirms. A call whose result was already on its way may even return normally
  inside a cancelled scope. The connection is then handed back to the pool inside a
  shielded, bounded scope: the pool waits for the cancel to complete, rolls back and
  resets the session (locks, LISTENs), and a connection that cannot be reset in time is
  terminated, never reused.
- **Callbacks.** asyncpg calls LISTEN callbacks through the asyncio loop, which
  trio-asyncio runs inside a Trio task: they may set Trio events directly (only
  non-blocking calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import asyncpg
import trio
import trio_asyncio
from asyncpg import exceptions as pgerr
from asyncpg.pool import PoolConnectionProxy

from actors.errors import AuditUnavailable

T = TypeVar("T")
#: a connection of the pool, while it is taken (generic in the stubs only, hence a string)
PooledConnection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
Isolation = Literal["read_committed", "repeatable_read", "serializable"]

#: SQLSTATE classes (two characters) and codes by which the server says it cannot serve
#: now, whatever is asked; a request gets 503 and a background loop tries again later
UNAVAILABLE_SQLSTATES = frozenset({"08", "53", "57", "58", "25006", "25P03"})


class StoreUnavailable(AuditUnavailable):
    """The database could not be reached or did not answer in time; nothing took effect.

    ``timed_out`` tells a deadline (the database may be overloaded: trying again at once
    only adds load) from a failed connection (a fresh one may well work).
    """

    def __init__(self, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


class CommitUnknown(Exception):
    """The connection failed during COMMIT: the transaction may or may not have committed."""


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """How to reach the database and how long to wait for it.

    ``call_timeout`` bounds one statement; ``transaction_timeout`` a whole transaction,
    from taking a connection to its commit; ``release_timeout`` how long a connection may
    take to be made clean again (after a cancellation) before it is terminated.
    """

    dsn: str
    pool_size: int = 10
    connect_timeout: float = 5.0
    call_timeout: float = 5.0
    transaction_timeout: float = 10.0
    release_timeout: float = 5.0


def _unavailable(error: BaseException) -> bool:
    if isinstance(error, OSError):  # refused, reset, unreachable; also TimeoutError (connect)
        return True
    if isinstance(error, pgerr.PostgresConnectionError):
        return True  # asyncpg's own "connection was closed mid-operation" among them
    if isinstance(error, pgerr.PostgresError):
        state = str(getattr(error, "sqlstate", "") or "")
        return state[:2] in UNAVAILABLE_SQLSTATES or state in UNAVAILABLE_SQLSTATES
    # A connection the server dropped while it sat idle in the pool fails its next use
    # inside asyncpg's protocol state machine; one lost mid-use is detached from its pool
    # proxy ("released back to the pool"), or reported closed. None of these is an answer
    # of the database.
    if isinstance(error, pgerr.InternalClientError):
        return True
    return isinstance(error, pgerr.InterfaceError) and (
        "closed" in str(error) or "released back to the pool" in str(error)
    )


def _gone(raw: PooledConnection) -> bool:
    """True when the connection is closed or no longer ours (its pool took it back)."""
    try:
        return bool(raw.is_closed())
    except pgerr.InterfaceError:
        return True


def _terminate(raw: PooledConnection) -> None:
    with contextlib.suppress(pgerr.InterfaceError):  # the pool took it back after it closed
        raw.terminate()


#: one SQL statement and its arguments (numbered from $1)
Statement = tuple[str, list[Any]]


class Queries(Protocol):
    """What a transaction's body may call: a :class:`Connection` (each call crosses into
    asyncio) or a :class:`Direct` (the body runs inside asyncio already)."""

    async def execute(self, sql: str, *args: Any) -> str: ...

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]: ...

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...


class Direct:
    """A connection seen from inside asyncio: each call is a plain asyncpg call.

    The body of :meth:`Database.atomic` gets one. It must not touch Trio (no Trio call
    awaits there); pure Python and asyncpg calls only.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: PooledConnection) -> None:
        self.raw = raw

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.raw.execute(sql, *args)

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        await self.raw.executemany(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.raw.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.raw.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.raw.fetchval(sql, *args)


async def _run_atomic(
    raw: PooledConnection,
    body: Callable[[Direct], Awaitable[T]],
    isolation: Isolation,
    committing: list[bool],
) -> T:
    """Inside asyncio: one transaction on ``raw`` (committed when ``body`` returns)."""
    async with raw.transaction(isolation=isolation):
        result = await body(Direct(raw))
        committing.append(True)  # what fails from here on failed in COMMIT
    return result


class Connection:
    """One connection taken from the pool, usable by Trio code while its context is open."""

    __slots__ = ("_db", "raw")

    def __init__(self, db: Database, raw: PooledConnection) -> None:
        self._db = db
        #: the asyncpg connection itself: only for :class:`Database` and the listener
        self.raw = raw

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._db.call(self.raw.execute, sql, *args)

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        await self._db.call(self.raw.executemany, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._db.call(self.raw.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._db.call(self.raw.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._db.call(self.raw.fetchval, sql, *args)

    @contextlib.asynccontextmanager
    async def transaction(self, isolation: Isolation = "read_committed") -> AsyncIterator[None]:
        """A transaction on this very connection (say, the one holding a session lock).

        Committed when the body returns, rolled back when it raises; a connection lost
        during the commit raises :class:`CommitUnknown`. Each statement has its own
        ``call_timeout``; there is no deadline for the whole.
        """
        tx = self.raw.transaction(isolation=isolation)
        await self._db.call(tx.start)
        async with self._db._completing(self.raw, tx):
            yield

    async def session(self, body: Callable[[Direct], Awaitable[T]]) -> T:
        """``body`` on this very connection, whole inside asyncio (one crossing), each
        statement committed on its own; errors as :meth:`Database.session`."""
        return await self._db.call(
            body, Direct(self.raw), within=self._db.settings.transaction_timeout
        )

    async def atomic(
        self, body: Callable[[Direct], Awaitable[T]], isolation: Isolation = "read_committed"
    ) -> T:
        """A transaction on this very connection, run whole inside asyncio (one crossing);
        errors as :meth:`Database.atomic`."""
        committing: list[bool] = []
        try:
            return await self._db.call(
                _run_atomic, self.raw, body, isolation, committing,
                within=self._db.settings.transaction_timeout,
            )  # fmt: skip
        except StoreUnavailable as error:
            if committing:
                raise CommitUnknown(f"the commit's outcome is unknown: {error}") from error
            raise


class Notifications:
    """Wake-ups from LISTEN: :meth:`wait` returns the latest payload of each channel.

    Notifications only say "look again": several arriving between two waits are merged
    (the latest payload per channel wins), so a slow reader never falls behind. If the
    connection is lost, :meth:`wait` raises :class:`StoreUnavailable` (and keeps raising):
    notifications may have been missed, so the reader must re-read what it watches once
    it listens again.
    """

    def __init__(self) -> None:
        self._arrived = trio.Event()
        self._latest: dict[str, str] = {}
        self._lost = False

    def _on_notify(self, _con: object, _pid: int, channel: str, payload: str) -> None:
        self._latest[channel] = payload
        self._arrived.set()

    def _on_terminate(self, _con: object) -> None:
        self._lost = True
        self._arrived.set()

    async def wait(self) -> dict[str, str]:
        await self._arrived.wait()
        if self._lost:
            raise StoreUnavailable("the notification connection to the database was lost")
        self._arrived = trio.Event()
        latest, self._latest = self._latest, {}
        return latest


class Database:
    """A pool of asyncpg connections on the process's asyncio loop, for Trio code."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: asyncpg.Pool[asyncpg.Record],
        settings: DatabaseSettings,
    ) -> None:
        self._loop = loop
        self._pool = pool
        self.settings = settings

    async def call(
        self, fn: Callable[..., Awaitable[T]], *args: Any, within: float | None = None
    ) -> T:
        """Run one asyncpg coroutine function on the loop, under a deadline.

        The deadline (``call_timeout`` unless given) and connection failures become
        :class:`StoreUnavailable`; a cancellation from outside stays a cancellation.
        """
        limit = self.settings.call_timeout if within is None else within
        with trio.move_on_after(limit) as scope:
            try:
                result: T = await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args)
                return result
            except Exception as error:
                if not _unavailable(error):
                    raise
                await self._expire_idle()
                raise StoreUnavailable(f"the database is unavailable: {error}") from error
        assert scope.cancelled_caught
        raise StoreUnavailable(f"the database did not answer within {limit} s", timed_out=True)

    async def _expire_idle(self) -> None:
        """After a failure, no pooled connection made before it is trusted again.

        Were the server restarted, every idle connection would fail once at its next
        use; expiring them makes the pool open fresh ones instead.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.release_timeout):
            await trio_asyncio.aio_as_trio(self._pool.expire_connections, loop=self._loop)()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection of its own until the context exits (then it goes back, clean)."""
        raw = await self.call(self._pool.acquire, within=self.settings.connect_timeout)
        try:
            yield Connection(self, raw)
        finally:
            await self._release(raw)

    async def _release(self, raw: PooledConnection) -> None:
        # Shielded: a cancelled caller still returns its connection, and only a clean one
        # goes back (the pool waits for a pending cancel and rolls back; the session is
        # reset here: a connection handed out whole may hold locks and LISTENs).
        with trio.CancelScope(shield=True):
            try:
                await self.call(_reset_and_release, self._pool, raw,
                                within=self.settings.release_timeout)  # fmt: skip
            except (StoreUnavailable, pgerr.PostgresError, pgerr.InterfaceError):
                _terminate(raw)

    @contextlib.asynccontextmanager
    async def transaction(
        self, isolation: Isolation = "read_committed", *, within: float | None = None
    ) -> AsyncIterator[Connection]:
        """One transaction: committed when the body returns, rolled back when it raises.

        The whole of it, from taking a connection to the commit, must finish within
        ``within`` seconds (default ``transaction_timeout``), else :class:`StoreUnavailable`
        and nothing committed. A connection lost during the commit raises
        :class:`CommitUnknown`.
        """
        limit = self.settings.transaction_timeout if within is None else within
        with trio.move_on_after(limit) as deadline:
            raw, tx = await self._begin(isolation)
            try:
                con = Connection(self, raw)
                async with self._completing(raw, tx):
                    yield con
            finally:
                await self._release(raw)
            return
        if deadline.cancelled_caught:
            raise StoreUnavailable(
                f"the transaction did not finish within {limit} s",
                timed_out=True,
            )

    @contextlib.asynccontextmanager
    async def _completing(self, raw: PooledConnection, tx: Any) -> AsyncIterator[None]:
        """Commit a started transaction when the body returns; roll it back when it raises."""
        try:
            yield
        except BaseException:
            await self._rollback(raw, tx)
            raise
        try:
            await self.call(tx.commit)
        except StoreUnavailable as error:
            raise CommitUnknown(f"the commit's outcome is unknown: {error}") from error

    async def _begin(self, isolation: Isolation) -> tuple[PooledConnection, Any]:
        """A connection with a transaction started on it.

        Nothing has happened yet when BEGIN fails, so a connection that turns out broken
        (the server restarted since it was pooled) is replaced once.
        """
        for attempt in (1, 2):
            raw = await self.call(self._pool.acquire, within=self.settings.connect_timeout)
            tx = raw.transaction(isolation=isolation)
            try:
                await self.call(tx.start)
            except StoreUnavailable as error:
                await self._release(raw)
                if attempt == 2 or error.timed_out:
                    raise
                continue
            return raw, tx
        raise AssertionError("unreachable")

    async def _rollback(self, raw: PooledConnection, tx: Any) -> None:
        if _gone(raw):
            return  # the server rolls back a transaction whose connection is gone
        # Shielded and bounded: after a cancelled query, asyncpg waits for the server to
        # confirm the cancel before it sends the ROLLBACK. If even that fails, the
        # connection is terminated on release, which the server also takes as a rollback.
        with trio.CancelScope(shield=True):
            try:
                await self.call(tx.rollback, within=self.settings.release_timeout)
            except (StoreUnavailable, pgerr.PostgresError, pgerr.InterfaceError):
                _terminate(raw)

    async def atomic(
        self,
        body: Callable[[Direct], Awaitable[T]],
        isolation: Isolation = "read_committed",
        *,
        within: float | None = None,
    ) -> T:
        """One transaction whose body runs whole inside asyncio: one crossing of the
        bridge for the lot (taking a connection, BEGIN, the body's statements, COMMIT,
        giving it back) instead of one per statement, which is most of the CPU a short
        transaction costs here.

        ``body`` gets a :class:`Direct` connection and must not await anything of Trio.
        Errors as :meth:`transaction`: :class:`StoreUnavailable` (nothing committed; also
        past ``within``, default ``transaction_timeout``), :class:`CommitUnknown` (the
        connection failed during COMMIT), anything else ``body`` raised (rolled back).
        """
        limit = self.settings.transaction_timeout if within is None else within
        committing: list[bool] = []

        async def run() -> T:
            async with self._pool.acquire(timeout=self.settings.connect_timeout) as raw:
                return await _run_atomic(raw, body, isolation, committing)

        try:
            return await self.call(run, within=limit)
        except StoreUnavailable as error:
            if committing:
                raise CommitUnknown(f"the commit's outcome is unknown: {error}") from error
            raise

    async def session(
        self, body: Callable[[Direct], Awaitable[T]], *, within: float | None = None
    ) -> T:
        """``body`` on one connection, whole inside asyncio (one crossing), its statements
        each committed on its own (no transaction around them). ``StoreUnavailable``
        when the database failed or ``within`` (default ``transaction_timeout``) passed:
        the statement running then may or may not have taken effect (``body`` knows
        which one that was)."""
        limit = self.settings.transaction_timeout if within is None else within

        async def run() -> T:
            async with self._pool.acquire(timeout=self.settings.connect_timeout) as raw:
                return await body(Direct(raw))

        return await self.call(run, within=limit)

    async def transact(
        self,
        body: Callable[[Connection], Awaitable[T]],
        *,
        isolation: Isolation = "read_committed",
        attempts: int = 3,
    ) -> T:
        """Run ``body`` in a transaction, again when the server rolled it back for a
        serialisation failure or a deadlock (it had no effect then), at most ``attempts``
        times."""
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction(isolation) as con:
                    return await body(con)
            except pgerr.TransactionRollbackError:
                if attempt == attempts:
                    raise
                await trio.sleep(0.005 * attempt)
        raise AssertionError("unreachable")

    async def _read(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        """One read on a pooled connection; a read is safe to try once more on a fresh
        connection when the pooled one turned out broken.

        The pool's own method takes, uses and gives back the connection in one crossing
        into asyncio instead of three (the crossing is most of a read's CPU here); asyncpg
        shields the release from a cancellation, and resets the connection like ours.
        """
        for attempt in (1, 2):
            try:
                return await self.call(getattr(self._pool, method), sql, *args)
            except StoreUnavailable as error:
                if attempt == 2 or error.timed_out:
                    raise
        raise AssertionError("unreachable")

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of a read-only statement (use a transaction to write)."""
        rows: list[asyncpg.Record] = await self._read("fetch", sql, args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._read("fetchrow", sql, args)
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._read("fetchval", sql, args)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.connection() as con:
            return await con.execute(sql, *args)

    @contextlib.asynccontextmanager
    async def listen(self, *channels: str) -> AsyncIterator[Notifications]:
        """LISTEN on ``channels`` over a connection of its own while the context is open."""
        notifications = Notifications()
        async with self.connection() as con:
            con.raw.add_termination_listener(notifications._on_terminate)
            for channel in channels:
                await self.call(con.raw.add_listener, channel, notifications._on_notify)
            try:
                yield notifications
            finally:
                if not _gone(con.raw):
                    con.raw.remove_termination_listener(notifications._on_terminate)
                    with trio.CancelScope(shield=True):
                        try:
                            for channel in channels:
                                await self.call(
                                    con.raw.remove_listener, channel, notifications._on_notify
                                )
                        except (StoreUnavailable, pgerr.PostgresError):
                            pass  # the release resets (or terminates) the connection anyway


#: Per-session server settings. The keepalives make the server notice within ~15 s that a
#: replica's host vanished (no TCP reset, as after a power cut or a partition), so that
#: the session locks it held (the sequencer's) are released; a process that merely dies
#: is noticed at once. A transaction left idle by a stuck client is ended after 30 s.
SESSION_SETTINGS = {
    # the process in pg_stat_activity: an operator (or a test) finds which replica holds
    # the sequencer lock
    "application_name": f"vm-tenant/{os.getpid()}",
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "5",
    "idle_in_transaction_session_timeout": "30s",
}


async def _reset_and_release(pool: asyncpg.Pool, raw: PooledConnection) -> None:
    """Inside asyncio: reset the session (advisory locks, LISTENs, settings), give it back."""
    if not raw.is_closed():
        await raw.reset()
    await pool.release(raw)


async def _session_untouched(_con: object) -> None:
    """The pool's reset of connections it lends for one call or one transaction.

    Those never change the session (no SET, no session lock, no LISTEN) and the pool has
    already rolled back any transaction left open, so the reset query's round trip (a
    second one per read) is skipped; connections handed out whole are reset on release.
    """


async def _create_pool(settings: DatabaseSettings) -> asyncpg.Pool:
    """The pool, made inside the asyncio loop (asyncpg binds it to the running loop)."""
    return await asyncpg.create_pool(
        settings.dsn,
        min_size=0,
        max_size=settings.pool_size,
        timeout=settings.connect_timeout,
        # sessions are short and reset on release; a connection idle this long is closed,
        # so a pool shrinks again after a burst
        max_inactive_connection_lifetime=60.0,
        server_settings=SESSION_SETTINGS,
        reset=_session_untouched,
    )


@contextlib.asynccontextmanager
async def open_database(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """The process's asyncio loop and a connection pool on it, until the context exits.

    No connection is made up front: the first call connects (so a replica may start
    while the database is away, and find out at its first call).
    """
    async with trio_asyncio.open_loop() as loop:
        pool = await trio_asyncio.aio_as_trio(_create_pool, loop=loop)(settings)
        database = Database(loop, pool, settings)
        try:
            yield database
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await database.call(pool.close, within=settings.release_timeout)
                except (StoreUnavailable, pgerr.PostgresError, pgerr.InterfaceError):
                    pool.terminate()
