"""The store boundary: everything durable, behind one small interface.

The tenant actors, the registry, the fleet client and the HTTP edge talk to durable
storage only through :class:`Store`; none of them knows which store runs. Two are meant
to implement it: the **file store** (``actors/store/file.py``, the embedded default: the
data dir of API.md, one process) and a **PostgreSQL store** (replicas sharing one
database, DESIGN.md "Beyond one machine"). Below, for each method: what it promises,
and how each store keeps the promise.

**Deciding.** :meth:`Store.decide` runs a tenant's decision (a pure function of the
tenant's state and the command, ``actors/tenants/decisions.py``) and makes its entry
durable, with the fold (``actors/journal/fold.py``) as the only code that changes state.

- file: in the calling actor's turn, without awaiting: the decision reads the tenant's
  state in memory; a reserving entry (a ``requested`` operation, a refusal that takes an
  ``Idempotency-Key``) is folded in at once, so the tenant's next decision sees it, and
  the entry goes to the audit writer's group commit; if it is not made durable, the
  fold is undone (:func:`~actors.journal.fold.undo`) before the ticket fails.
- postgresql: one statement loads the slice the decision names (``vm_id``, ``key``: the
  quota, allocation and version, that VM row, that idempotency row) as a
  :class:`~actors.state.TenantSlice` whose mutators record the rows the fold changes;
  the same decision and the same fold run on it; one more statement writes those rows
  and queues the entry behind a compare-and-set of the tenant's version, and a decision
  whose tenant changed meanwhile is made again. The gate across replicas is that
  compare-and-set (it holds the tenant's row lock while it writes); the actor still
  serialises the tenant's commands on its replica. Nothing to undo: a write that did not
  happen changed nothing.

**Acknowledged** means *in the chain* (sequenced), in both stores: a :class:`Ticket`'s
:meth:`~Ticket.wait` returns the stored entry (with its ``seq`` and ``hash``) only then,
and raises :class:`~actors.errors.AuditUnavailable` only when the entry is not and will
never be in the chain (file: the batch was cut back; postgresql: the transaction did not
commit). The caller's deadline bounds the wait: a store that cannot yet tell (the
sequencer is away) keeps waiting, and the operation stays reserved, for its reconciler.

**Reads** answer from the store, so a replica reads its own and every other replica's
acknowledged writes. They return immutable views (``actors/views.py``).

- file: the state in memory, directly (no mailbox hop: the methods never await).
- postgresql: one query each.

**The directory** of tenants and their token ids is synchronous, because the edge checks
a token on every request without awaiting.

- file: kept by the fold, so a revocation takes effect with its entry.
- postgresql: a cache of the ``tokens`` table refreshed on NOTIFY and polled at least
  every 0.5 s: a revocation reaches every replica within a second.

**Operations in doubt** (a VM in ``spawning``, ``destroying`` or ``unknown``) are
claimed by one worker at a time.

- file: one process, so every such VM of a tenant belongs to the tenant's actor: it
  claims them when it starts (after a crash, or after a failed actor was replaced), and
  the registry starts the actors of :meth:`Store.tenants_in_doubt` when it starts.
- postgresql: a row carries its owner replica and a lease (renewed while the operation
  runs). A claim takes only rows whose lease expired (``FOR UPDATE SKIP LOCKED``, with a
  fencing counter); an outcome is written only while its writer still holds the lease,
  and a late writer's ticket returns the entry of whoever settled the operation instead.
  Every :attr:`Store.claim_interval` seconds the registry asks
  :meth:`Store.tenants_in_doubt` for tenants with operations nobody owns (their owner's
  lease expired: it died, or lost the database for longer than a lease) and has their
  actors claim them (``others_only``: this replica's own jobs still run theirs). A late
  writer's ticket returns its own draft, unsequenced: nothing is written for it, the
  claimer's resolution stands.

**The journal** (append, read, head, checkpoints, verify), the signing keys (the
keyring's storage), the admin token, and the checkpoint key live behind the boundary.
Snapshots are the file store's own business (the database's tables are its fold).

**The Merkle log** (API.md v1.1 "Proofs", ``docs/proofs.md``): the chain is also an RFC
9162 tree whose leaf ``i`` is the stored line of seq ``i + 1``. Its size is always the
number of acknowledged entries: a store appends the leaves of a batch before any of the
batch's tickets returns, so every proof and checkpoint covers every acknowledged write.

- file: the audit writer appends the leaf hashes to the tiles under ``<data-dir>/tree/``
  in its batch, right after the fsync of the lines (``actors/journal/tiles.py``); the
  tree is derived from the log and rebuilt from it after a crash. The key is the
  checkpoint key (``keys/audit-ed25519.key``) and the origin ``keys/audit-origin``, both
  created once and never rewritten.
- postgresql: the sequencer inserts the leaves (and the tiles or nodes above them) in
  the transaction that assigns the batch's seqs, so tree and chain commit together; the
  key is the ``audit`` row of ``signing_keys`` and the origin is ``log_meta.origin``.
  A proof reads the nodes its plan names in one query (``docs/proofs.md``, PostgreSQL).

A tenant's *own* entries are those whose ``tenant`` is its id, from its latest
``tenant.create`` on: a tenant provisioned again under an id that was deleted does not
see its predecessor's entries (file: the trail index starts afresh at each creation;
postgresql: ``WHERE tenant = $1 AND seq >= <the seq of its tenant.create>``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, Protocol, TypeVar

import msgspec

from actors.journal.checkpoint import SignedHead
from actors.journal.entries import Entry
from actors.journal.note import Verifier
from actors.state import Directory, TenantSlice, VmRecord
from actors.views import Tenant, Usage, Vm


class Ticket(Protocol):
    """The promise of one written entry."""

    async def wait(self) -> Entry:
        """The entry as stored, once it is in the chain; ``AuditUnavailable`` if it never
        will be."""
        ...


class Decided(Protocol):
    """A decision (``actors/tenants/decisions.py``): the store needs only its entry."""

    @property
    def entry(self) -> Entry | None: ...


D = TypeVar("D", bound=Decided)

#: called with the entries of a batch once they are in the chain, in chain order
Observer = Callable[[list[Entry]], None]


class TreeProof(msgspec.Struct, frozen=True):
    """An RFC 9162 inclusion or consistency proof, and the size of the tree it is in."""

    tree_size: int
    #: the proof's hashes (32 bytes each), in RFC 9162 order
    hashes: list[bytes]


class SigningKey(msgspec.Struct):
    """One key of the token-signing keyring: ``secret`` is None once it is retired."""

    id: str
    created_at: str
    state: Literal["active", "retired"]
    secret: str | None
    retired_at: str | None = None


class KeyStorage(Protocol):
    """Where the token-signing keyring is kept (``server/keyring.py`` owns its rules).

    file: ``<data-dir>/keys/token-signing.keyring.json`` (0600), replaced atomically;
    postgresql: the ``signing_keys`` rows of purpose ``token``, replaced in one
    transaction.
    """

    def load(self) -> list[SigningKey] | None:
        """The stored keys, oldest first; None when there is no keyring yet."""
        ...

    def save(self, keys: list[SigningKey]) -> None:
        """Replace the stored keys, durably (blocking: call it from a worker thread)."""
        ...

    def watch(self, changed: Callable[[list[SigningKey]], None]) -> None:
        """Call ``changed`` with the keys when someone else changed them (another replica)."""
        ...


class Store(Protocol):
    """Durable storage of one service: state, journal, keys (see the module docstring)."""

    # -- health and lifetime ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """State recovered and the journal takes writes (``/readyz``, API.md v1.1).

        False from a write that failed until a write succeeds again, and for good once
        the journal or the state is found damaged. "Succeeds" means a write of the kind
        that failed, not a cheaper stand-in: it must turn True again without traffic.

        - file: a batch that could not be made durable; cutting the segment back needs no
          free space and proves nothing, so the writer probes every second (a page
          written past the durable end, fsynced, cut off again) until one succeeds.
        - postgresql: a transaction that did not commit (the database unreachable, a full
          disk, a read-only replica); the store then probes on its own, at least every
          second, with a transaction that writes (e.g. updates a heartbeat row) and
          commits, and is ready again once one commits.
        """
        ...

    async def upkeep(self) -> None:
        """Background work while the service serves (snapshots, checkpoints, checks).

        Runs until cancelled, which happens before the actors drain; what must run to
        the end (a writer, a sequencer) belongs to the context that opened the store.
        """
        ...

    # -- the tenants' writes ------------------------------------------------------------------

    async def decide(
        self,
        tenant_id: str,
        decide: Callable[[TenantSlice], D],
        *,
        vm_id: str | None = None,
        key: str | None = None,
    ) -> tuple[D, Ticket | None]:
        """Run ``decide`` on the tenant's state and write the decision's entry.

        ``vm_id`` and ``key`` name the VM and the idempotency key the decision may read
        (a store that loads a slice loads those). Returns the decision and the ticket of
        its entry (None when it wrote nothing). ``NotFound`` for an unknown tenant,
        ``AuditUnavailable`` when the entry cannot even be queued: then nothing changed.
        """
        ...

    def record(self, entry: Entry) -> Ticket:
        """Write an entry that takes effect once durable: an operation's outcome, a tenant
        or token change. The fold applies it in chain order; ``AuditUnavailable`` when it
        cannot be queued."""
        ...

    async def mark_in_doubt(self, tenant_id: str, vm_id: str, kind: str) -> None:
        """The fleet's answer was lost: the VM is ``unknown`` until its operation (``kind``:
        spawn or destroy) is reconciled. Not audited (nothing happened yet)."""
        ...

    async def claim_in_doubt(self, tenant_id: str, *, others_only: bool = False) -> list[VmRecord]:
        """The tenant's VMs in doubt that no worker owns, now owned by the caller (copies).

        A tenant actor claims them when it starts; ``others_only`` (the periodic look) leaves
        the operations this process's jobs work on alone.
        """
        ...

    async def tenants_in_doubt(self) -> list[str]:
        """Tenants that have operations in doubt no worker owns."""
        ...

    #: how often the registry looks for operations whose owner went away (None: never;
    #: one process owns everything, so its actors claim at start)
    claim_interval: float | None

    # -- what the fleet says -----------------------------------------------------------------

    def tenants_with_vms(self) -> list[str]:
        """Tenants that have at least one VM (whose state the fleet may report)."""
        ...

    async def record_fleet_states(self, tenant_id: str, states: Mapping[str, str]) -> int:
        """The fleet's latest word on some of the tenant's VMs (``vm_id`` -> state).

        Only a *settled* VM (``pending``, ``running`` or ``error``) takes the fleet's state:
        a VM with an operation in flight or in doubt belongs to that operation, a VM not
        in ``states`` keeps its state, an id the tenant does not have is ignored. Not
        audited (nothing the proxy decided changed), and not part of the fold: a restart
        shows the state the log recorded until the fleet is asked again. Returns how many
        VMs changed state.

        - file: in memory, at once (the VM's state and its settled state).
        - postgresql: ``UPDATE vms SET state = $s, settled_state = $s WHERE tenant = $t AND
          id = $id AND state IN ('pending', 'running', 'error')``, one statement for the
          batch; every replica then reads the same.
        """
        ...

    # -- the directory and the reads --------------------------------------------------------

    @property
    def directory(self) -> Directory:
        """Which tenants exist and their token ids (synchronous; read-only for callers)."""
        ...

    async def vm(self, tenant_id: str, vm_id: str) -> Vm: ...

    async def vms(
        self, tenant_id: str, after: str | None, limit: int
    ) -> tuple[list[Vm], str | None]:
        """Up to ``limit`` VMs with ids after ``after``, and the id to continue after."""
        ...

    async def usage(self, tenant_id: str) -> Usage: ...

    async def tenant(self, tenant_id: str) -> Tenant:
        """The tenant (``NotFound`` when there is none). Afterwards :attr:`directory` knows
        a tenant this returned (postgresql: one another replica created a moment ago is
        read into the directory now; the registry's ``confirm`` relies on it)."""
        ...

    async def tenants(self, after: str | None, limit: int) -> tuple[list[Tenant], str | None]:
        """Up to ``limit`` tenants with ids after ``after``, by id; the id to continue after."""
        ...

    def vms_by_state(self) -> dict[str, int]:
        """How many VMs are in each state (metrics)."""
        ...

    # -- the journal ----------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last acknowledged entry (0 and 64 zeros when empty)."""
        ...

    async def audit_page(self, after: int, limit: int) -> tuple[list[bytes], int, str]:
        """Up to ``limit`` stored lines with seq after ``after``, byte for byte, and the
        head ``(seq, hash)`` they were read under (no line beyond it)."""
        ...

    def observe(self, observer: Observer) -> None:
        """Call ``observer`` with every batch of this process's entries once acknowledged.

        It runs before the entries' writers wake up, so it must be quick and not raise.
        """
        ...

    async def signed_head(self) -> SignedHead:
        """The current head, signed: it covers every entry acknowledged before the call.

        Signed on demand when the head moved since the last signed one (an empty log
        gives size 0 and the empty tree's root), else that one again; not stored. The
        periodic and shutdown checkpoints are stored (file: ``audit-checkpoints.jsonl``;
        postgresql: the ``checkpoints`` table), by the store's own upkeep.
        ``AuditUnavailable`` when the tree cannot be read (damaged, or being rebuilt).
        """
        ...

    @property
    def log_key(self) -> Verifier:
        """The log's verifier key: named after its origin (``vm-tenant/<id>``, fixed for the
        log's lifetime), the public half of the key that signs every checkpoint."""
        ...

    async def inclusion_proof(
        self, seq: int, tree_size: int | None, *, tenant: str | None = None
    ) -> TreeProof:
        """The inclusion proof of entry ``seq`` in the tree of ``tree_size`` entries
        (default: the current size, as :meth:`signed_head` would sign it).

        ``InvalidRequest`` when ``tree_size`` is beyond the current size; ``NotFound``
        when ``seq`` is not in that tree, and, when ``tenant`` is given, when the entry is
        not that tenant's own (the same error: a caller cannot tell the two apart).
        ``seq`` and ``tree_size`` are >= 1 (the edge refuses anything else).
        ``AuditUnavailable`` when the tree cannot be read.
        """
        ...

    async def consistency_proof(self, old: int, new: int | None) -> TreeProof:
        """The consistency proof from the tree of ``old`` entries to that of ``new``
        (default: the current size); empty when they are equal.

        ``InvalidRequest`` unless ``1 <= old <= new <= current size``;
        ``AuditUnavailable`` when the tree cannot be read.
        """
        ...

    async def trail(self, tenant: str, after: int, limit: int) -> tuple[list[bytes], int | None]:
        """Up to ``limit`` stored lines of the tenant's own entries with seq after
        ``after``, byte for byte, by rising seq; and the ``after`` of the next page (None
        at the end). O(page), never a pass over the log (file: an index tenant -> seqs;
        postgresql: an index on ``(tenant, seq)``). ``AuditUnavailable`` while the store
        cannot answer yet (file: the index is being rebuilt after a start).
        """
        ...

    def journal_stats(self) -> JournalStats:
        """The journal's health and depth, for the metrics."""
        ...

    # -- secrets ----------------------------------------------------------------------------

    def admin_token_valid(self, token: str) -> bool:
        """Whether ``token`` is the operator's (constant time).

        file: ``<data-dir>/admin.token``, created once, never rewritten; postgresql: the
        SHA-256 of the token made by the first replica, in ``log_meta``.
        """
        ...

    @property
    def token_keys(self) -> KeyStorage:
        """Where the token-signing keyring is kept."""
        ...


class JournalStats(msgspec.Struct, frozen=True):
    """What the metrics show of a journal."""

    seq: int
    queue_depth: int
    healthy: bool
    #: ``(seq, wall-clock time)`` of the newest signed checkpoint, None before the first
    checkpoint: tuple[int, float] | None = None
    #: the same of the newest snapshot; None also for a store that keeps none
    snapshot: tuple[int, float] | None = None
