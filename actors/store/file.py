"""The file store: one process, the state in memory, everything durable under the data dir.

What lies where (API.md, "Data directory"): the journal in ``audit/`` (the audit writer's
segments, ``actors/journal/``), its Merkle tree in ``tree/`` (tiles, derived from the
journal), signed checkpoints in ``audit-checkpoints.jsonl`` with their key in
``keys/audit-ed25519.key`` and the log's origin in ``keys/audit-origin``, the
token-signing keyring in ``keys/token-signing.keyring.json``, the operator's token in
``admin.token``, and snapshots in ``snapshot/``.

The state is the fold of the log (``actors/journal/fold.py``) and changes nowhere else:
:meth:`FileStore.decide` runs a tenant's decision against its state and applies the
fold of a reserving entry at once, in the deciding turn; the audit writer's observers
apply every other entry once it is durable, in chain order, and take back a reserving
entry that could not be made durable. All of it runs on the event loop's thread and
none of it awaits, so a decision and its reservation are one atomic step, and a read
sees the state between two such steps.

:func:`open_file_store` recovers the state (snapshot plus a verified replay of the log
after it) and runs the audit writer until the context ends; then it writes a last
checkpoint and a last snapshot. :meth:`FileStore.upkeep` does the periodic work.
"""

from __future__ import annotations

import datetime as dt
import hmac
import itertools
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from actors.errors import AuditUnavailable, InvalidRequest, NotFound, StartupError
from actors.fsutil import atomic_write, create_private, fsync_dir
from actors.journal import fold, merkle, refold, snapshot
from actors.journal.chain import ChainBroken
from actors.journal.checkpoint import CheckpointSigner, SignedHead
from actors.journal.entries import Entry, utc_now
from actors.journal.note import Verifier
from actors.journal.reader import AuditReader
from actors.journal.tiles import TileDamaged, TreeView
from actors.journal.trail import TrailIndex, scan_trails
from actors.journal.tree import LogTree
from actors.journal.writer import AuditTicket, AuditWriter
from actors.metrics import Metrics
from actors.state import (
    IN_DOUBT_STATES,
    SETTLED_STATES,
    Directory,
    ProxyState,
    TenantSlice,
    TenantState,
    VmRecord,
)
from actors.store import Decided, JournalStats, Observer, SigningKey, TreeProof
from actors.views import Tenant, Usage, Vm, find_vm, tenant_view, usage_view, vm_page

log = logging.getLogger("vm_tenant.store")

D = TypeVar("D", bound=Decided)
T = TypeVar("T")

#: VMs recorded from a fleet sweep between two yields to the event loop
SYNC_SLICE = 1024

KEYRING_FILE = "token-signing.keyring.json"
LEGACY_KEY_FILE = "token-signing.key"
KEYRING_VERSION = 1


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / "admin.token"


@dataclass(frozen=True, slots=True)
class FileStoreConfig:
    """Where the data dir is, and how often the upkeep runs."""

    data_dir: Path
    snapshot_interval: float = 60.0
    checkpoint_interval: float = 10.0
    #: a checkpoint also after this many entries
    checkpoint_every: int = 1000
    #: audit file work on the event loop thread (tests under Trio's virtual clock only)
    inline_io: bool = False


# -- secrets -------------------------------------------------------------------------------


def read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """A secret file's content, creating the file (mode 0600) first if it does not exist.

    An existing file is only read, never rewritten.
    """
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_private(path, (make() + "\n").encode())
    return path.read_text().strip()


class _KeyringFile(msgspec.Struct):
    version: int
    keys: list[SigningKey]


class FileKeyStorage:
    """The keyring in ``<data-dir>/keys/token-signing.keyring.json``, replaced atomically.

    A data dir from before the keyring holds a single ``token-signing.key``: loading makes
    it the first key of a keyring, and removes the old file once that keyring is durable.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self.path = keys_dir / KEYRING_FILE

    def load(self) -> list[SigningKey] | None:
        legacy = self.keys_dir / LEGACY_KEY_FILE
        keys: list[SigningKey]
        if self.path.exists():
            try:
                stored = msgspec.json.decode(self.path.read_bytes(), type=_KeyringFile)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as error:
                raise ValueError(f"{self.path}: unreadable keyring: {error}") from None
            if stored.version != KEYRING_VERSION:
                raise ValueError(f"{self.path}: unknown keyring version {stored.version}")
            keys = stored.keys
        elif legacy.exists():
            created = dt.datetime.fromtimestamp(int(time.time()), dt.UTC)
            key = SigningKey(
                id=f"key-{secrets.token_hex(6)}",
                created_at=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                state="active",
                secret=legacy.read_text().strip(),
            )
            keys = [key]
            self.save(keys)
            log.info("migrated %s into the keyring as %s", legacy, key.id)
        else:
            return None
        if legacy.exists():
            # The keyring holds that secret now (durably); a retired key must not linger.
            legacy.unlink()
            fsync_dir(self.keys_dir)
        return keys

    def save(self, keys: list[SigningKey]) -> None:
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, msgspec.json.encode(_KeyringFile(KEYRING_VERSION, keys)))

    def watch(self, changed: Callable[[list[SigningKey]], None]) -> None:
        """Nothing else changes the keyring of a data dir (one server holds it)."""


# -- the store -------------------------------------------------------------------------------


class FileStore:
    """The state of one data dir: the fold of its durable log plus the reservations."""

    #: one process owns every operation: its actors claim theirs when they start
    claim_interval: float | None = None

    def __init__(
        self,
        config: FileStoreConfig,
        replayed: snapshot.Replayed,
        writer: AuditWriter,
        signer: CheckpointSigner,
        admin_token: str,
        tree: LogTree | None = None,
    ) -> None:
        self.config = config
        self.state: ProxyState = replayed.state
        self.writer = writer
        self.checkpoints = signer
        self.tree = tree
        #: tenant -> seqs of its own entries; the entries before the writer's first batch
        #: are added by a pass over the log in the upkeep
        self.trails = TrailIndex(ready=writer.seq == 0)
        self._started_at = writer.seq
        #: the newest head signed on demand (or stored), re-used while the head stays
        self._signed: SignedHead | None = None
        #: the anchor of the snapshot on disk
        self.snapshot_anchor = replayed.anchor
        self._recovered_anchor = replayed.anchor
        self._recovered_digest = replayed.snapshot.digest
        self._admin = admin_token.encode()
        self._keys = FileKeyStorage(config.data_dir / "keys")
        self._reader = AuditReader(config.data_dir / "audit")
        writer.observe_durable(self._durable)
        writer.observe_lost(self._lost)

    @property
    def ready(self) -> bool:
        return self.writer.healthy

    # -- the tenants' writes ------------------------------------------------------------------

    async def decide(
        self,
        tenant_id: str,
        decide: Callable[[TenantSlice], D],
        *,
        vm_id: str | None = None,
        key: str | None = None,
    ) -> tuple[D, AuditTicket | None]:
        """Run ``decide`` on the tenant's state; write its entry, reserving what it reserves.

        The whole state is in memory, so ``vm_id`` and ``key`` need no loading here.
        """
        tenant = self._tenant(tenant_id)
        decision = decide(tenant)
        entry = decision.entry
        if entry is None:
            return decision, None
        if not fold.reserves(entry):
            return decision, self.writer.append(entry)
        fold.apply_to_tenant(tenant, entry)
        try:
            ticket = self.writer.append(entry)
        except AuditUnavailable:
            fold.undo(tenant, entry)  # not even queued: nothing was reserved after all
            raise
        return decision, ticket

    def record(self, entry: Entry) -> AuditTicket:
        assert not fold.reserves(entry), "a reserving entry is written by decide()"
        return self.writer.append(entry)

    async def mark_in_doubt(self, tenant_id: str, vm_id: str, kind: str) -> None:
        tenant = self.state.tenants.get(tenant_id)
        if tenant is not None:
            tenant.set_vm_state(vm_id, "unknown", doubt=kind)

    async def claim_in_doubt(self, tenant_id: str, *, others_only: bool = False) -> list[VmRecord]:
        tenant = self.state.tenants.get(tenant_id)
        if tenant is None:
            return []
        return [
            msgspec.structs.replace(vm) for vm in tenant.vms.values() if vm.state in IN_DOUBT_STATES
        ]

    async def tenants_in_doubt(self) -> list[str]:
        return [
            tenant.id
            for tenant in self.state.tenants.values()
            if any(vm.state in IN_DOUBT_STATES for vm in tenant.vms.values())
        ]

    # -- what the fleet says ------------------------------------------------------------------

    def tenants_with_vms(self) -> list[str]:
        return [tenant.id for tenant in self.state.tenants.values() if tenant.vms]

    async def record_fleet_states(self, tenant_id: str, states: Mapping[str, str]) -> int:
        tenant = self.state.tenants.get(tenant_id)
        if tenant is None:
            return 0
        changed = 0
        for done, (vm_id, state) in enumerate(states.items(), start=1):
            vm = tenant.vms.get(vm_id)
            # a VM not settled belongs to the operation in flight on it
            if (
                vm is not None
                and vm.state in SETTLED_STATES
                and state in SETTLED_STATES
                and vm.state != state
            ):
                tenant.set_vm_state(vm_id, sys.intern(state), settled=True)
                changed += 1
            if done % SYNC_SLICE == 0:
                # A tenant may have 100,000 VMs: let requests run between slices. Each VM
                # is checked and changed in one step, so an operation that begins in
                # between is seen.
                await trio.lowlevel.checkpoint()
        return changed

    # -- the directory and the reads: views taken between two changes ------------------------

    @property
    def directory(self) -> Directory:
        return self.state.directory

    def _tenant(self, tenant_id: str) -> TenantState:
        tenant = self.state.tenants.get(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        return tenant

    async def vm(self, tenant_id: str, vm_id: str) -> Vm:
        return find_vm(self._tenant(tenant_id), vm_id)

    async def vms(
        self, tenant_id: str, after: str | None, limit: int
    ) -> tuple[list[Vm], str | None]:
        return vm_page(self._tenant(tenant_id), after, limit)

    async def usage(self, tenant_id: str) -> Usage:
        return usage_view(self._tenant(tenant_id))

    async def tenant(self, tenant_id: str) -> Tenant:
        return tenant_view(self._tenant(tenant_id))

    async def tenants(self, after: str | None, limit: int) -> tuple[list[Tenant], str | None]:
        tenants = self.state.tenants
        following = tenants.irange(minimum=after, inclusive=(False, True))
        ids = list(itertools.islice(following, limit + 1))
        page = [tenant_view(tenants[tenant_id]) for tenant_id in ids[:limit]]
        return page, (ids[limit - 1] if len(ids) > limit else None)

    def vms_by_state(self) -> dict[str, int]:
        by_state: dict[str, int] = {}
        for tenant in self.state.tenants.values():
            for vm in tenant.vms.values():
                by_state[vm.state] = by_state.get(vm.state, 0) + 1
        return by_state

    # -- the journal ----------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        return self.writer.seq, self.writer.head

    async def audit_page(self, after: int, limit: int) -> tuple[list[bytes], int, str]:
        seq, head = self.writer.seq, self.writer.head
        lines = await trio.to_thread.run_sync(self._reader.read, after, limit, seq)
        return lines, seq, head

    def observe(self, observer: Observer) -> None:
        self.writer.observe_durable(observer)

    # -- the Merkle log ------------------------------------------------------------------------

    @property
    def log_key(self) -> Verifier:
        return self.checkpoints.verifier

    def _view_for(self, size: int) -> TreeView:
        """A view of the tree that answers for every size up to ``size``."""
        view = self.writer.tree_view
        if view is None or view.size < size:
            # behind: the tree may have caught up since the writer's last batch
            view = self.tree.view() if self.tree is not None else None
        if view is None or view.size < size:
            raise AuditUnavailable("the Merkle tree is behind the log; it is being rebuilt")
        return view

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking file work in a worker thread (inline for virtual-clock tests)."""
        if self.config.inline_io:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def _in_tree(self, fn: Callable[..., list[bytes]], *args: Any) -> list[bytes]:
        """Run a proof (or root) computation over a view in a worker thread."""
        try:
            return await self._blocking(fn, *args)
        except TileDamaged as error:
            log.error("the Merkle tree cannot be read: %s", error)
            raise AuditUnavailable("the Merkle tree cannot be read") from None

    async def signed_head(self) -> SignedHead:
        seq, head = self.writer.seq, self.writer.head
        signed = self._signed
        if signed is not None and signed.seq == seq:
            return signed
        view = self._view_for(seq)
        if view.size == seq:
            root = view.root()
        else:
            root = (await self._in_tree(lambda: [merkle.root(view, seq)]))[0]
        signed = self.checkpoints.sign(seq, head, utc_now(), root)
        if self._signed is None or self._signed.seq < seq:
            self._signed = signed
        return signed

    async def inclusion_proof(
        self, seq: int, tree_size: int | None, *, tenant: str | None = None
    ) -> TreeProof:
        current = self.writer.seq
        size = current if tree_size is None else tree_size
        if size > current:
            raise InvalidRequest(f"tree_size {size} is beyond the current size {current}")
        if tenant is not None:
            if not self.trails.ready:
                raise AuditUnavailable("the audit index is being rebuilt after a start")
            if not self.trails.owns(tenant, seq):
                raise NotFound("no such entry")
        if not 1 <= seq <= size:
            raise NotFound("no such entry")
        view = self._view_for(size)
        hashes = await self._in_tree(merkle.inclusion_proof, view, seq - 1, size)
        return TreeProof(size, hashes)

    async def consistency_proof(self, old: int, new: int | None) -> TreeProof:
        current = self.writer.seq
        size = current if new is None else new
        if not 1 <= old <= size <= current:
            raise InvalidRequest(
                f"a consistency proof needs 1 <= from <= to <= {current} (the current size)"
            )
        view = self._view_for(size)
        hashes = await self._in_tree(merkle.consistency_proof, view, old, size)
        return TreeProof(size, hashes)

    async def trail(self, tenant: str, after: int, limit: int) -> tuple[list[bytes], int | None]:
        if not self.trails.ready:
            raise AuditUnavailable("the audit index is being rebuilt after a start")
        seqs, following = self.trails.page(tenant, after, limit)
        upto = self.writer.seq
        lines = await self._blocking(self._reader.read_seqs, seqs, upto)
        return lines, following

    def journal_stats(self) -> JournalStats:
        writer = self.writer
        return JournalStats(
            writer.seq,
            writer.queue_depth,
            writer.healthy,
            checkpoint=self._last_checkpoint(),
            snapshot=self._last_snapshot(),
        )

    def _last_checkpoint(self) -> tuple[int, float] | None:
        latest = self.checkpoints.latest
        if latest is None:
            return None
        return latest["seq"], dt.datetime.fromisoformat(latest["ts"]).timestamp()

    def _last_snapshot(self) -> tuple[int, float] | None:
        try:
            written = snapshot.snapshot_path(self.config.data_dir).stat().st_mtime
        except OSError:
            return None
        return self.snapshot_anchor.seq, written

    # -- secrets ----------------------------------------------------------------------------

    def admin_token_valid(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._admin)

    @property
    def token_keys(self) -> FileKeyStorage:
        return self._keys

    # -- the writer's observers: the fold in chain order, and the undo ------------------------

    def _durable(self, entries: list[Entry]) -> None:
        self.trails.add(entries)
        state = self.state
        for entry in entries:
            try:
                if not fold.reserves(entry):
                    fold.apply(state, entry)
                elif fold.remembers_key(entry) and (tenant := state.tenants.get(entry["tenant"])):
                    fold.expire(tenant, entry)  # its reservation was folded in when drafted
            except Exception:
                # A bug: the state no longer is the fold of the log; a restart
                # (which replays the log) repairs it. The batch itself is durable.
                log.exception("folding durable entry %s failed", entry.get("seq"))

    def _lost(self, drafts: list[Entry]) -> None:
        tenants = self.state.tenants
        for entry in reversed(drafts):
            if fold.reserves(entry) and (tenant := tenants.get(entry["tenant"])) is not None:
                fold.undo(tenant, entry)

    # -- upkeep: checkpoints, snapshots, the check of the older log ----------------------------

    async def upkeep(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._check_snapshot)
            nursery.start_soon(self._index_trails)
            nursery.start_soon(self._snapshot_loop)
            nursery.start_soon(self._checkpoint_loop)

    async def write_checkpoint(self) -> None:
        """Make the tree durable, then sign the head and store the checkpoint, unless the
        latest stored checkpoint already covers the head."""
        latest = self.checkpoints.latest
        seq = self.writer.seq
        if seq == 0 or (latest is not None and latest["seq"] == seq and "note" in latest):
            return
        if self.tree is not None:
            try:
                await self._blocking(self.tree.sync)
            except (OSError, TileDamaged) as error:
                # The tree is derived from the log: a checkpoint does not wait for it.
                log.error("the Merkle tree could not be synced: %s", error)
        try:
            head = await self.signed_head()
        except AuditUnavailable as error:
            raise OSError(f"no checkpoint: {error}") from None
        await self._blocking(self.checkpoints.append, head)

    async def _index_trails(self) -> None:
        """Add the entries that were in the log at start to the tenants' trail index."""
        if self.trails.ready:
            return
        audit_dir = self.config.data_dir / "audit"
        older = await trio.to_thread.run_sync(
            scan_trails, audit_dir, self._started_at, abandon_on_cancel=True
        )
        self.trails.merge(older)
        log.debug("audit trail index ready (%d entries)", self.trails.entries())

    async def write_snapshot(self) -> snapshot.Anchor:
        """Compact the durable log into a new, sealed snapshot (in a worker thread)."""
        upto = self.writer.seq
        self.snapshot_anchor = await trio.to_thread.run_sync(
            snapshot.compact, self.config.data_dir, upto, self.checkpoints
        )
        return self.snapshot_anchor

    async def _check_snapshot(self) -> None:
        """Verify the chain up to the snapshot's anchor and the snapshot against its fold;
        damage in either stops all writes."""
        check = partial(
            refold.check_snapshot,
            self.config.data_dir,
            self._recovered_anchor,
            self._recovered_digest,
        )
        if self.config.inline_io:
            report = check()
        else:
            report = await trio.to_thread.run_sync(check, abandon_on_cancel=True)
        if not report.intact:
            self.writer.mark_damaged(
                f"audit chain {report.verdict} at seq {report.bad_seq}: {report.reason}"
            )

    async def _snapshot_loop(self) -> None:
        while True:
            await trio.sleep(self.config.snapshot_interval)
            if self.writer.seq > self.snapshot_anchor.seq:
                try:
                    await self.write_snapshot()
                except snapshot.SnapshotDamaged as damage:
                    self.writer.mark_damaged(str(damage))
                    return
                except (OSError, ChainBroken, snapshot.SnapshotError) as error:
                    log.error("snapshot failed (will retry): %s", error)

    async def _checkpoint_loop(self) -> None:
        """Sign the head every ``checkpoint_interval`` s, or every ``checkpoint_every`` entries."""
        config = self.config
        while True:
            latest = self.checkpoints.latest
            since = latest["seq"] if latest is not None else 0
            with trio.move_on_after(config.checkpoint_interval):
                await self.writer.wait_durable(since + config.checkpoint_every)
            try:
                if not self.writer.healthy:
                    raise OSError("the audit log is not healthy")
                await self.write_checkpoint()
            except OSError as error:
                log.error("checkpoint failed (will retry): %s", error)
                # not in a tight loop: the entry-count trigger is still past due
                await trio.sleep(min(1.0, config.checkpoint_interval))

    async def _final_upkeep(self) -> None:
        """After the writer flushed: a last checkpoint and a last snapshot."""
        if not self.writer.healthy:
            log.error("audit log unhealthy at shutdown; no final checkpoint or snapshot")
            return
        # Apart: a checkpoint that cannot be signed (the tree behind) must not cost the
        # snapshot, or the next start replays everything since the last one.
        try:
            await self.write_checkpoint()
        except OSError as error:
            log.error("final checkpoint failed: %s", error)
        try:
            anchor = await self.write_snapshot()
        except (OSError, ChainBroken, snapshot.SnapshotError) as error:
            log.error("final snapshot failed: %s", error)
            return
        log.info("stopped; snapshot at seq %d", anchor.seq)


def _new_admin_token() -> str:
    return "adm-" + secrets.token_urlsafe(32)


@asynccontextmanager
async def open_file_store(
    config: FileStoreConfig, metrics: Metrics | None = None
) -> AsyncIterator[FileStore]:
    """Recover the data dir and keep its journal open until the context exits.

    On exit the audit writer writes what is queued, then a last checkpoint and a last
    snapshot are written. Damage in the replayed part of the log, or a snapshot whose
    anchor is gone, is a :class:`~actors.errors.StartupError`.
    """
    data_dir = config.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (data_dir / "audit").mkdir(mode=0o700, exist_ok=True)
    signer = await trio.to_thread.run_sync(CheckpointSigner, data_dir)
    key = signer.public_key
    try:
        replayed = await trio.to_thread.run_sync(
            lambda: snapshot.replay(data_dir, key=key, cut_torn=True)
        )
    except (ChainBroken, snapshot.SnapshotError) as error:
        raise StartupError(f"cannot start on {data_dir}: {error}") from error
    if replayed.torn_cut:
        log.warning("cut an incomplete last audit line (it was never acknowledged)")
    if replayed.snapshot.legacy:
        log.info("snapshot/state.json predates sealed snapshots: replayed the whole log")
    head = replayed.head
    tree = LogTree(data_dir / "tree", data_dir / "audit")
    try:
        # (an OSError, a full disk, is reported by the start-up like any other)
        await trio.to_thread.run_sync(tree.open, head.seq)
    except ValueError as error:
        raise StartupError(f"cannot start on {data_dir}: the Merkle tree: {error}") from error
    writer = AuditWriter(
        data_dir / "audit",
        head.seq,
        head.hash,
        inline_io=config.inline_io,
        metrics=metrics,
        tree=tree,
    )
    if replayed.snapshot.damage is not None:
        # Not served from: the state is the fold of the whole log. But someone changed
        # what this process wrote, so nothing more is written until an operator looks.
        writer.mark_damaged(
            f"{replayed.snapshot.damage}; the state was rebuilt from the log instead"
        )
    admin = await trio.to_thread.run_sync(
        read_or_create_secret, admin_token_path(data_dir), _new_admin_token
    )
    store = FileStore(config, replayed, writer, signer, admin, tree)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        try:
            yield store
        finally:
            writer.close()
    with trio.CancelScope(shield=True):
        await store._final_upkeep()
