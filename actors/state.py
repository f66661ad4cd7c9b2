"""The proxy's state as a fold over the audit log.

Every durable change is an audit entry, so tenants, quotas, tokens, VM records,
allocations and idempotency records can be rebuilt by applying the entries in order to
an empty :class:`ProxyState` (or to a snapshot's). The same :func:`apply` runs at start
(replay) and when a snapshot is compacted, so the two can never disagree.

The live tenant actors own their :class:`TenantState` once the proxy runs; this module
only defines the shapes and the fold.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, bisect_right
from typing import Any

import msgspec
from sortedcontainers import SortedDict

IDEMPOTENCY_TTL_SECONDS = 24 * 3600

#: VM states that mean the fleet has not settled the last operation on that VM.
IN_DOUBT_STATES = frozenset({"spawning", "destroying", "unknown"})


# The records below hold only strings, numbers and plain JSON data, so they can never be
# part of a reference cycle: ``gc=False`` keeps them out of the collector's scans, which
# otherwise grow with every VM and stall the event loop on each full collection.


class Quota(msgspec.Struct, frozen=True, gc=False):
    """A capacity triple: a ceiling or an allocation."""

    vcpus: int = 0
    memory_mib: int = 0
    vms: int = 0

    def to_json(self) -> dict[str, int]:
        return {"vcpus": self.vcpus, "memory_mib": self.memory_mib, "vms": self.vms}


class VmRecord(msgspec.Struct, gc=False):
    """One VM as the proxy knows it; it counts toward its tenant's allocation while it exists.

    Untracked by the cyclic GC (it only holds strings, ints and None): a million records
    would otherwise cost a GC header each and lengthen every full collection.
    """

    id: str
    tenant: str
    vcpus: int
    memory_mib: int
    image: str
    name: str | None
    created_at: str
    state: str
    #: the state to go back to when a destroy fails definitively
    settled_state: str = "pending"
    #: the Idempotency-Key of the spawn that created it, if any
    idempotency_key: str | None = None
    #: while ``state`` is ``unknown``: the operation in doubt, ``spawn`` or ``destroy``
    doubt: str | None = None

    def to_json(self, state: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "state": state or self.state,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "image": self.image,
            "name": self.name,
            "created_at": self.created_at,
        }


class IdempotencyRecord(msgspec.Struct, frozen=True, gc=False):
    """The first answer given to a spawn with an ``Idempotency-Key``."""

    request_hash: str
    status: int  # 0 while the first request is still in flight
    body: dict[str, Any] | None
    created: str  # the audit ts of the decision, for the 24-hour retention


class TenantState:
    """A tenant's quota, tokens, VMs (by id, with the ids in order for cursors), idempotency keys.

    ``vms`` is a plain dict; the sorted order lives in a list of ids beside it, appended to
    (VM ids grow with time, so a new one almost always sorts last) and sorted again only
    after an out-of-order insert. A cursor page is then one bisection, however deep, and
    an idle tenant costs a few hundred bytes rather than a sorted container's kilobytes.
    """

    __slots__ = (
        "_ids",
        "_ids_sorted",
        "allocated_memory",
        "allocated_vcpus",
        "id",
        "idempotency",
        "quota",
        "tokens",
        "vms",
    )

    def __init__(self, tenant_id: str, quota: Quota, tokens: set[str] | None = None) -> None:
        self.id = tenant_id
        self.quota = quota
        self.tokens: set[str] = tokens or set()
        #: mutate only through add_vm/remove_vm/load_vms, which keep the id order
        self.vms: dict[str, VmRecord] = {}
        self._ids: list[str] = []
        self._ids_sorted = True
        self.idempotency: dict[str, IdempotencyRecord] = {}
        self.allocated_vcpus = 0
        self.allocated_memory = 0

    @property
    def allocated(self) -> Quota:
        return Quota(self.allocated_vcpus, self.allocated_memory, len(self.vms))

    def add_vm(self, vm: VmRecord) -> None:
        if vm.id not in self.vms:
            ids = self._ids
            if ids and vm.id < ids[-1]:
                self._ids_sorted = False
            ids.append(vm.id)
        self.vms[vm.id] = vm
        self.allocated_vcpus += vm.vcpus
        self.allocated_memory += vm.memory_mib

    def remove_vm(self, vm_id: str) -> VmRecord | None:
        vm = self.vms.pop(vm_id, None)
        if vm is not None:
            ids = self._ids
            if ids[-1] == vm_id:
                ids.pop()
            else:
                ids = self._sorted_ids()
                del ids[bisect_left(ids, vm_id)]
            self.allocated_vcpus -= vm.vcpus
            self.allocated_memory -= vm.memory_mib
        return vm

    def load_vms(self, vms: list[VmRecord]) -> None:
        """Replace the VMs wholesale (a snapshot being loaded)."""
        self.vms = {vm.id: vm for vm in vms}
        self._ids, self._ids_sorted = list(self.vms), False
        self.allocated_vcpus = sum(vm.vcpus for vm in vms)
        self.allocated_memory = sum(vm.memory_mib for vm in vms)

    def vms_after(self, after: str | None, limit: int) -> list[VmRecord]:
        """Up to ``limit`` VMs whose ids sort after ``after``, in id order: a cursor page."""
        ids = self._sorted_ids()
        start = 0 if after is None else bisect_right(ids, after)
        vms = self.vms
        return [vms[vm_id] for vm_id in ids[start : start + limit]]

    def _sorted_ids(self) -> list[str]:
        if not self._ids_sorted:
            self._ids.sort()
            self._ids_sorted = True
        return self._ids

    def over_quota(self, vcpus: int, memory_mib: int) -> str | None:
        """The first dimension a spawn of this size would push above the quota, if any."""
        if len(self.vms) + 1 > self.quota.vms:
            return "vms"
        if self.allocated_vcpus + vcpus > self.quota.vcpus:
            return "vcpus"
        if self.allocated_memory + memory_mib > self.quota.memory_mib:
            return "memory_mib"
        return None


class ProxyState:
    """All tenants, keyed by id."""

    __slots__ = ("tenants",)

    def __init__(self) -> None:
        # sorted by id: the admin API lists tenants in pages
        self.tenants: dict[str, TenantState] = SortedDict()


def quota_from(data: dict[str, Any]) -> Quota:
    return Quota(data["vcpus"], data["memory_mib"], data["vms"])


def spawn_response(vm: VmRecord, state: str) -> dict[str, Any]:
    """The body of a successful spawn, kept for idempotent replays."""
    return vm.to_json(state)


def apply(state: ProxyState, entry: dict[str, Any]) -> None:
    """Fold one durable audit entry into ``state``."""
    op, outcome, detail = entry["op"], entry["outcome"], entry["detail"]
    tenant_id = entry["tenant"]
    if op == "tenant.create":
        if outcome == "succeeded":
            state.tenants[tenant_id] = TenantState(
                tenant_id, quota_from(detail["quota"]), {detail["token_id"]}
            )
        return
    tenant = state.tenants.get(tenant_id)
    if tenant is None:
        return
    if outcome == "rejected":
        _remember_key(tenant, entry, 403, detail.get("problem"))
        return
    if op == "tenant.update" and outcome == "succeeded":
        tenant.quota = quota_from(detail["quota"])
    elif op == "tenant.delete" and outcome == "succeeded":
        del state.tenants[tenant_id]
    elif op == "token.issue" and outcome == "succeeded":
        tenant.tokens.add(detail["token_id"])
    elif op == "token.revoke" and outcome == "succeeded":
        tenant.tokens.discard(detail["token_id"])
    elif op == "vm.spawn":
        _apply_spawn(tenant, entry)
    elif op == "vm.destroy":
        _apply_destroy(tenant, entry)


def _apply_spawn(tenant: TenantState, entry: dict[str, Any]) -> None:
    outcome, detail, vm_id = entry["outcome"], entry["detail"], entry["vm"]
    if outcome == "requested":
        spec = detail["spec"]
        tenant.add_vm(
            VmRecord(
                id=vm_id,
                tenant=tenant.id,
                vcpus=spec["vcpus"],
                memory_mib=spec["memory_mib"],
                image=sys.intern(spec["image"]),
                name=spec.get("name"),
                created_at=detail["created_at"],
                state="spawning",
                idempotency_key=detail.get("idempotency_key"),
            )
        )
        _remember_key(tenant, entry, 0, None)
    elif outcome == "succeeded":
        vm = tenant.vms.get(vm_id)
        if vm is not None:
            vm.state = vm.settled_state = sys.intern(detail["state"])
            if "idempotency_key" in detail:
                _settle_key(tenant, detail, 201, spawn_response(vm, detail["state"]))
    elif outcome == "failed":
        tenant.remove_vm(vm_id)
        key = detail.get("idempotency_key")
        if key is not None:
            tenant.idempotency.pop(key, None)


def _apply_destroy(tenant: TenantState, entry: dict[str, Any]) -> None:
    outcome, detail, vm_id = entry["outcome"], entry["detail"], entry["vm"]
    vm = tenant.vms.get(vm_id)
    if vm is None:
        return
    if outcome == "requested":
        vm.state = "destroying"
    elif outcome == "succeeded":
        tenant.remove_vm(vm_id)
    elif outcome == "failed":
        vm.state = vm.settled_state = detail.get("state", vm.settled_state)


def _remember_key(
    tenant: TenantState, entry: dict[str, Any], status: int, body: dict[str, Any] | None
) -> None:
    detail = entry["detail"]
    key = detail.get("idempotency_key")
    if key is not None:
        tenant.idempotency[key] = IdempotencyRecord(
            detail["request_hash"], status, body, entry["ts"]
        )


def _settle_key(
    tenant: TenantState, detail: dict[str, Any], status: int, body: dict[str, Any]
) -> None:
    key = detail.get("idempotency_key")
    record = tenant.idempotency.get(key) if key is not None else None
    if record is not None:
        tenant.idempotency[key] = IdempotencyRecord(
            record.request_hash, status, body, record.created
        )
