"""The tenant's routes: spawn, list, inspect and destroy VMs; usage (tenant token)."""

from __future__ import annotations

import hashlib
import logging

import msgspec
from quart import g, request

from actors.errors import DomainError
from actors.journal.chain import canonical
from actors.service import Service
from actors.state import SETTLED_STATES, VmSpec
from actors.tenants.protocol import Destroy, Replay, Spawn
from actors.views import Destroyed, Usage, Vm
from server.auth import Authority
from server.problems import Problem
from server.responses import VmList
from server.routes.gates import Gates
from server.routes.spec import CURSOR, LIMIT, Operation, Param, Routes
from server.schemas import IDEMPOTENCY_KEY_RE, SpawnBody, parse_int, reject_unknown_params, single

log = logging.getLogger("vm_tenant.routes")

#: the routes take any id, also one holding an (encoded) slash: a destroy naming an id the
#: caller does not own is still a write refused, audited as ``rejected`` (API.md)
VM_ID = Param("id", "path", {"type": "string"}, variable="vm_id")
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "pattern": f"^{IDEMPOTENCY_KEY_RE.pattern}$"},
    "replays the first answer for 24 hours; another body answers 409",
)
#: a spawn or destroy goes through the tenant's actor and the fleet, and is audited
WRITE_PROBLEMS = ("rate_limited", "fleet_error", "fleet_unavailable", "audit_unavailable")


def tenant_routes(service: Service, authority: Authority, gates: Gates) -> Routes:
    """The tenant blueprint over a running core."""
    routes = Routes("tenant")
    registry, reads = service.registry, service.reads

    @routes.operation(
        Operation(
            "POST", "/v1/vms", "spawnVm", "vms", "Spawn a VM", "tenant", 201, Vm,
            ("quota_exceeded", "conflict", "idempotency_conflict", *WRITE_PROBLEMS),
            params=(IDEMPOTENCY_KEY,), request=SpawnBody,
            headers={"Location": "the new VM", "Idempotent-Replayed": "`true` on a replay"},
            audited=True,
        )
    )  # fmt: skip
    async def spawn_vm() -> tuple[Vm, dict[str, str]]:
        tenant = gates.tenant()
        gates.no_params()
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise Problem("invalid_request", "Idempotency-Key must be 1..255 printable ASCII")
        with registry.limits.of(tenant).spawn_slot():
            body = await gates.body(SpawnBody)
            spec = VmSpec(body.vcpus, body.memory_mib, body.image, body.name)
            digest = None
            if key is not None:
                digest = hashlib.sha256(canonical(msgspec.structs.asdict(body))).hexdigest()
            source = gates.source()
            result: Vm | Replay = await registry.call(
                tenant,
                lambda reply: Spawn(spec, key, digest, source, g.request_id, reply),
                g.receipt,
            )
        if isinstance(result, Replay):
            replayed = {"Idempotent-Replayed": "true"}
            if result.status != 201:
                answer = result.body
                dimension = answer.get("dimension")  # a quota refusal's (fold.refusal_answer)
                raise Problem(answer["code"], answer["detail"], replayed, dimension=dimension)
            vm = msgspec.convert(result.body, Vm)
            return vm, {"Location": f"/v1/vms/{vm.id}", **replayed}
        return result, {"Location": f"/v1/vms/{result.id}"}

    @routes.operation(
        Operation(
            "GET", "/v1/vms", "listVms", "vms", "List the caller's VMs", "tenant", 200, VmList,
            params=(LIMIT, CURSOR),
        )
    )  # fmt: skip
    async def list_vms() -> VmList:
        tenant = gates.tenant()
        reject_unknown_params(request.args, {"limit", "cursor"})
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        cursor = single(request.args, "cursor")
        after = authority.read_cursor(tenant, cursor) if cursor is not None else None
        page, last = await reads.vms(tenant, after, limit)
        return VmList(page, authority.cursor(tenant, last) if last is not None else None)

    @routes.operation(
        Operation(
            "GET", "/v1/vms/<path:vm_id>", "getVm", "vms", "A VM, with its live state",
            "tenant", 200, Vm, ("not_found",), params=(VM_ID,),
        )
    )  # fmt: skip
    async def get_vm(vm_id: str) -> Vm:
        tenant = gates.tenant()
        gates.no_params()
        vm = await reads.vm(tenant, vm_id)
        if vm.state in SETTLED_STATES:
            try:
                live = await service.fleet.status(vm_id)
            except DomainError:
                live = None
            if live is not None and live != vm.state:
                vm = msgspec.structs.replace(vm, state=live)
                try:
                    # what the fleet said is what the list and the metrics show from now on
                    # (recorded only when it changed: on PostgreSQL a record is a write)
                    await service.store.record_fleet_states(tenant, {vm_id: live})
                except DomainError as error:
                    # the answer stands: the next sweep records it
                    log.debug("live state of %s not recorded: %s", vm_id, error)
        return vm

    @routes.operation(
        Operation(
            "DELETE", "/v1/vms/<path:vm_id>", "destroyVm", "vms", "Destroy a VM", "tenant", 200,
            Destroyed, ("not_found", "conflict", *WRITE_PROBLEMS), params=(VM_ID,),
            audited=True,
        )
    )  # fmt: skip
    async def destroy_vm(vm_id: str) -> Destroyed:
        tenant = gates.tenant()
        gates.no_params()
        source = gates.source()
        result: Destroyed = await registry.call(
            tenant, lambda reply: Destroy(vm_id, source, g.request_id, reply), g.receipt
        )
        return result

    @routes.operation(
        Operation(
            "GET", "/v1/usage", "getUsage", "vms", "Quota and allocation", "tenant", 200, Usage
        )
    )
    async def usage() -> Usage:
        tenant = gates.tenant()
        gates.no_params()
        return await reads.usage(tenant)

    return routes
