"""The proxy's state model: quotas, VM specs and records, idempotency records, tenants.

These are the shapes only. Every durable change is an audit entry, and the state is the
fold of the log over them (``actors/journal/fold.py``). The live tenant actors own their
:class:`TenantState` once the proxy runs.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

import msgspec
from sortedcontainers import SortedDict

IDEMPOTENCY_TTL_SECONDS = 24 * 3600

#: VM states that mean the fleet has not settled the last operation on that VM.
IN_DOUBT_STATES = frozenset({"spawning", "destroying", "unknown"})


# The records below hold only strings, numbers and plain JSON data, so they can never be
# part of a reference cycle: ``gc=False`` keeps them out of the collector's scans, which
# otherwise grow with every VM and stall the event loop on each full collection.


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What a spawn asks for, and what the fleet needs to create the VM."""

    vcpus: int
    memory_mib: int
    image: str
    name: str | None


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
