"""Read-only views of one tenant's state: a VM, a page of VMs, the usage.

The tenant actor answers its read messages with these, and the HTTP edge calls them
directly on :meth:`~actors.registry.TenantRegistry.state`. Reading without a mailbox hop
is safe because only the actor changes the state and its turns never ``await``: any
other task sees the state as it is between two turns, never half-way through one.
"""

from __future__ import annotations

from typing import Any

from actors.errors import NotFound
from actors.state import TenantState


def vm_view(tenant: TenantState, vm_id: str) -> dict[str, Any]:
    """One VM as the API shows it; ``NotFound`` when the tenant has no such VM."""
    vm = tenant.vms.get(vm_id)
    if vm is None:
        raise NotFound("no such VM")
    return vm.to_json()


def vm_page(
    tenant: TenantState, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` VMs with ids after ``after``, and the id to continue after (or None).

    Starts at ``after`` in the sorted index, so a page deep into a long list costs what
    the first one does.
    """
    vms = tenant.vms_after(after, limit + 1)
    page = [vm.to_json() for vm in vms[:limit]]
    return page, (page[-1]["id"] if len(vms) > limit else None)


def tenant_view(tenant: TenantState) -> dict[str, Any]:
    """A tenant as the admin API shows it."""
    return {
        "id": tenant.id,
        "quota": tenant.quota.to_json(),
        "allocated": tenant.allocated.to_json(),
    }


def usage_view(tenant: TenantState) -> dict[str, Any]:
    return {
        "tenant": tenant.id,
        "quota": tenant.quota.to_json(),
        "allocated": tenant.allocated.to_json(),
    }
