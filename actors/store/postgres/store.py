"""The PostgreSQL store: the store boundary over one database that many replicas share.

Each method keeps the promise the interface states (``actors/store/__init__.py``):

- :meth:`PostgresStore.decide` loads the slice the decision names
  (:class:`~actors.store.postgres.rows.RowSlice`) in one statement, runs the decision and
  the fold on it, and writes the rows the fold changed with the entry in one more, behind
  a compare-and-set of the tenant's version: the gate across replicas, so quota is exact
  whichever replica decides (a decision on a state that changed is made again).
- :meth:`PostgresStore.record` writes an entry that is not a decision (an operation's
  outcome, a tenant or token change) the same way, in its ticket's :meth:`wait`. An
  outcome is written only while this replica still owns the operation (see
  ``rows.py``): after another replica claimed it, this late writer records nothing.
- A ticket returns the stored entry once the sequencer put it in the chain (acknowledged
  means sequenced), and raises ``AuditUnavailable`` only when its transaction did not
  commit (and so never will be in the chain).
- Reads are queries; the token directory is a cache kept within a second
  (``directory.py``); operations in doubt are claimed by lease (``FOR UPDATE SKIP
  LOCKED``) and renewed while their owner works on them.

:func:`open_postgres_store` bootstraps the database and runs, until the context exits,
everything a replica needs besides its actors: the sequencer (one replica at a time leads),
the acknowledgements, the directory and keyring followers, the lease renewal and the
health probe that ``/readyz`` reads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from actors.errors import (
    AuditUnavailable,
    Busy,
    Conflict,
    InvalidRequest,
    NotFound,
    StartupError,
)
from actors.fsutil import create_private
from actors.journal import fold
from actors.journal.checkpoint import SignedHead, sign_head
from actors.journal.entries import Entry, utc_now
from actors.journal.merkle import (
    EMPTY_ROOT,
    consistency_plan,
    inclusion_plan,
    range_nodes,
)
from actors.journal.merkle import fold as merkle_fold
from actors.journal.note import Signer, Verifier
from actors.metrics import Metrics
from actors.state import (
    IN_DOUBT_STATES,
    SETTLED_STATES,
    Directory,
    Quota,
    TenantSlice,
    VmRecord,
)
from actors.store import Decided, JournalStats, Observer, SigningKey, TreeProof
from actors.store.postgres.bootstrap import (
    KEYS_CHANNEL,
    Secrets,
    bootstrap,
    load_token_keys,
    save_token_keys,
)
from actors.store.postgres.bridge import (
    CommitUnknown,
    Database,
    DatabaseSettings,
    Direct,
    Queries,
    Statement,
    StoreUnavailable,
    open_database,
)
from actors.store.postgres.directory import DirectoryFollower, note_change
from actors.store.postgres.rows import LEASE_SECONDS, VM_COLUMNS, RowSlice, vm_record
from actors.store.postgres.schema import SchemaError
from actors.store.postgres.sequencer import (
    FIELDS,
    Acknowledgements,
    Pending,
    Sequencer,
    enqueue,
)
from actors.store.postgres.tree import TreeIncomplete, node_hashes
from actors.views import Tenant, Usage, Vm, vm_view

log = logging.getLogger("vm_tenant.store")

D = TypeVar("D", bound=Decided)
T = TypeVar("T")

#: the predicate of the partial index ``vms_in_doubt``, spelt so the planner uses it: the
#: rows in doubt are few, the VMs may be millions
IN_DOUBT = "state IN (" + ", ".join(f"'{state}'" for state in sorted(IN_DOUBT_STATES)) + ")"
#: a ticket not answered within this long reads the chain itself (a lost wake-up)
TICKET_CHECK = 1.0
#: seconds between two rounds of housekeeping (metrics counts, pruning)
HOUSEKEEPING = 15.0
#: tries of a decision whose tenant changed under it (another replica decided first)
DECIDE_ATTEMPTS = 50
#: how often the checkpoint loop looks at the head's count since the last checkpoint
CHECKPOINT_TICK = 0.5
#: the longest a shutdown waits for its last checkpoint
SHUTDOWN_CHECKPOINT = 5.0


@dataclass(frozen=True, slots=True)
class PostgresStoreConfig:
    """Where the database is, and the periods of the replica's background work."""

    dsn: str
    #: this replica's data dir: only ``admin.token`` is written there (by the first one)
    data_dir: Path
    checkpoint_interval: float = 10.0
    checkpoint_every: int = 1000
    pool_size: int = 20
    #: the health probe's period (``/readyz`` follows the database within about this)
    probe_interval: float = 1.0
    directory_poll: float = 0.5
    #: how often a replica looks for operations whose owner's lease expired
    claim_interval: float = 5.0
    renew_interval: float = 10.0
    #: how often the sequencing replica reads which tenants have VMs (for the fleet sweep)
    with_vms_interval: float = 5.0


class _Ticket:
    """The promise of entries queued by a committed (or possibly committed) transaction."""

    def __init__(
        self, store: PostgresStore, pending: Pending, *, commit_known: bool = True
    ) -> None:
        self._store = store
        self._pending = pending
        self._commit_known = commit_known

    async def wait(self) -> Entry:
        return (await self._store._acknowledged(self._pending, self._commit_known))[-1]


class _RecordTicket:
    """A ticket whose transaction runs when it is waited on (``record`` is synchronous)."""

    def __init__(self, store: PostgresStore, entry: Entry) -> None:
        self._store = store
        self._entry = entry
        self._result: Entry | None = None

    async def wait(self) -> Entry:
        if self._result is None:
            self._result = await self._store._record(self._entry)
        return self._result


@dataclass(frozen=True, slots=True)
class _Written:
    """A decision that writes a given entry (an entry recorded as if decided)."""

    entry: Entry


class PgKeyStorage:
    """The token keyring in ``signing_keys``, for :class:`server.keyring.Keyring`.

    ``load`` answers from what the store read (at start, and whenever another replica
    changed the keyring); ``save`` runs in a worker thread (as the keyring calls it) and
    writes through the Trio run.
    """

    def __init__(self, store: PostgresStore, keys: list[SigningKey]) -> None:
        self._store = store
        self._keys = keys
        self._watchers: list[Callable[[list[SigningKey]], None]] = []

    def load(self) -> list[SigningKey] | None:
        return list(self._keys)

    def save(self, keys: list[SigningKey]) -> None:
        trio.from_thread.run(self._store._save_keys, keys)
        self._keys = list(keys)

    def watch(self, changed: Callable[[list[SigningKey]], None]) -> None:
        self._watchers.append(changed)

    def _reloaded(self, keys: list[SigningKey]) -> None:
        if keys != self._keys:
            self._keys = keys
            for changed in self._watchers:
                changed(list(keys))


class PostgresStore:
    """One replica's view of the shared database (see the module docstring)."""

    claim_interval: float | None

    def __init__(self, config: PostgresStoreConfig, db: Database, secrets_: Secrets) -> None:
        self.config = config
        self.db = db
        #: this process's identity as the owner of operations in flight; the pid lets an
        #: operator match the rows a replica owns to its process (and its sessions, whose
        #: ``application_name`` carries the pid too)
        self.owner = f"replica-{os.getpid()}-{secrets.token_hex(6)}"
        self.claim_interval = config.claim_interval
        self._secrets = secrets_
        self._admin = bytes.fromhex(secrets_.admin_sha256)
        self._keys = PgKeyStorage(self, secrets_.token_keys)
        self._directory = DirectoryFollower(db, poll=config.directory_poll)
        self.acks = Acknowledgements(db)
        self.sequencer = Sequencer(db)
        self._observers: list[Observer] = []
        self._healthy = True
        self._head: tuple[int, str] = (0, "0" * 64)
        self._latest_checkpoint: SignedHead | None = None
        #: the latest head this replica signed (signed again only once the head moved)
        self._signed: SignedHead | None = None
        self._log_signer = Signer(secrets_.origin, secrets_.audit_key)
        #: tenants with VMs, as the last housekeeping read them (for the fleet's sweep)
        self._with_vms: list[str] = []
        self._by_state: dict[str, int] = {}

    # -- health -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._healthy and self.acks.live

    async def _call(self, body: Callable[[], Awaitable[T]], *, commit_unknown: bool = False) -> T:
        """Run a database call, following its health for ``/readyz``.

        A commit whose outcome is unknown raises :class:`CommitUnknown` only to a caller
        that finds out itself (``commit_unknown``); to any other it is an unavailability.
        """
        try:
            result = await body()
        except StoreUnavailable:
            self._healthy = False
            raise
        except CommitUnknown as error:
            self._healthy = False
            if commit_unknown:
                raise
            raise StoreUnavailable(str(error)) from error
        self._healthy = True
        return result

    # -- the tenants' writes ------------------------------------------------------------------

    async def decide(
        self,
        tenant_id: str,
        decide: Callable[[TenantSlice], D],
        *,
        vm_id: str | None = None,
        key: str | None = None,
    ) -> tuple[D, _Ticket | None]:
        """Decide on the tenant's rows, fold, and write the rows and the entry behind a
        compare-and-set of the tenant's version (``rows.py``): a decision made on a state
        that changed meanwhile (another replica decided) writes nothing and is made again.
        One crossing of the bridge, two statements a try."""
        pending: Pending | None = None
        decided: D | None = None
        writing = False

        async def body(con: Direct) -> None:  # inside asyncio: no Trio call here
            nonlocal pending, decided, writing
            for _ in range(DECIDE_ATTEMPTS):
                rows = await RowSlice.load(con, tenant_id, vm_id, key)
                decided = decide(rows)
                entry = decided.entry
                if entry is None:
                    return
                fold.apply_to_tenant(rows, entry)
                if fold.remembers_key(entry):
                    # the retention, in the statement that makes the new record (nothing
                    # to undo: a statement that did not commit forgot nothing)
                    fold.expire(rows, entry)
                guard, writes = rows.decision_writes(self.owner)
                pending = self.acks.register([rows.qid])  # before anyone can sequence it
                writing = True
                if await self._enqueue(con, [entry], writes, guard, rows.qid):
                    return
                writing = False
                self.acks.forget(pending)
                pending = None
            raise Busy("the tenant changed too often to decide; try again", reason="contention")

        try:
            await self._call(lambda: self.db.session(body))
        except StoreUnavailable:
            if writing and pending is not None and decided is not None:
                # the write may or may not have taken effect: its ticket finds out
                log.warning("the write of a decision of %s is in doubt", tenant_id)
                return decided, _Ticket(self, pending, commit_known=False)
            if pending is not None:
                self.acks.forget(pending)
            raise
        except BaseException:
            if pending is not None:
                self.acks.forget(pending)
            raise
        assert decided is not None
        return decided, (None if pending is None else _Ticket(self, pending))

    async def _enqueue(
        self,
        con: Queries,
        entries: list[Entry],
        writes: list[Statement] | None = None,
        guard: Statement | None = None,
        qid: int | None = None,
    ) -> list[int]:
        """Queue ``entries`` (with ``writes``, behind ``guard``); their qids, none when the
        guard wrote nothing."""
        drafts = [{name: e[name] for name in FIELDS} for e in entries]
        return await enqueue(con, drafts, writes or (), guard, None if qid is None else [qid])

    async def _queue(self, con: Queries, entries: list[Entry]) -> Pending:
        """Queue ``entries`` in the caller's transaction, registered before its commit."""
        qids = await self._enqueue(con, entries)
        # registered before the commit, so that the sequencer cannot answer too early
        return self.acks.register(qids)

    def record(self, entry: Entry) -> _RecordTicket:
        return _RecordTicket(self, entry)

    async def _record(self, entry: Entry) -> Entry:
        """Write an entry that is not a decision, and wait until it is in the chain."""
        if entry["op"] in ("tenant.create", *DIRECTORY_OPS):
            return await self._record_directory(entry)
        if entry["op"].startswith("vm.") and entry["outcome"] in ("succeeded", "failed"):
            return await self._record_outcome(entry)
        # anything else about a tenant's rows is written like a decision that writes it
        _, ticket = await self.decide(entry["tenant"], lambda _: _Written(entry))
        assert ticket is not None
        return await ticket.wait()

    async def _record_directory(self, entry: Entry) -> Entry:
        """A tenant or token change: one transaction under the tenant's row lock."""
        op = entry["op"]
        pending: Pending | None = None

        async def body(con: Direct) -> None:  # inside asyncio: no Trio call here
            nonlocal pending
            if op == "tenant.create":
                await self._create_tenant(con, entry)
            else:
                exists = await con.fetchval(
                    "SELECT true FROM tenants WHERE id = $1 FOR UPDATE", entry["tenant"]
                )
                if not exists:
                    raise NotFound("no such tenant")
                await DIRECTORY_OPS[op](self, con, entry)
            pending = await self._queue(con, [entry])
            if op == "tenant.create":  # its own entries start at this one (OWN_SINCE)
                await con.execute(
                    "UPDATE tenants SET created_qid = $2 WHERE id = $1",
                    entry["tenant"], pending.qids[0],
                )  # fmt: skip

        try:
            await self._call(lambda: self.db.atomic(body), commit_unknown=True)
        except CommitUnknown:
            assert pending is not None
            return (await self._acknowledged(pending, commit_known=False))[-1]
        except BaseException:
            if pending is not None:
                self.acks.forget(pending)
            raise
        assert pending is not None
        self._apply_directory(entry)
        return (await self._acknowledged(pending, commit_known=True))[-1]

    async def _record_outcome(self, entry: Entry) -> Entry:
        """An operation's outcome, written only while this replica owns the operation (the
        VM row's write is the guard: ``rows.py``). A late writer (another replica claimed
        the operation) writes nothing and gets its draft back, unsequenced."""
        vm_id, key = entry["vm"], entry["detail"].get("idempotency_key")
        pending: Pending | None = None
        writing = False

        async def body(con: Direct) -> None:  # inside asyncio: no Trio call here
            nonlocal pending, writing
            rows = await RowSlice.load(con, entry["tenant"], vm_id, key)
            if rows.vm(vm_id) is None or rows.vm_owner.get(vm_id) != self.owner:
                return
            fold.apply_to_tenant(rows, entry)
            guard, writes = rows.outcome_writes(vm_id, self.owner)
            pending = self.acks.register([rows.qid])
            writing = True
            if not await self._enqueue(con, [entry], writes, guard, rows.qid):
                self.acks.forget(pending)
                pending = None
            writing = False

        try:
            await self._call(lambda: self.db.session(body))
        except StoreUnavailable:
            if writing and pending is not None:
                return (await self._acknowledged(pending, commit_known=False))[-1]
            if pending is not None:
                self.acks.forget(pending)
            raise
        except BaseException:
            if pending is not None:
                self.acks.forget(pending)
            raise
        if pending is None:
            log.info("%s of %s settled by another replica; not recorded here", entry["op"], vm_id)
            return entry
        return (await self._acknowledged(pending, commit_known=True))[-1]

    async def _create_tenant(self, con: Queries, entry: Entry) -> None:
        quota = fold.quota_from(entry["detail"]["quota"])
        created = await con.fetchval(
            "INSERT INTO tenants (id, quota_vcpus, quota_memory_mib, quota_vms) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING RETURNING true",
            entry["tenant"], quota.vcpus, quota.memory_mib, quota.vms,
        )  # fmt: skip
        if not created:
            raise Conflict(f"tenant {entry['tenant']!r} already exists")
        await self._issue_token(con, entry)  # its first token

    async def _delete_tenant(self, con: Queries, entry: Entry) -> None:
        tenant_id = entry["tenant"]
        if await con.fetchval("SELECT count(*) FROM vms WHERE tenant = $1", tenant_id):
            raise Conflict("the tenant still has VMs")
        await con.execute("DELETE FROM tenants WHERE id = $1", tenant_id)
        await note_change(con, tenant_id)

    async def _issue_token(self, con: Queries, entry: Entry) -> None:
        await con.execute(
            "INSERT INTO tokens (tenant, token_id) VALUES ($1, $2)",
            entry["tenant"],
            entry["detail"]["token_id"],
        )
        await note_change(con, entry["tenant"])

    async def _revoke_token(self, con: Queries, entry: Entry) -> None:
        revoked = await con.fetchval(
            "DELETE FROM tokens WHERE tenant = $1 AND token_id = $2 RETURNING true",
            entry["tenant"],
            entry["detail"]["token_id"],
        )
        if not revoked:
            raise NotFound("no such token")
        await note_change(con, entry["tenant"])

    def _apply_directory(self, entry: Entry) -> None:
        """A committed change of the tokens, in this replica's directory at once (the
        others follow within a second)."""
        op, tenant_id, directory = entry["op"], entry["tenant"], self._directory.directory
        if op == "tenant.create":
            directory.add_tenant(tenant_id, {entry["detail"]["token_id"]})
        elif op == "tenant.delete":
            directory.remove_tenant(tenant_id)
        elif op == "token.issue":
            directory.add_token(tenant_id, entry["detail"]["token_id"])
        elif op == "token.revoke":
            directory.remove_token(tenant_id, entry["detail"]["token_id"])

    async def _acknowledged(self, pending: Pending, commit_known: bool) -> list[Entry]:
        """The stored entries once sequenced; ``AuditUnavailable`` if they never will be."""
        while True:
            with trio.move_on_after(TICKET_CHECK):
                entries = await pending.wait()
                break
            # Not yet: read the chain directly (a wake-up may have been lost), and find out
            # whether a commit in doubt happened at all.
            try:
                found = await self.db.fetch(
                    "SELECT qid, line FROM audit_log WHERE qid = ANY($1::bigint[])", pending.qids
                )
                for row in found:
                    pending.resolve(row["qid"], row["line"])
                if pending.done:
                    continue
                if not commit_known and not await self.db.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM audit_queue WHERE qid = ANY($1::bigint[])) "
                    "OR EXISTS (SELECT 1 FROM audit_log WHERE qid = ANY($1::bigint[]))",
                    pending.qids,
                ):
                    self.acks.forget(pending)
                    raise AuditUnavailable("the entry could not be made durable")
            except StoreUnavailable:
                continue  # the database is away: keep waiting (the caller's deadline bounds it)
        self.acks.forget(pending)
        last = entries[-1]
        if last["seq"] > self._head[0]:
            self._head = (last["seq"], last["hash"])
        for observer in self._observers:
            observer(entries)
        return entries

    # -- operations in doubt ------------------------------------------------------------------

    async def mark_in_doubt(self, tenant_id: str, vm_id: str, kind: str) -> None:
        await self._call(
            lambda: self.db.execute(
                "UPDATE vms SET state = 'unknown', doubt = $3 "
                "WHERE id = $1 AND tenant = $2 AND owner = $4",
                vm_id, tenant_id, kind, self.owner,
            )
        )  # fmt: skip

    async def claim_in_doubt(self, tenant_id: str, *, others_only: bool = False) -> list[VmRecord]:
        """Take the tenant's operations in doubt that nobody works on: no owner, an expired
        lease, or (unless ``others_only``) this replica's own from before its actor started."""

        async def claim(con: Direct) -> list[VmRecord]:
            rows = await con.fetch(
                f"UPDATE vms SET owner = $2, fence = fence + 1, "
                f"lease_expires = now() + make_interval(secs => $4) "
                f"WHERE id IN (SELECT id FROM vms WHERE tenant = $1 "
                f"AND {IN_DOUBT} AND (owner IS NULL OR lease_expires < now() "
                f"OR (owner = $2 AND NOT $3)) FOR UPDATE SKIP LOCKED) RETURNING {VM_COLUMNS}",
                tenant_id, self.owner, others_only, LEASE_SECONDS,
            )  # fmt: skip
            return [vm_record(row) for row in rows]

        claimed = await self._call(lambda: self.db.atomic(claim))
        for vm in claimed:
            log.info("claimed %s of %s (in doubt, %s)", vm.id, tenant_id, vm.state)
        return claimed

    async def tenants_in_doubt(self) -> list[str]:
        rows = await self._call(
            lambda: self.db.fetch(
                f"SELECT DISTINCT tenant FROM vms WHERE {IN_DOUBT} "
                "AND (owner IS NULL OR lease_expires < now()) AND owner IS DISTINCT FROM $1",
                self.owner,
            )
        )  # fmt: skip
        return [row["tenant"] for row in rows]

    async def _renew_leases(self) -> None:
        """Keep this replica's operations in flight its own while it works on them."""
        while True:
            await trio.sleep(self.config.renew_interval)
            try:
                await self.db.execute(
                    "UPDATE vms SET lease_expires = now() + make_interval(secs => $2) "
                    f"WHERE owner = $1 AND {IN_DOUBT}",
                    self.owner, LEASE_SECONDS,
                )  # fmt: skip
            except StoreUnavailable as error:
                log.warning("could not renew leases: %s", error)

    # -- what the fleet says ------------------------------------------------------------------

    def tenants_with_vms(self) -> list[str]:
        """As last read (every ``with_vms_interval``), and only on the replica that
        sequences: one replica sweeps the fleet for all (every replica reads the states
        it records)."""
        return list(self._with_vms) if self.sequencer.leading else []

    async def record_fleet_states(self, tenant_id: str, states: Mapping[str, str]) -> int:
        settled = [(vm_id, state) for vm_id, state in states.items() if state in SETTLED_STATES]
        if not settled:
            return 0
        done = await self._call(
            lambda: self.db.execute(
                "UPDATE vms v SET state = s.state, settled_state = s.state "
                "FROM unnest($2::text[], $3::text[]) AS s (id, state) "
                "WHERE v.tenant = $1 AND v.id = s.id AND v.state <> s.state "
                "AND v.state IN ('pending', 'running', 'error')",
                tenant_id, [vm_id for vm_id, _ in settled], [state for _, state in settled],
            )
        )  # fmt: skip
        return int(done.rpartition(" ")[2] or 0)

    # -- the directory and the reads ----------------------------------------------------------

    @property
    def directory(self) -> Directory:
        return self._directory.directory

    async def vm(self, tenant_id: str, vm_id: str) -> Vm:
        row = await self._call(
            lambda: self.db.fetchrow(
                f"SELECT {VM_COLUMNS} FROM vms WHERE id = $1 AND tenant = $2", vm_id, tenant_id
            )
        )
        if row is None:
            raise NotFound("no such VM")
        return vm_view(vm_record(row))

    async def vms(
        self, tenant_id: str, after: str | None, limit: int
    ) -> tuple[list[Vm], str | None]:
        rows = await self._call(
            lambda: self.db.fetch(
                f"SELECT {VM_COLUMNS} FROM vms WHERE tenant = $1 AND ($2::text IS NULL OR id > $2)"
                " ORDER BY id LIMIT $3",
                tenant_id, after, limit + 1,
            )
        )  # fmt: skip
        page = [vm_view(vm_record(row)) for row in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    async def _tenant_row(self, tenant_id: str) -> tuple[Quota, Quota]:
        row = await self._call(
            lambda: self.db.fetchrow(
                "SELECT quota_vcpus, quota_memory_mib, quota_vms, allocated_vcpus, "
                "allocated_memory_mib, allocated_vms FROM tenants WHERE id = $1",
                tenant_id,
            )
        )
        if row is None:
            raise NotFound("no such tenant")
        return _quotas(row)

    async def usage(self, tenant_id: str) -> Usage:
        return Usage(tenant_id, *await self._tenant_row(tenant_id))

    async def tenant(self, tenant_id: str) -> Tenant:
        found = Tenant(tenant_id, *await self._tenant_row(tenant_id))
        if not self._directory.directory.exists(tenant_id):
            # created by another replica a moment ago: the directory learns it now rather
            # than at its next notification (the registry relies on that, see confirm)
            await self._call(lambda: self._directory.reread([tenant_id]))
        return found

    async def tenants(self, after: str | None, limit: int) -> tuple[list[Tenant], str | None]:
        rows = await self._call(
            lambda: self.db.fetch(
                "SELECT id, quota_vcpus, quota_memory_mib, quota_vms, allocated_vcpus, "
                "allocated_memory_mib, allocated_vms FROM tenants "
                "WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2",
                after, limit + 1,
            )
        )  # fmt: skip
        page = [Tenant(row["id"], *_quotas(row)) for row in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    def vms_by_state(self) -> dict[str, int]:
        return dict(self._by_state)

    # -- the journal ----------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        return self._head

    async def audit_page(self, after: int, limit: int) -> tuple[list[bytes], int, str]:
        async def page(con: Direct) -> tuple[list[bytes], int, str]:
            head = await con.fetchrow("SELECT seq, hash FROM audit_head")
            assert head is not None
            rows = await con.fetch(
                "SELECT line FROM audit_log WHERE seq > $1 AND seq <= $2 ORDER BY seq "
                "LIMIT $3",
                after, head["seq"], limit,
            )  # fmt: skip
            return [bytes(row["line"]) for row in rows], head["seq"], head["hash"]

        return await self._call(lambda: self.db.atomic(page, "repeatable_read"))

    def observe(self, observer: Observer) -> None:
        self._observers.append(observer)

    # -- the Merkle log (the same tree and heads on every replica: tree.py) ---------------------

    @property
    def log_key(self) -> Verifier:
        return self._log_signer.verifier

    async def _tree(self, body: Callable[[Direct], Awaitable[T]]) -> T:
        """``body`` on one connection (one crossing); a tree that lacks a node it should
        hold (damage) is an unavailability, as with the file store's tiles."""
        try:
            return await self._call(lambda: self.db.session(body))
        except TreeIncomplete as error:
            log.error("the Merkle tree cannot be read: %s", error)
            raise AuditUnavailable("the Merkle tree cannot be read") from None

    async def signed_head(self) -> SignedHead:
        """The database's head, signed by this replica with the shared key (every replica
        signs the same seq, hash and root; only ``ts`` and so the signatures differ)."""

        async def read(con: Direct) -> tuple[int, str, bytes | None]:
            head = await con.fetchrow("SELECT seq, hash FROM audit_head")
            assert head is not None
            signed = self._signed
            if signed is not None and signed.seq == head["seq"]:
                return head["seq"], head["hash"], None
            return head["seq"], head["hash"], await _root(con, head["seq"])

        seq, head, root = await self._tree(read)
        if root is None:
            assert self._signed is not None
            return self._signed
        signed = sign_head(self._log_signer, self._secrets.audit_key, seq, head, utc_now(), root)
        if self._signed is None or self._signed.seq < seq:
            self._signed = signed
        return signed

    async def inclusion_proof(
        self, seq: int, tree_size: int | None, *, tenant: str | None = None
    ) -> TreeProof:
        async def prove(con: Direct) -> TreeProof:
            current = await con.fetchval("SELECT seq FROM audit_head")
            size = current if tree_size is None else tree_size
            if size > current:
                raise InvalidRequest(f"tree_size {size} is beyond the current size {current}")
            if tenant is not None and not await con.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM audit_log WHERE seq = $1 AND tenant = $2 "
                f"AND seq >= ({OWN_SINCE.format(tenant='$2')}))",
                seq, tenant,
            ):  # fmt: skip
                raise NotFound("no such entry")
            if not 1 <= seq <= size:
                raise NotFound("no such entry")
            plan = inclusion_plan(seq - 1, size)
            return TreeProof(size, plan.assemble(await node_hashes(con, plan.nodes)))

        return await self._tree(prove)

    async def consistency_proof(self, old: int, new: int | None) -> TreeProof:
        async def prove(con: Direct) -> TreeProof:
            current = await con.fetchval("SELECT seq FROM audit_head")
            size = current if new is None else new
            if not 1 <= old <= size <= current:
                raise InvalidRequest(
                    f"a consistency proof needs 1 <= from <= to <= {current} (the current size)"
                )
            plan = consistency_plan(old, size)
            return TreeProof(size, plan.assemble(await node_hashes(con, plan.nodes)))

        return await self._tree(prove)

    async def trail(self, tenant: str, after: int, limit: int) -> tuple[list[bytes], int | None]:
        """One index range read (``audit_log (tenant, seq)``), from the tenant's latest
        creation on."""
        rows = await self._call(
            lambda: self.db.fetch(
                f"SELECT seq, line FROM audit_log WHERE tenant = $1 AND seq > $2 "
                f"AND seq >= ({OWN_SINCE.format(tenant='$1')}) ORDER BY seq LIMIT $3",
                tenant, after, limit + 1,
            )
        )  # fmt: skip
        page = rows[:limit]
        following = page[-1]["seq"] if len(rows) > limit else None
        return [bytes(row["line"]) for row in page], following

    async def _store_checkpoint(self) -> SignedHead | None:
        """Sign the head and store it in ``checkpoints`` (the leading sequencer's upkeep)."""
        signed = await self.signed_head()
        if signed.seq == 0:
            return None
        await self._call(
            lambda: self.db.execute(
                "INSERT INTO checkpoints (seq, hash, ts, signature, root, note) "
                "SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS "
                "(SELECT 1 FROM checkpoints WHERE seq >= $1)",
                signed.seq, signed.hash, signed.ts, signed.signature, signed.root, signed.note,
            )
        )  # fmt: skip
        self._latest_checkpoint = signed
        return signed

    async def _last_checkpoint(self) -> None:
        """At shutdown, after the actors drained: the replica that sequences stores a last
        checkpoint (bounded: a database that is away does not hold the shutdown up)."""
        if not self.sequencer.leading:
            return
        with trio.move_on_after(SHUTDOWN_CHECKPOINT):
            try:
                await self._store_checkpoint()
            except AuditUnavailable as error:
                log.error("no checkpoint at shutdown: %s", error)

    def journal_stats(self) -> JournalStats:
        latest = self._latest_checkpoint
        signed = None
        if latest is not None:
            signed = (latest.seq, dt.datetime.fromisoformat(latest.ts).timestamp())
        return JournalStats(self._head[0], self.acks.waiting, self.ready, checkpoint=signed)

    # -- secrets ----------------------------------------------------------------------------

    def admin_token_valid(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).digest()
        return hmac.compare_digest(digest, self._admin)

    @property
    def token_keys(self) -> PgKeyStorage:
        return self._keys

    async def _save_keys(self, keys: list[SigningKey]) -> None:
        await self._call(lambda: self.db.atomic(lambda con: save_token_keys(con, keys)))

    async def _follow_keys(self) -> None:
        """Reload the keyring when another replica changed it (notified, and every 5 s)."""
        while True:
            try:
                async with self.db.listen(KEYS_CHANNEL) as notifications:
                    while True:
                        keys = await self.db.atomic(load_token_keys)
                        self._keys._reloaded(keys)
                        with trio.move_on_after(5.0):
                            await notifications.wait()
            except StoreUnavailable as error:
                log.warning("keyring follower lost the database (%s); retrying", error)
                await trio.sleep(1.0)

    # -- upkeep and the replica's own loops -----------------------------------------------------

    async def upkeep(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checkpoint_loop)
            nursery.start_soon(self._housekeeping)
            nursery.start_soon(self._follow_tenants_with_vms)

    async def _checkpoint_loop(self) -> None:
        """The leading sequencer signs the head every interval or every N entries."""
        config = self.config
        signed_at = 0
        ticks = max(1, round(config.checkpoint_interval / CHECKPOINT_TICK))
        while True:
            for _ in range(ticks):
                await trio.sleep(CHECKPOINT_TICK)
                if self._head[0] >= signed_at + config.checkpoint_every:
                    break
            if not self.sequencer.leading or self._head[0] <= signed_at:
                continue
            try:
                checkpoint = await self._store_checkpoint()
            except AuditUnavailable as error:
                log.error("checkpoint failed (will retry): %s", error)
                await trio.sleep(1.0)
                continue
            if checkpoint is not None:
                signed_at = checkpoint.seq

    async def _housekeeping(self) -> None:
        """Counts for the metrics; old idempotency records and directory changes pruned.

        The count by state reads every VM row: every ``HOUSEKEEPING`` seconds, not per scrape.
        """
        while True:
            try:
                rows = await self.db.fetch("SELECT state, count(*) AS n FROM vms GROUP BY state")
                self._by_state = {row["state"]: row["n"] for row in rows}
                if self.sequencer.leading:
                    await self.db.execute(
                        "DELETE FROM heartbeats WHERE at < now() - interval '1 hour'"
                    )
                    cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)).strftime(
                        "%Y-%m-%dT%H:%M:%S.%fZ"
                    )
                    await self.db.execute(
                        "DELETE FROM idempotency WHERE status <> 0 AND created < $1", cutoff
                    )
                    await self._directory.prune()
            except StoreUnavailable as error:
                log.warning("housekeeping skipped: %s", error)
            await trio.sleep(HOUSEKEEPING)

    async def _follow_tenants_with_vms(self) -> None:
        """While this replica sequences: which tenants have VMs, for the fleet sweep."""
        while True:
            if self.sequencer.leading:
                try:
                    rows = await self.db.fetch("SELECT id FROM tenants WHERE allocated_vms > 0")
                    self._with_vms = [row["id"] for row in rows]
                except StoreUnavailable as error:
                    log.warning("could not read the tenants with VMs: %s", error)
            await trio.sleep(self.config.with_vms_interval)

    async def _probe(self) -> None:
        """Follow the database's health and the head, at least every ``probe_interval``."""
        while True:
            await trio.sleep(self.config.probe_interval)
            try:
                await self._probe_once()
            except StoreUnavailable:
                self._healthy = False

    async def _probe_once(self) -> None:
        """A write that commits (the replica's heartbeat), and the head: ready means the
        database takes writes, not only that it answers (a read-only or full one does)."""

        async def probe(con: Direct) -> Any:
            await con.execute(
                "INSERT INTO heartbeats (replica, at) VALUES ($1, now()) "
                "ON CONFLICT (replica) DO UPDATE SET at = now()",
                self.owner,
            )
            return await con.fetchrow("SELECT seq, hash FROM audit_head")

        row = await self.db.session(probe)
        assert row is not None
        if row["seq"] > self._head[0]:
            self._head = (row["seq"], row["hash"])
        self._healthy = True


#: the first seq of the tenant ``{tenant}``'s own entries (API.md "Proofs": from its latest
#: creation on; NULL, so nothing, for a tenant that does not exist or whose creation is
#: not in the chain yet)
OWN_SINCE = (
    "SELECT coalesce(t.created_seq, l.seq) FROM tenants t "
    "LEFT JOIN audit_log l ON l.qid = t.created_qid WHERE t.id = {tenant}"
)


async def _root(con: Queries, size: int) -> bytes:
    """The root of the stored tree of ``size`` leaves (its complete subtrees, one query)."""
    if size == 0:
        return EMPTY_ROOT
    return merkle_fold(await node_hashes(con, range_nodes(0, size)))


#: the tenant and token changes, each made under the tenant's row lock
DIRECTORY_OPS: dict[str, Callable[[PostgresStore, Queries, Entry], Awaitable[None]]] = {
    "tenant.delete": PostgresStore._delete_tenant,
    "token.issue": PostgresStore._issue_token,
    "token.revoke": PostgresStore._revoke_token,
}


def _quotas(row: Any) -> tuple[Quota, Quota]:
    quota = Quota(row["quota_vcpus"], row["quota_memory_mib"], row["quota_vms"])
    allocated = Quota(row["allocated_vcpus"], row["allocated_memory_mib"], row["allocated_vms"])
    return quota, allocated


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / "admin.token"


async def _bootstrap(config: PostgresStoreConfig, db: Database) -> Secrets:
    try:
        loaded, made = await bootstrap(db)
    except StoreUnavailable as error:
        raise StartupError(f"cannot start on {_where(config.dsn)}: {error}") from None
    except (SchemaError, ValueError) as error:
        raise StartupError(f"cannot start on {_where(config.dsn)}: {error}") from None
    if made is not None:
        path = admin_token_path(config.data_dir)
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if await trio.to_thread.run_sync(create_private, path, (made + "\n").encode()):
            log.info("created the log in the database; the operator's token is in %s", path)
        else:
            log.error(
                "created the log in the database, but %s exists already and is not "
                "overwritten: the new operator's token was not written anywhere",
                path,
            )
    return loaded


def _where(dsn: str) -> str:
    """The DSN without a password, for messages."""
    head, at, tail = dsn.rpartition("@")
    if not at:
        return dsn
    scheme, sep, user = head.partition("://")
    return f"{scheme}{sep}{user.partition(':')[0]}@{tail}"


@asynccontextmanager
async def open_postgres_store(
    config: PostgresStoreConfig, metrics: Metrics | None = None
) -> AsyncIterator[PostgresStore]:
    """Bootstrap (or join) the database and run the replica's store until the context exits.

    A database that cannot be reached at start, or holds something else, is a
    :class:`~actors.errors.StartupError`.
    """
    settings = DatabaseSettings(config.dsn, pool_size=config.pool_size)
    async with open_database(settings) as db:
        secrets_ = await _bootstrap(config, db)
        store = PostgresStore(config, db, secrets_)
        try:
            await store._directory.load()
            await store._probe_once()
        except StoreUnavailable as error:
            raise StartupError(f"cannot start on {_where(config.dsn)}: {error}") from None
        async with trio.open_nursery() as nursery:
            await nursery.start(store.acks.run)
            nursery.start_soon(store.sequencer.run)
            nursery.start_soon(store._directory.run)
            nursery.start_soon(store._follow_keys)
            nursery.start_soon(store._renew_leases)
            nursery.start_soon(store._probe)
            try:
                yield store
            finally:
                with trio.CancelScope(shield=True):
                    await store._last_checkpoint()
                nursery.cancel_scope.cancel()
