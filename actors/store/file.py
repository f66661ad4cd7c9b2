"""The file store: the state in memory, the journal in ``<data-dir>/audit/``.

The state is the fold of the log (``actors/journal/fold.py``) and changes nowhere else:
:meth:`FileStore.decide` runs a tenant's decision against its state and applies the
fold of a reserving entry at once, in the deciding turn; the audit writer's observers
apply every other entry once it is durable, in chain order, and take back a reserving
entry that could not be made durable. Everything runs on the event loop's thread and
nothing here awaits, so a decision and its reservation are one atomic step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol, TypeVar

from actors.errors import NotFound
from actors.journal import fold
from actors.journal.entries import Entry
from actors.journal.writer import AuditTicket, AuditWriter
from actors.state import IN_DOUBT_STATES, Directory, ProxyState, TenantState, VmRecord
from actors.views import Tenant, Usage, Vm, find_vm, tenant_view, usage_view, vm_page


class Decided(Protocol):
    """A decision (``actors/tenants/decisions.py``): what matters here is its entry."""

    @property
    def entry(self) -> Entry | None: ...


D = TypeVar("D", bound=Decided)


class FileStore:
    """The state of one data dir, kept as the fold of its durable log plus reservations."""

    def __init__(self, state: ProxyState, writer: AuditWriter) -> None:
        self.state = state
        self.writer = writer
        writer.observe_durable(self._durable)
        writer.observe_lost(self._lost)

    @property
    def directory(self) -> Directory:
        """Which tenants exist and their token ids (read-only use: the fold changes it)."""
        return self.state.directory

    def _tenant(self, tenant_id: str) -> TenantState:
        tenant = self.state.tenants.get(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        return tenant

    # -- reads: immutable views, taken between two changes (no await, no mailbox) -------------

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
        """Up to ``limit`` tenants with ids after ``after``, by id; and the id to continue after."""
        tenants = self.state.tenants
        ids = list(
            itertools.islice(tenants.irange(minimum=after, inclusive=(False, True)), limit + 1)
        )
        page = [tenant_view(tenants[tenant_id]) for tenant_id in ids[:limit]]
        return page, (ids[limit - 1] if len(ids) > limit else None)

    def vms_by_state(self) -> dict[str, int]:
        """How many VMs are in each state, over all tenants (read at a metrics scrape)."""
        by_state: dict[str, int] = {}
        for tenant in self.state.tenants.values():
            for vm in tenant.vms.values():
                by_state[vm.state] = by_state.get(vm.state, 0) + 1
        return by_state

    # -- tenant decisions -------------------------------------------------------------------

    async def decide(
        self, tenant_id: str, decide: Callable[[TenantState], D]
    ) -> tuple[D, AuditTicket | None]:
        """Run ``decide`` on the tenant's state; write its entry, reserving what it reserves."""
        tenant = self.state.tenants.get(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        decision = decide(tenant)
        entry = decision.entry
        if entry is None:
            return decision, None
        ticket = self.writer.append(entry)
        if fold.reserves(entry):
            fold.apply_to_tenant(tenant, entry)
        return decision, ticket

    def record(self, entry: Entry) -> AuditTicket:
        """Write an entry that takes effect once durable (outcomes, tenant and token changes)."""
        assert not fold.reserves(entry), "a reserving entry is written by decide()"
        return self.writer.append(entry)

    async def mark_in_doubt(self, tenant_id: str, vm_id: str, kind: str) -> None:
        """The fleet's answer was lost: the VM is ``unknown`` until reconciled (not audited)."""
        tenant = self.state.tenants.get(tenant_id)
        vm = tenant.vms.get(vm_id) if tenant is not None else None
        if vm is not None:
            vm.state, vm.doubt = "unknown", kind

    async def in_doubt(self, tenant_id: str) -> list[VmRecord]:
        """The tenant's VMs whose last operation has no durable outcome."""
        tenant = self.state.tenants.get(tenant_id)
        if tenant is None:
            return []
        return [vm for vm in tenant.vms.values() if vm.state in IN_DOUBT_STATES]

    def tenants_in_doubt(self) -> list[str]:
        """Tenants with a VM in doubt (a crash left its operation unsettled)."""
        return [
            tenant.id
            for tenant in self.state.tenants.values()
            if any(vm.state in IN_DOUBT_STATES for vm in tenant.vms.values())
        ]

    # -- the writer's observers ---------------------------------------------------------------

    def _durable(self, entries: list[Entry]) -> None:
        state = self.state
        for entry in entries:
            if not fold.reserves(entry):
                fold.apply(state, entry)

    def _lost(self, drafts: list[Entry]) -> None:
        tenants = self.state.tenants
        for entry in reversed(drafts):
            if fold.reserves(entry) and (tenant := tenants.get(entry["tenant"])) is not None:
                fold.undo(tenant, entry)
