"""One tenant's rows: the slice a decision reads and the fold changes, and their writes.

:class:`RowSlice` satisfies :class:`~actors.state.TenantSlice` over what one statement
loaded (the quota, allocation and version of the tenant, the VM and the idempotency key
the caller named), so the tenant's decisions and the fold (``actors/journal/fold.py``)
run on it unchanged. Its mutators record what changed; the writes of exactly those rows
are then made in the one statement that queues the entry, all of them behind a *guard*
(the statement's first write, ``g``; the others happen only if it did):

- :meth:`RowSlice.decision_writes`: the guard is a compare-and-set of the tenant's row on
  the version that was read. It takes the tenant's row lock for the statement, so it is
  the gate across replicas: a decision made on a state that changed since writes nothing
  and is made again on the new state.
- :meth:`RowSlice.outcome_writes`: the guard is the write of the VM's row while this
  replica owns the operation. An outcome only ever releases capacity and leaves the
  version alone: decisions made meanwhile read at most more allocation than there is
  (safe for the quota), and do not have to be made again.

Both change the allocation *by difference* (``allocated = allocated + delta``), never
to the figure they read: a decision whose load came before an outcome's release would
otherwise write the release away.

Ownership of an operation in flight goes with the VM's state: a row written in a state
of :data:`~actors.state.IN_DOUBT_STATES` is owned by this replica with a fresh lease; a
row that leaves those states loses its owner and its lease, and its fence rises (so a
writer that read the older fence can tell that the operation was settled meanwhile).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import msgspec

from actors.errors import NotFound
from actors.state import IN_DOUBT_STATES, REFUSED, IdempotencyRecord, Quota, VmRecord
from actors.store.postgres.bridge import Queries, Statement

#: how long a replica's claim on an operation in flight holds without renewal
LEASE_SECONDS = 30.0

VM_FIELDS = (
    "id", "tenant", "vcpus", "memory_mib", "image", "name", "created_at", "state",
    "settled_state", "idempotency_key", "doubt", "owner", "fence",
)  # fmt: skip
VM_COLUMNS = ", ".join(VM_FIELDS)
KEY_FIELDS = ("request_hash", "status", "body", "created")

#: the tenant's row (locked), the named VM and the named idempotency record, at once
LOAD = (
    "SELECT t.quota_vcpus, t.quota_memory_mib, t.quota_vms, t.allocated_vcpus, "
    "t.allocated_memory_mib, t.allocated_vms, t.version, "
    # the qid of the entry the decision may write, taken now: after every write of the
    # tenant that this read sees, so the tenant's entries are queued in decision order
    "nextval('audit_queue_qid_seq') AS qid, "
    + ", ".join(f"v.{name} AS vm_{name}" for name in VM_FIELDS)
    + ", "
    + ", ".join(f"k.{name} AS k_{name}" for name in KEY_FIELDS)
    + " FROM tenants t LEFT JOIN vms v ON v.id = $2 AND v.tenant = t.id "
    "LEFT JOIN idempotency k ON k.tenant = t.id AND k.key = $3 "
    "WHERE t.id = $1"
)
#: in a write made behind the guard: its condition
WHERE_GUARD = "WHERE EXISTS (SELECT 1 FROM g)"
AND_GUARD = "AND EXISTS (SELECT 1 FROM g)"

#: a loaded row: a record, or the columns of a joined one by name
Row = Mapping[str, Any] | asyncpg.Record


def vm_record(row: Row) -> VmRecord:
    return VmRecord(
        id=row["id"],
        tenant=row["tenant"],
        vcpus=row["vcpus"],
        memory_mib=row["memory_mib"],
        image=row["image"],
        name=row["name"],
        created_at=row["created_at"],
        state=row["state"],
        settled_state=row["settled_state"],
        idempotency_key=row["idempotency_key"],
        doubt=row["doubt"],
    )


def key_record(row: Row) -> IdempotencyRecord:
    body = None if row["body"] is None else msgspec.json.decode(row["body"])
    return IdempotencyRecord(row["request_hash"], row["status"], body, row["created"])


class RowSlice:
    """A tenant's quota, allocation, one VM and one idempotency key, as loaded and changed."""

    def __init__(
        self,
        tenant_id: str,
        quota: Quota,
        allocated: tuple[int, int, int],
        vm: Row | None,
        key: tuple[str, Row | None] | None,
        version: int = 0,
        qid: int = 0,
    ) -> None:
        self._id = tenant_id
        #: the qid the entry of this decision gets (taken by the load)
        self.qid = qid
        self.quota = quota
        self._original_quota = quota
        self.version = version
        self._vcpus, self._memory, self._vms = allocated
        self._loaded_allocation = allocated
        #: VM id -> record as loaded (None: none by that id), and what became of it
        self._vm_loaded: dict[str, VmRecord | None] = {}
        self.vm_fence: dict[str, int] = {}
        self.vm_owner: dict[str, str | None] = {}
        if vm is not None:
            self._vm_loaded[vm["id"]] = vm_record(vm)
            self.vm_fence[vm["id"]] = vm["fence"]
            self.vm_owner[vm["id"]] = vm["owner"]
        self._vms_now: dict[str, VmRecord | None] = dict(self._vm_loaded)
        self._keys_loaded: dict[str, IdempotencyRecord | None] = {}
        if key is not None:
            name, row = key
            self._keys_loaded[name] = None if row is None else key_record(row)
        self._keys_now: dict[str, IdempotencyRecord | None] = dict(self._keys_loaded)
        #: the retention the fold asked for (``forget_keys``): records older than, kept
        self._forget: tuple[str, int] | None = None

    @classmethod
    async def load(
        cls, con: Queries, tenant_id: str, vm_id: str | None, key: str | None
    ) -> RowSlice:
        """Load the slice, in one statement; ``NotFound`` for an unknown tenant."""
        row = await con.fetchrow(LOAD, tenant_id, vm_id, key)
        if row is None:
            raise NotFound("no such tenant")
        vm = None
        if row["vm_id"] is not None:
            vm = {name: row[f"vm_{name}"] for name in VM_FIELDS}
        loaded_key = None
        if key is not None:
            found = row["k_request_hash"] is not None
            loaded_key = (key, {n: row[f"k_{n}"] for n in KEY_FIELDS} if found else None)
        quota = Quota(row["quota_vcpus"], row["quota_memory_mib"], row["quota_vms"])
        allocated = (row["allocated_vcpus"], row["allocated_memory_mib"], row["allocated_vms"])
        return cls(tenant_id, quota, allocated, vm, loaded_key, row["version"], row["qid"])

    # -- the slice (actors.state.TenantSlice) -------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def allocated(self) -> Quota:
        return Quota(self._vcpus, self._memory, self._vms)

    def vm(self, vm_id: str) -> VmRecord | None:
        return self._vms_now.get(vm_id)

    def key(self, key: str) -> IdempotencyRecord | None:
        return self._keys_now.get(key)

    def add_vm(self, vm: VmRecord) -> None:
        previous = self._vms_now.get(vm.id)
        if previous is not None:
            self._count(previous, -1)
        self._vm_loaded.setdefault(vm.id, None)
        self._vms_now[vm.id] = vm
        self._count(vm, +1)

    def remove_vm(self, vm_id: str) -> VmRecord | None:
        vm = self._vms_now.get(vm_id)
        if vm is not None:
            self._vms_now[vm_id] = None
            self._count(vm, -1)
        return vm

    def set_vm_state(
        self, vm_id: str, state: str, *, settled: bool = False, doubt: str | None = None
    ) -> None:
        vm = self._vms_now.get(vm_id)
        if vm is not None:
            changed = msgspec.structs.replace(vm, state=state, doubt=doubt)
            if settled:
                changed.settled_state = state
            self._vms_now[vm_id] = changed

    def set_key(self, key: str, record: IdempotencyRecord) -> None:
        self._keys_loaded.setdefault(key, None)
        self._keys_now[key] = record

    def drop_key(self, key: str) -> None:
        if self._keys_now.get(key) is not None:
            self._keys_now[key] = None

    def forget_keys(self, before: str, sweep_before: str, refusals: int) -> None:
        """Record the retention of the tenant's idempotency records (the fold's rule):
        written with the decision, as two deletes behind its guard (``sweep_before`` is
        not needed: a delete by index costs nothing when nothing is that old)."""
        self._forget = (before, refusals)

    def _count(self, vm: VmRecord, sign: int) -> None:
        self._vcpus += sign * vm.vcpus
        self._memory += sign * vm.memory_mib
        self._vms += sign

    # -- writing back -----------------------------------------------------------------------

    def decision_writes(self, owner: str) -> tuple[Statement, list[Statement]]:
        """The guard (the tenant's row, compare-and-set on the version read) and the writes
        of the other rows the fold changed (``owner``: this replica, for VMs in flight)."""
        q = self.quota
        # The allocation by difference, as an outcome writes it: an outcome that committed
        # after the load released capacity without moving the version, and writing the
        # absolute figure read then would take that release back.
        guard = (
            "UPDATE tenants SET quota_vcpus = $3, quota_memory_mib = $4, quota_vms = $5, "
            "allocated_vcpus = allocated_vcpus + $6, "
            "allocated_memory_mib = allocated_memory_mib + $7, "
            "allocated_vms = allocated_vms + $8, "
            "version = version + 1 WHERE id = $1 AND version = $2 RETURNING id",
            [self._id, self.version, q.vcpus, q.memory_mib, q.vms, *self._allocation_delta()],
        )  # fmt: skip
        return guard, self._vm_writes(owner, None) + self._key_writes()

    def outcome_writes(self, vm_id: str, owner: str) -> tuple[Statement, list[Statement]]:
        """The guard (the VM's row, only while ``owner`` holds it) and the other writes:
        the allocation by difference, the idempotency key."""
        vm = self._vms_now.get(vm_id)
        guard: Statement
        if vm is None:
            guard = ("DELETE FROM vms WHERE id = $1 AND owner = $2 RETURNING id", [vm_id, owner])
        else:
            sql, args = _update_vm(vm, owner)
            guard = (f"{sql} AND owner = ${len(args) + 1} RETURNING id", [*args, owner])
        writes = self._vm_writes(owner, vm_id) + self._key_writes()
        delta = self._allocation_delta()
        if any(delta):
            writes.append((
                "UPDATE tenants SET allocated_vcpus = allocated_vcpus + $2, "
                "allocated_memory_mib = allocated_memory_mib + $3, "
                f"allocated_vms = allocated_vms + $4 WHERE id = $1 {AND_GUARD}",
                [self._id, *delta],
            ))  # fmt: skip
        return guard, writes

    def _allocation_delta(self) -> list[int]:
        """How the fold changed the allocation since the load (vcpus, memory, vms)."""
        vcpus, memory, vms = self._loaded_allocation
        return [self._vcpus - vcpus, self._memory - memory, self._vms - vms]

    def _vm_writes(self, owner: str, skip: str | None) -> list[Statement]:
        writes: list[Statement] = []
        for vm_id, now in self._vms_now.items():
            before = self._vm_loaded.get(vm_id)
            if vm_id == skip or now is before:
                continue
            if now is None:
                writes.append((f"DELETE FROM vms WHERE id = $1 {AND_GUARD}", [vm_id]))
            elif before is None:
                writes.append(_insert_vm(now, owner))
            elif now != before:
                sql, args = _update_vm(now, owner)
                writes.append((f"{sql} {AND_GUARD}", args))
        return writes

    def _key_writes(self) -> list[Statement]:
        writes: list[Statement] = self._forget_writes()
        for key, record in self._keys_now.items():
            if record is self._keys_loaded.get(key):
                continue
            if record is None:
                writes.append((
                    f"DELETE FROM idempotency WHERE tenant = $1 AND key = $2 {AND_GUARD}",
                    [self._id, key],
                ))  # fmt: skip
            else:
                writes.append((
                    "INSERT INTO idempotency (tenant, key, request_hash, status, body, created) "
                    "SELECT $1::text, $2::text, $3::text, $4::integer, $5::jsonb, $6::text "
                    f"{WHERE_GUARD} ON CONFLICT (tenant, key) DO UPDATE "
                    "SET request_hash = $3, status = $4, body = $5::jsonb, created = $6",
                    [self._id, key, record.request_hash, record.status, _json(record.body),
                     record.created],
                ))  # fmt: skip
        return writes

    def _forget_writes(self) -> list[Statement]:
        if self._forget is None:
            return []
        before, refusals = self._forget
        # the statement's deletes see the rows as they were before it: a refusal it
        # records now counts against the newest ``refusals`` already
        fresh = sum(
            1
            for key, record in self._keys_now.items()
            if record is not None and record.status == REFUSED
            and record is not self._keys_loaded.get(key)
        )  # fmt: skip
        return [
            (
                "DELETE FROM idempotency WHERE tenant = $1 AND status <> 0 AND created < $2 "
                f"{AND_GUARD}",
                [self._id, before],
            ),
            (
                "DELETE FROM idempotency WHERE tenant = $1 AND status = 403 AND key IN ("
                "SELECT key FROM idempotency WHERE tenant = $1 AND status = 403 "
                f"ORDER BY created DESC, key DESC OFFSET $2) {AND_GUARD}",
                [self._id, max(0, refusals - fresh)],
            ),
        ]


def _json(body: Any) -> str | None:
    return None if body is None else msgspec.json.encode(body).decode()


def _insert_vm(vm: VmRecord, owner: str) -> Statement:
    in_flight = vm.state in IN_DOUBT_STATES
    return (
        "INSERT INTO vms (id, tenant, vcpus, memory_mib, image, name, created_at, state, "
        "settled_state, idempotency_key, doubt, owner, lease_expires) "
        "SELECT $1::text, $2::text, $3::integer, $4::integer, $5::text, $6::text, $7::text, "
        "$8::text, $9::text, $10::text, $11::text, $12::text, "
        "CASE WHEN $13::boolean THEN now() + make_interval(secs => $14::float8) END "
        + WHERE_GUARD,
        [vm.id, vm.tenant, vm.vcpus, vm.memory_mib, vm.image, vm.name, vm.created_at, vm.state,
         vm.settled_state, vm.idempotency_key, vm.doubt, owner if in_flight else None,
         in_flight, LEASE_SECONDS],
    )  # fmt: skip


def _update_vm(vm: VmRecord, owner: str) -> Statement:
    in_flight = vm.state in IN_DOUBT_STATES
    return (
        "UPDATE vms SET state = $2, settled_state = $3, doubt = $4, owner = $5, "
        "lease_expires = CASE WHEN $6::boolean THEN now() + make_interval(secs => $7) END, "
        "fence = fence + CASE WHEN $6::boolean THEN 0 ELSE 1 END WHERE id = $1",
        [vm.id, vm.state, vm.settled_state, vm.doubt, owner if in_flight else None,
         in_flight, LEASE_SECONDS],
    )  # fmt: skip
