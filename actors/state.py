"""The proxy's state model: quotas, VM specs and records, idempotency records, tenants,
and the directory of tenants and their tokens.

These are the shapes only. Every durable change is an audit entry, and the state is the
fold of the log over them (``actors/journal/fold.py``), the only code that changes it.
Readers get immutable views (``actors/views.py``), never these live objects.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import msgspec
from sortedcontainers import SortedDict

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
#: the status of a quota refusal's record (bounded in number, see TenantSlice.forget_keys)
REFUSED = 403

#: VM states that mean the fleet has not settled the last operation on that VM.
IN_DOUBT_STATES = frozenset({"spawning", "destroying", "unknown"})
#: VM states the fleet reports for a VM with no operation in flight
SETTLED_STATES = frozenset({"pending", "running", "error"})


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


#: the largest integer the API takes or gives (API.md: 0..2^31-1)
MAX_INT = 2**31 - 1
#: described as 0..MAX_INT in the API's document, not checked when a snapshot is read
#: (the API refuses larger values before they reach the state)
Count = Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 0, "maximum": MAX_INT})]


class Quota(msgspec.Struct, frozen=True, gc=False):
    """A capacity triple: a ceiling or an allocation."""

    vcpus: Count = 0
    memory_mib: Count = 0
    vms: Count = 0

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


class TenantSlice(Protocol):
    """What a decision reads and the fold changes about one tenant.

    :class:`TenantState` is the whole tenant, in memory. A store that keeps its state
    elsewhere gives a decision only the part it names (the tenant's quota and allocation,
    one VM, one idempotency key), loaded inside its transaction, with mutators that
    record what the fold changed (``actors/store/__init__.py``).
    """

    @property
    def id(self) -> str: ...

    quota: Quota

    @property
    def allocated(self) -> Quota: ...

    def vm(self, vm_id: str) -> VmRecord | None: ...

    def key(self, key: str) -> IdempotencyRecord | None: ...

    def add_vm(self, vm: VmRecord) -> None: ...

    def remove_vm(self, vm_id: str) -> VmRecord | None: ...

    def set_vm_state(
        self, vm_id: str, state: str, *, settled: bool = False, doubt: str | None = None
    ) -> None: ...

    def set_key(self, key: str, record: IdempotencyRecord) -> None: ...

    def drop_key(self, key: str) -> None: ...

    def forget_keys(self, before: str, sweep_before: str, refusals: int) -> None:
        """Forget old idempotency records (the fold's retention, ``actors/journal/fold.py``).

        Two rules: a settled record (status not 0) created before ``before`` is
        forgotten, and of the refusal records (status ``REFUSED``) only the newest
        ``refusals`` are kept. A record in flight (status 0) is never forgotten.
        ``sweep_before`` (earlier than ``before``) lets a store batch the first rule: it
        may keep expired records until the oldest record is older than ``sweep_before``.

        - file (:class:`TenantState`): in memory, as described.
        - postgresql: ``DELETE`` the tenant's settled rows older than ``before`` and its
          refusal rows beyond the newest ``refusals`` (by ``created``, then key), in the
          deciding transaction; batching is not needed.
        """
        ...


class TenantState:
    """A tenant's quota, VMs (by id, with the ids in order for cursors), idempotency keys.

    ``vms`` is a plain dict; the sorted order lives in a list of ids beside it, appended to
    (VM ids grow with time, so a new one almost always sorts last) and sorted again only
    after an out-of-order insert. A cursor page is then one bisection, however deep, and
    an idle tenant costs a few hundred bytes rather than a sorted container's kilobytes.
    """

    __slots__ = (
        "_ids",
        "_ids_sorted",
        "_refusals",
        "allocated_memory",
        "allocated_vcpus",
        "id",
        "idempotency",
        "quota",
        "vms",
    )

    def __init__(self, tenant_id: str, quota: Quota) -> None:
        self.id = tenant_id
        self.quota = quota
        #: mutate only through add_vm/remove_vm/load_vms, which keep the id order
        self.vms: dict[str, VmRecord] = {}
        self._ids: list[str] = []
        self._ids_sorted = True
        #: every idempotency record, oldest first; change only through the slice's methods
        #: (and load_keys), which keep the refusals' queue beside it
        self.idempotency: dict[str, IdempotencyRecord] = {}
        #: the refusal records of ``idempotency``, in the same order (oldest first)
        self._refusals: deque[tuple[str, IdempotencyRecord]] = deque()
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

    # -- the slice (see TenantSlice) -------------------------------------------------------

    def vm(self, vm_id: str) -> VmRecord | None:
        return self.vms.get(vm_id)

    def key(self, key: str) -> IdempotencyRecord | None:
        return self.idempotency.get(key)

    def set_vm_state(
        self, vm_id: str, state: str, *, settled: bool = False, doubt: str | None = None
    ) -> None:
        """Move a VM to ``state`` (also its settled state when ``settled``)."""
        vm = self.vms.get(vm_id)
        if vm is not None:
            vm.state = state
            if settled:
                vm.settled_state = state
            vm.doubt = doubt

    def set_key(self, key: str, record: IdempotencyRecord) -> None:
        previous = self.idempotency.get(key)
        if previous is not None and previous.status == REFUSED:
            self._refusals.remove((key, previous))
        self.idempotency[key] = record
        if record.status == REFUSED:
            self._refusals.append((key, record))

    def drop_key(self, key: str) -> None:
        record = self.idempotency.pop(key, None)
        if record is not None and record.status == REFUSED:
            self._refusals.remove((key, record))

    def forget_keys(self, before: str, sweep_before: str, refusals: int) -> None:
        """See :meth:`TenantSlice.forget_keys`.

        The records are in the order they were made, so the oldest is the first: only
        when it is older than ``sweep_before`` is the whole dict rebuilt without the
        expired records, and then not again until the new first one is that old. A
        record still in flight that old (its spawn in doubt for a day) goes to the end
        on a rebuild, so that it does not set one off on every call.
        """
        records = self.idempotency
        refused = self._refusals
        while len(refused) > refusals:
            key, _ = refused.popleft()
            del records[key]
        oldest = next(iter(records.values()), None)
        if oldest is None or oldest.created >= sweep_before:
            return
        kept: dict[str, IdempotencyRecord] = {}
        stuck: dict[str, IdempotencyRecord] = {}
        for key, record in records.items():
            if record.created >= before:
                kept[key] = record
            elif record.status == 0:
                (stuck if record.created < sweep_before else kept)[key] = record
        kept.update(stuck)
        self.load_keys(kept)

    def load_keys(self, records: Mapping[str, IdempotencyRecord]) -> None:
        """Replace the idempotency records wholesale, oldest first (a snapshot being loaded)."""
        self.idempotency = dict(records)
        self._refusals = deque(
            (key, record) for key, record in self.idempotency.items() if record.status == REFUSED
        )


class Directory:
    """Which tenants exist and which token ids each of them has issued and not revoked.

    The edge asks it, synchronously, whether a verified token is still good, so a
    revocation or a deletion takes effect with the entry that records it.
    """

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def exists(self, tenant_id: str) -> bool:
        return tenant_id in self._tokens

    def token_valid(self, tenant_id: str, token_id: str) -> bool:
        tokens = self._tokens.get(tenant_id)
        return tokens is not None and token_id in tokens

    def tenant_ids(self) -> list[str]:
        return list(self._tokens)

    def tokens(self, tenant_id: str) -> frozenset[str]:
        """The tenant's valid token ids (none for an unknown tenant)."""
        return frozenset(self._tokens.get(tenant_id, ()))

    # -- changed by the fold only ----------------------------------------------------------

    def add_tenant(self, tenant_id: str, tokens: set[str]) -> None:
        self._tokens[tenant_id] = tokens

    def remove_tenant(self, tenant_id: str) -> None:
        self._tokens.pop(tenant_id, None)

    def add_token(self, tenant_id: str, token_id: str) -> None:
        tokens = self._tokens.get(tenant_id)
        if tokens is not None:
            tokens.add(token_id)

    def remove_token(self, tenant_id: str, token_id: str) -> None:
        tokens = self._tokens.get(tenant_id)
        if tokens is not None:
            tokens.discard(token_id)


class ProxyState:
    """All tenants' states, keyed by id, and the directory of tenants and tokens."""

    __slots__ = ("directory", "tenants")

    def __init__(self) -> None:
        # sorted by id: the admin API lists tenants in pages
        self.tenants: SortedDict[str, TenantState] = SortedDict()
        self.directory = Directory()

    def add_tenant(self, tenant: TenantState, tokens: set[str]) -> None:
        self.tenants[tenant.id] = tenant
        self.directory.add_tenant(tenant.id, tokens)

    def remove_tenant(self, tenant_id: str) -> None:
        self.tenants.pop(tenant_id, None)
        self.directory.remove_tenant(tenant_id)
