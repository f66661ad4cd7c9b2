"""One chain, many writers: the queue, the sequencer, and the acknowledgements.

Write transactions do not touch the chain. They :func:`enqueue` their entries (the
canonical JSON of the entry's fields) in ``audit_queue``, in the same transaction as the
change the entries record, and commit. One replica at a time, whichever holds the session
advisory lock :data:`SEQUENCER_LOCK`, runs :class:`Sequencer`: it takes the committed
queue rows in ``qid`` order, gives each its ``seq``, ``ts``, ``prev`` and ``hash`` with the
file store's own :func:`~actors.journal.chain.seal` (so the stored line is byte for byte what the
file store would write), and in one transaction inserts them into ``audit_log`` (with
their Merkle leaves), deletes them from the queue, moves ``audit_head`` by
compare-and-set, and notifies ``vm_tenant_sequenced``. Every replica's
:class:`Acknowledger` then wakes the requests whose entries are now in the chain: a
request is acknowledged only once its entries are sequenced.

Why per-tenant order holds (the chain shows a tenant's decisions in the order they took
effect): a decision reads the tenant's row (its ``version``) and takes its entry's ``qid``
in the same statement, then writes behind a compare-and-set of that version
(``rows.py``); a tenant or token change does both inside a transaction that holds the
tenant's row lock. Take two decisions that took effect, T1 then T2. T2's write found the
version T1 wrote, so T2's read saw T1 committed, and T2 took its ``qid`` after T1 took
its own: the sequence hands out rising values in call order (no per-session cache), so
``qid(T1) < qid(T2)``. PostgreSQL makes a write visible to others only once committed,
so every snapshot that sees T2 sees T1 too. A batch therefore never holds T2's rows
without T1's, and orders them by ``qid``: T1's entries get the smaller seqs. A decision
that lost the compare-and-set wrote nothing (its ``qid`` is a gap, which is harmless).
Outcomes only release capacity and do not move the version; each follows its operation's
``requested`` entry because it is written only after that one was acknowledged. Rows of
unrelated tenants may be sequenced in another order than their commits; nothing depends
on that.

Why there is no gap or duplicate when the sequencer changes: a batch is one read and one
statement (so one transaction) on the very connection that holds the lock, and that
statement moves the head by compare-and-set from the head the batch started from, writing
the lines only if it did. A sequencer that lost its connection lost its lock and its
statement together (the server rolls that back), and ``audit_log.seq`` is the primary key,
so even two sequencers at once (a bug) could not both commit the same seq.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from actors.journal.chain import canonical, decode_line, seal
from actors.journal.entries import utc_now
from actors.journal.merkle import Frontier
from actors.store.postgres.bridge import (
    CommitUnknown,
    Connection,
    Database,
    Direct,
    Queries,
    Statement,
    StoreUnavailable,
)
from actors.store.postgres.schema import advisory_key
from actors.store.postgres.tree import extend, restore_frontier

log = logging.getLogger("vm_tenant.store.sequencer")

SEQUENCER_LOCK = advisory_key("vm-tenant.audit.sequencer")
#: NOTIFY channels: entries were queued / entries were sequenced (payload: the new head seq)
QUEUED = "vm_tenant_queued"
SEQUENCED = "vm_tenant_sequenced"
#: the fields of an entry that its writer gives; the sequencer adds seq, ts, prev, hash
FIELDS = ("op", "outcome", "tenant", "vm", "source", "request_id", "detail")


async def enqueue(
    con: Queries,
    entries: Iterable[dict[str, Any]],
    also: Iterable[Statement] = (),
    guard: Statement | None = None,
    qids: list[int] | None = None,
) -> list[int]:
    """Queue entries (dicts of :data:`FIELDS`) in the caller's transaction (or as a
    statement of its own); their qids.

    ``also`` are writes (INSERT, UPDATE, DELETE without RETURNING) made in the very same
    statement, as data-modifying CTEs: one round trip for a decision's rows, its entries
    and the sequencer's wake-up. They must not touch the same row twice, and see the
    snapshot the statement starts from (not each other's changes). With a ``guard`` (a
    write ``... RETURNING`` something, the CTE ``g``), the writes and the entries happen
    only if the guard wrote a row (``also`` then carries the condition on ``g``), and no
    qid back means that nothing was written. ``qids``: taken from ``audit_queue_qid_seq``
    beforehand, one per entry (else the queue takes them). An entry that cannot be encoded
    raises here, before anything is written.
    """
    bodies: list[bytes] = []
    tenants: list[str | None] = []
    for entry in entries:
        if set(entry) != set(FIELDS):
            raise ValueError(f"an audit entry has exactly the fields {FIELDS}")
        bodies.append(canonical(entry))
        tenants.append(entry["tenant"])
    if not bodies:
        return []
    parts: list[str] = []
    args: list[Any] = []
    condition = ""
    if guard is not None:
        parts.append(f"g AS ({guard[0]})")
        args.extend(guard[1])
        condition = " WHERE EXISTS (SELECT 1 FROM g)"
    for number, (sql, params) in enumerate(also):
        parts.append(f"w{number} AS ({_shifted(sql, len(args))})")
        args.extend(params)
    n = len(args)
    args += [QUEUED, tenants, bodies]
    columns, values = "tenant, body", f"${n + 2}::text[], ${n + 3}::bytea[]"
    if qids is not None:
        args.append(qids)
        columns, values = f"qid, {columns}", f"${n + 4}::bigint[], {values}"
    parts.append(
        f"queued AS (INSERT INTO audit_queue ({columns}) SELECT * FROM unnest({values})"
        f"{condition} RETURNING qid)"
    )
    # several wake-ups in one transaction arrive as one
    rows = await con.fetch(
        f"WITH {', '.join(parts)} SELECT qid, pg_notify(${n + 1}, '') FROM queued", *args
    )
    return sorted(row["qid"] for row in rows)


def _shifted(sql: str, offset: int) -> str:
    """``sql`` with its parameters ``$k`` renumbered ``$(k + offset)``."""
    return re.sub(r"\$(\d+)", lambda match: f"${int(match.group(1)) + offset}", sql)


def leaf_hash(line: bytes) -> bytes:
    """RFC 9162 leaf hash of a stored line (without its newline)."""
    return hashlib.sha256(b"\x00" + line).digest()


@dataclass(slots=True)
class _Head:
    seq: int
    hash: str
    ts: str | None


class HeadMoved(Exception):
    """The head is not where this sequencer left it: another one wrote. Nothing committed."""


class Sequencer:
    """Assigns seqs to queued entries while this replica holds the sequencer lock.

    ``clock`` gives an entry's ``ts`` (one per batch, never before the head's, so ``ts``
    never goes backwards along the chain even across sequencers with skewed clocks).
    ``standby_poll`` is how often a replica without the lock tries to take it, and so
    bounds the takeover once the holder's connection is gone; ``idle_poll`` bounds the
    wait for a queued entry whose notification was lost.
    """

    def __init__(
        self,
        db: Database,
        *,
        batch: int = 1000,
        standby_poll: float = 0.5,
        idle_poll: float = 1.0,
        retry: float = 1.0,
        clock: Callable[[], str] = utc_now,
    ) -> None:
        self._db = db
        self._batch = batch
        self._standby_poll = standby_poll
        self._idle_poll = idle_poll
        self._retry = retry
        self._clock = clock
        #: True while this replica holds the lock
        self.leading = False
        #: the tree's right edge while leading (restored from the rows on taking the lead)
        self._frontier = Frontier()
        self.sequenced = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stand by, lead when the lock is free, and start over after any outage."""
        task_status.started()
        while True:
            try:
                await self._serve()
            except (StoreUnavailable, CommitUnknown) as error:
                # a batch whose commit is in doubt: the next leader reads the head anew
                log.warning("sequencer lost the database (%s); retrying", error)
            except HeadMoved as error:
                log.error("sequencer stopped a batch: %s", error)
            finally:
                self.leading = False
            await trio.sleep(self._retry)

    async def _serve(self) -> None:
        async with self._db.connection() as con:
            await self._take_lock(con)
            async with self._db.listen(QUEUED) as queued:
                self.leading = True
                log.info("this replica sequences the audit log now")
                head = await self._read_head(con)
                self._frontier = await con.session(lambda d: restore_frontier(d, head.seq))
                while True:
                    head, count = await self._sequence_batch(con, head)
                    if count == self._batch:
                        continue  # more is waiting
                    with trio.move_on_after(self._idle_poll):
                        await queued.wait()

    async def _take_lock(self, con: Connection) -> None:
        """Wait until this connection holds the sequencer lock (the holder's session ends)."""
        while True:
            if await con.fetchval("SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK):
                return
            await trio.sleep(self._standby_poll)

    @staticmethod
    async def _read_head(con: Connection) -> _Head:
        row = await con.fetchrow("SELECT seq, hash, ts FROM audit_head")
        assert row is not None, "audit_head has its one row from the migration"
        return _Head(row["seq"], row["hash"], row["ts"])

    async def _sequence_batch(self, con: Connection, head: _Head) -> tuple[_Head, int]:
        """Sequence up to ``batch`` queued entries: one read, then one statement that writes
        the lot behind a compare-and-set of the head (one crossing of the bridge)."""
        moved, count = await con.session(lambda direct: self._batch_body(direct, head))
        self.sequenced += count
        return moved, count

    async def _batch_body(self, con: Direct, head: _Head) -> tuple[_Head, int]:
        """The batch's transaction body (inside asyncio: no Trio call here)."""
        rows = await con.fetch(
            "SELECT qid, tenant, body FROM audit_queue ORDER BY qid LIMIT $1", self._batch
        )
        if not rows:
            return head, 0
        ts = self._clock()
        if head.ts is not None and ts < head.ts:
            ts = head.ts
        seq, prev = head.seq, head.hash
        seqs, qids, tenants, hashes, lines, leaves = [], [], [], [], [], []
        for row in rows:
            seq += 1
            fields = decode_line(row["body"])
            entry = {"seq": seq, "ts": ts, **fields, "prev": prev}
            line = seal(entry)[:-1]
            prev = entry["hash"]
            seqs.append(seq)
            qids.append(row["qid"])
            tenants.append(row["tenant"])
            hashes.append(prev)
            lines.append(line)
            leaves.append(leaf_hash(line))
        # Every node of the RFC 9162 tree the lines complete, the leaves (level 0: leaf
        # index = seq - 1) included. If the statement fails the frontier is ahead of the
        # stored tree: the sequencer then starts over, restoring it from the rows.
        nodes = extend(self._frontier, leaves)
        # One statement, so one transaction: the head moves by compare-and-set, and the
        # lines, the tree's nodes and the queue's deletion happen only if it moved.
        moved = await con.fetchval(
            "WITH h AS (UPDATE audit_head SET seq = $1, hash = $2, ts = $3 "
            "WHERE seq = $4 AND hash = $5 RETURNING seq), "
            "l AS (INSERT INTO audit_log (seq, qid, tenant, hash, line) "
            "SELECT * FROM unnest($6::bigint[], $7::bigint[], $8::text[], $9::text[], "
            "$10::bytea[]) WHERE EXISTS (SELECT 1 FROM h)), "
            "m AS (INSERT INTO merkle_nodes (level, idx, hash) "
            "SELECT * FROM unnest($11::smallint[], $12::bigint[], $13::bytea[]) "
            "WHERE EXISTS (SELECT 1 FROM h)), "
            "d AS (DELETE FROM audit_queue WHERE qid = ANY($7::bigint[]) "
            "AND EXISTS (SELECT 1 FROM h)) "
            "SELECT seq FROM h, pg_notify($14, $1::text)",
            seq, prev, ts, head.seq, head.hash, seqs, qids, tenants, hashes, lines,
            [n.level for n in nodes], [n.index for n in nodes], [n.hash for n in nodes],
            SEQUENCED,
        )  # fmt: skip
        if moved is None:
            raise HeadMoved(f"expected the head at seq {head.seq}; another writer moved it")
        return _Head(seq, prev, ts), len(rows)


class Acknowledgements:
    """Wakes the requests of this replica once their queued entries are sequenced.

    A writer calls :meth:`expect` with the qids of its entries *before* it commits them
    (the sequencer cannot see them earlier, so no wake-up can be missed), then waits on
    the returned :class:`Pending` after the commit. :meth:`run` follows the chain's head
    (on every notification, and every ``poll`` seconds in case one was lost) and reads the
    stored lines of the entries someone here waits for.
    """

    def __init__(self, db: Database, *, poll: float = 1.0) -> None:
        self._db = db
        self._poll = poll
        self._waiting: dict[int, Pending] = {}
        self._seen = -1  # the head seq followed so far; -1 until run() read it
        self._live = False

    @contextlib.contextmanager
    def expect(self, qids: list[int]) -> Iterator[Pending]:
        """Register ``qids`` for the duration of the context (leave it once answered)."""
        pending = self.register(qids)
        try:
            yield pending
        finally:
            self.forget(pending)

    def register(self, qids: list[int]) -> Pending:
        """Register ``qids`` (before their commit); they are forgotten once answered, or by
        :meth:`forget` (their transaction did not commit)."""
        pending = Pending(qids)
        for qid in qids:
            self._waiting[qid] = pending
        return pending

    def forget(self, pending: Pending) -> None:
        for qid in pending.qids:
            if self._waiting.get(qid) is pending:
                del self._waiting[qid]

    @property
    def waiting(self) -> int:
        """Entries of this replica waiting for the sequencer."""
        return len(self._waiting)

    @property
    def live(self) -> bool:
        """Whether it follows the head now (False while it reconnects)."""
        return self._live

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the head until cancelled, reconnecting after outages.

        It reports started only once it has read the head (no registration may come
        before that point is known), so a replica does not start serving writes while
        the database is away.
        """
        started = False
        while True:
            try:
                async with self._db.listen(SEQUENCED) as sequenced:
                    if self._seen < 0:
                        self._seen = await self._db.fetchval("SELECT seq FROM audit_head")
                    self._live = True
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        await self._catch_up()
                        with trio.move_on_after(self._poll):
                            await sequenced.wait()
            except StoreUnavailable as error:
                self._live = False
                log.warning("acknowledgements lost the database (%s); retrying", error)
                await trio.sleep(self._poll)

    async def _catch_up(self) -> None:
        wanted = list(self._waiting)
        rows = await self._db.fetch(
            "SELECT seq, qid, CASE WHEN qid = ANY($2::bigint[]) THEN line END AS line "
            "FROM audit_log WHERE seq > $1 ORDER BY seq",
            self._seen,
            wanted,
        )
        if not rows:
            return
        lines: dict[int, bytes] = {}
        late: list[int] = []
        for row in rows:
            qid = row["qid"]
            if qid in self._waiting:
                if row["line"] is None:
                    late.append(qid)  # registered after the query was sent
                else:
                    lines[qid] = row["line"]
        if late:
            for row in await self._db.fetch(
                "SELECT qid, line FROM audit_log WHERE qid = ANY($1::bigint[])", late
            ):
                lines[row["qid"]] = row["line"]
        self._seen = rows[-1]["seq"]
        for qid, line in lines.items():
            pending = self._waiting.pop(qid, None)
            if pending is not None:
                pending.resolve(qid, line)


class Pending:
    """The entries of one write, filled in as they are sequenced."""

    def __init__(self, qids: list[int]) -> None:
        self.qids = qids
        self._lines: dict[int, bytes] = {}
        self._done = trio.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def resolve(self, qid: int, line: bytes) -> None:
        self._lines[qid] = line
        if len(self._lines) == len(self.qids):
            self._done.set()

    async def wait(self) -> list[dict[str, Any]]:
        """The stored entries, in queue order, once every one of them is in the chain."""
        await self._done.wait()
        return [decode_line(self._lines[qid]) for qid in self.qids]
