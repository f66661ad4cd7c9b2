"""What a tenant's commands decide: pure functions of the tenant's state and the command.

A decision never changes anything and never waits. It looks at the state (quota,
allocation, VM records, idempotency records) and the command, and says one of:

- :class:`Answer`: answer now, write nothing (a replayed key, a VM still in flight);
- :class:`Refuse`: write a ``rejected`` entry, then refuse (a quota refusal, an unknown VM);
- :class:`Operate`: write a ``requested`` entry, then carry out the VM operation;
- :class:`Record`: write an entry that takes effect once durable (a quota change).

The store runs the decision against the tenant's state and makes its entry durable
(``actors/store/``): with the file store that is the state in memory and the audit
writer, with a database a write behind a compare-and-set of the tenant's row. The same
functions run in both, and the state changes only through the fold of the entry.

Also here: :func:`outcome_entry`, the entry that settles an operation.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import outcome

from actors.errors import (
    Conflict,
    DomainError,
    FleetUnavailable,
    IdempotencyConflict,
    NotFound,
    QuotaExceeded,
)
from actors.journal.entries import SYSTEM_SOURCE, Entry, draft, utc_now
from actors.journal.fold import vm_from_request
from actors.state import IN_DOUBT_STATES, TenantSlice, VmRecord, VmSpec
from actors.tenants.protocol import Destroy, Replay, Source, Spawn, UpdateQuota

#: the longest VM id written to the audit log as given; longer ones are cut
MAX_LOGGED_ID = 128

SYSTEM = Source(SYSTEM_SOURCE["ip"], SYSTEM_SOURCE["token_id"])


def new_vm_id() -> str:
    """Unguessable (80 random bits), unique, and roughly ordered by creation time."""
    return f"vm-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision needs besides the state: the actor's and the fleet's condition, and
    where time and new VM ids come from."""

    #: the tenant is being deleted: writes are refused
    closing: bool = False
    #: the fleet takes calls (its circuit is closed): otherwise reserve nothing
    accepting: bool = True
    now: Callable[[], str] = utc_now
    new_vm_id: Callable[[], str] = new_vm_id


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer at once; nothing is written."""

    result: outcome.Outcome[Any]
    entry: None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Write the ``rejected`` entry; once it is durable, answer ``error``."""

    entry: Entry
    error: DomainError


@dataclass(frozen=True, slots=True)
class Operation:
    """A VM operation for the fleet, with what settling it needs."""

    kind: str  # "spawn" or "destroy"
    tenant: str
    vm_id: str
    #: spawn: what to create, and the VM as drafted (its answer is this VM)
    spec: VmSpec | None = None
    vm: VmRecord | None = None
    #: spawn: the Idempotency-Key it carries
    key: str | None = None
    #: destroy: the state the VM is back in if the fleet refuses
    previous_state: str | None = None

    @classmethod
    def in_doubt(cls, vm: VmRecord) -> Operation:
        """The operation a VM left in doubt is waiting for (see ``IN_DOUBT_STATES``)."""
        if vm.state == "spawning" or (vm.state == "unknown" and vm.doubt == "spawn"):
            spec = VmSpec(vm.vcpus, vm.memory_mib, vm.image, vm.name)
            return cls("spawn", vm.tenant, vm.id, spec, vm, vm.idempotency_key)
        return cls("destroy", vm.tenant, vm.id, previous_state=vm.settled_state)


@dataclass(frozen=True, slots=True)
class Operate:
    """Write the ``requested`` entry; once it is durable, carry out ``operation``."""

    entry: Entry
    operation: Operation


@dataclass(frozen=True, slots=True)
class Record:
    """Write the entry; it takes effect once durable (in chain order)."""

    entry: Entry


Decision = Answer | Refuse | Operate | Record


def _refuse_write(ctx: Context) -> DomainError | None:
    if ctx.closing:
        return Conflict("the tenant is being deleted")
    if not ctx.accepting:
        return FleetUnavailable("the fleet is unreachable right now; try again shortly")
    return None


def over_quota(tenant: TenantSlice, spec: VmSpec) -> str | None:
    """The first dimension a spawn of ``spec`` would push above the quota, if any."""
    quota, allocated = tenant.quota, tenant.allocated
    if allocated.vms + 1 > quota.vms:
        return "vms"
    if allocated.vcpus + spec.vcpus > quota.vcpus:
        return "vcpus"
    if allocated.memory_mib + spec.memory_mib > quota.memory_mib:
        return "memory_mib"
    return None


def quota_problem(tenant: TenantSlice, dimension: str, spec: VmSpec) -> str:
    asked = {"vms": 1, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib}[dimension]
    allocated = getattr(tenant.allocated, dimension)
    ceiling = getattr(tenant.quota, dimension)
    return (
        f"spawning would exceed the {dimension} quota: "
        f"{allocated} allocated + {asked} requested > {ceiling}"
    )


def decide_spawn(tenant: TenantSlice, cmd: Spawn, ctx: Context) -> Decision:
    """Replay or refuse a reused key, refuse over quota, or reserve the capacity."""
    spec, key = cmd.spec, cmd.idempotency_key
    if key is not None and (record := tenant.key(key)) is not None:
        if record.request_hash != cmd.request_hash:
            return Answer(
                outcome.Error(
                    IdempotencyConflict(
                        "this Idempotency-Key was used with a different request body"
                    )
                )
            )
        if record.status == 0 or record.body is None:
            error = Conflict("a request with this Idempotency-Key is still in progress")
            return Answer(outcome.Error(error))
        return Answer(outcome.Value(Replay(record.status, record.body)))
    if refusal := _refuse_write(ctx):
        return Answer(outcome.Error(refusal))
    key_detail = {} if key is None else {"idempotency_key": key, "request_hash": cmd.request_hash}
    spec_detail = {
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "image": spec.image,
        "name": spec.name,
    }
    now = ctx.now()
    source = cmd.source.to_json()
    dimension = over_quota(tenant, spec)
    if dimension is not None:
        text = quota_problem(tenant, dimension, spec)
        detail = {
            "reason": "quota_exceeded",
            "dimension": dimension,
            "spec": spec_detail,
            "problem": {"code": "quota_exceeded", "detail": text},
            **key_detail,
        }
        entry = draft("vm.spawn", "rejected", tenant.id, None, source, cmd.request_id, detail, now)
        return Refuse(entry, QuotaExceeded(dimension, text))
    detail = {"spec": spec_detail, "created_at": now, **key_detail}
    vm_id = ctx.new_vm_id()
    entry = draft("vm.spawn", "requested", tenant.id, vm_id, source, cmd.request_id, detail, now)
    vm = vm_from_request(entry)
    return Operate(entry, Operation("spawn", tenant.id, vm_id, spec, vm, key))


def decide_destroy(tenant: TenantSlice, cmd: Destroy, ctx: Context) -> Decision:
    """Refuse an unknown VM (audited), refuse one in flight, or mark it ``destroying``."""
    source = cmd.source.to_json()
    vm = tenant.vm(cmd.vm_id)
    if vm is None:
        logged = cmd.vm_id
        detail: dict[str, Any] = {"reason": "not_found"}
        if len(logged) > MAX_LOGGED_ID:
            logged, detail["vm_id_truncated"] = logged[:MAX_LOGGED_ID], True
        entry = draft("vm.destroy", "rejected", tenant.id, logged, source, cmd.request_id, detail)
        return Refuse(entry, NotFound("no such VM"))
    if vm.state in IN_DOUBT_STATES:
        what = {
            "destroying": "is already being destroyed",
            "spawning": "is still being spawned",
        }.get(vm.state, "has an operation in doubt that is being reconciled")
        return Answer(outcome.Error(Conflict(f"the VM {what}")))
    if refusal := _refuse_write(ctx):
        return Answer(outcome.Error(refusal))
    detail = {"previous_state": vm.state}
    entry = draft("vm.destroy", "requested", tenant.id, vm.id, source, cmd.request_id, detail)
    return Operate(entry, Operation("destroy", tenant.id, vm.id, previous_state=vm.state))


def decide_quota(tenant: TenantSlice, cmd: UpdateQuota, ctx: Context) -> Decision:
    """A new quota, applied once durable: an unacknowledged raise never admits a spawn."""
    if ctx.closing:
        return Answer(outcome.Error(Conflict("the tenant is being deleted")))
    detail = {"quota": cmd.quota.to_json(), "previous": tenant.quota.to_json()}
    source = cmd.source.to_json()
    return Record(
        draft("tenant.update", "succeeded", tenant.id, None, source, cmd.request_id, detail)
    )


def outcome_entry(
    operation: Operation,
    ok: bool,
    state: str | None,
    reason: str,
    source: Source,
    request_id: str | None,
    resolution: str | None = None,
) -> Entry:
    """The entry that settles ``operation``: the fleet's definite answer.

    ``ok`` False is a definite refusal; ``state`` is the fleet's VM state after a spawn,
    or the state a VM is back in after a refused destroy (None: as it was before).
    ``resolution`` says why the proxy records it itself: ``reconciled`` (the fleet was
    asked again) or ``recorded_late`` (its answer came back, its record could not be
    made durable at once).
    """
    spawn = operation.kind == "spawn"
    detail: dict[str, Any] = {}
    if spawn and operation.key is not None:
        detail["idempotency_key"] = operation.key
    if not ok:
        detail["reason"] = reason
    if spawn and ok:
        detail["state"] = state
    if not spawn and not ok:
        detail["state"] = state or operation.previous_state
    if resolution is not None:
        detail["resolution"] = resolution
    return draft(
        f"vm.{operation.kind}",
        "succeeded" if ok else "failed",
        operation.tenant,
        operation.vm_id,
        source.to_json(),
        request_id,
        detail,
    )
