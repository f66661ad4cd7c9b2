"""The fold: how one durable audit entry changes the proxy's state.

Every durable change is an audit entry, so tenants, quotas, tokens, VM records,
allocations and idempotency records are rebuilt by applying the entries in order to an
empty :class:`~actors.state.ProxyState` (or to a snapshot's). The same :func:`apply` runs
at start (replay) and when a snapshot is compacted, so the two can never disagree.
"""

from __future__ import annotations

import sys
from typing import Any

from actors.state import IdempotencyRecord, ProxyState, Quota, TenantState, VmRecord


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
