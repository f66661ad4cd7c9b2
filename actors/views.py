"""Immutable views of a tenant's state: a VM, a page of VMs, the usage, the tenant.

Readers (the HTTP edge, the tests, the bench) get these frozen structs, never the live
:class:`~actors.state.TenantState` or :class:`~actors.state.VmRecord`: a view is a copy
taken between two changes of the state, and nothing a reader does with it can change
the state. They are also the bodies the API answers with (``server/responses.py``
encodes them and derives the OpenAPI schemas from them), so the two cannot drift.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from actors.errors import NotFound
from actors.state import MAX_INT, Quota, TenantState, VmRecord

Size = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT)]
VmState = Literal["spawning", "pending", "running", "destroying", "unknown", "error"]
Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]


class Vm(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """A VM as the API shows it (API.md, "VM")."""

    id: str
    tenant: str
    state: VmState
    vcpus: Size
    memory_mib: Size
    image: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=63)] | None
    created_at: Timestamp


class Destroyed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The answer to a destroy the fleet confirmed."""

    id: str
    state: Literal["destroyed"]


class Usage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant's ceiling and what it has allocated (``GET /v1/usage``)."""

    tenant: str
    quota: Quota
    allocated: Quota


class Tenant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant as the admin API shows it."""

    id: str
    quota: Quota
    allocated: Quota


def vm_view(vm: VmRecord, state: str | None = None) -> Vm:
    """``vm`` as the API shows it, with ``state`` instead of its own when given."""
    return Vm(
        vm.id,
        vm.tenant,
        state or vm.state,  # type: ignore[arg-type]  # the fleet's word, passed on as is
        vm.vcpus,
        vm.memory_mib,
        vm.image,
        vm.name,
        vm.created_at,
    )


def find_vm(tenant: TenantState, vm_id: str) -> Vm:
    """One VM of the tenant; ``NotFound`` when it has none by that id."""
    vm = tenant.vms.get(vm_id)
    if vm is None:
        raise NotFound("no such VM")
    return vm_view(vm)


def vm_page(tenant: TenantState, after: str | None, limit: int) -> tuple[list[Vm], str | None]:
    """Up to ``limit`` VMs with ids after ``after``, and the id to continue after (or None).

    Starts at ``after`` in the sorted index, so a page deep into a long list costs what
    the first one does.
    """
    vms = tenant.vms_after(after, limit + 1)
    page = [vm_view(vm) for vm in vms[:limit]]
    return page, (page[-1].id if len(vms) > limit else None)


def usage_view(tenant: TenantState) -> Usage:
    return Usage(tenant.id, tenant.quota, tenant.allocated)


def tenant_view(tenant: TenantState) -> Tenant:
    return Tenant(tenant.id, tenant.quota, tenant.allocated)
