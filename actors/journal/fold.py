"""The fold: how one audit entry changes the proxy's state. The only code that does.

Every durable change is an audit entry, so tenants, quotas, tokens, VM records,
allocations and idempotency records are rebuilt by applying the entries in order to an
empty :class:`~actors.state.ProxyState` (or to a snapshot's). :func:`apply` reads only the
fields an entry has before it is sequenced (``ts``, ``op``, ``outcome``, ``tenant``,
``vm``, ``source``, ``request_id``, ``detail``), never ``seq``, ``prev`` or ``hash``, so the
same call works on a *draft* (an entry not yet in the chain) and on a stored entry.

Who calls it, and when (the store decides, see ``actors/store/``):

- replay at start and snapshot compaction: every stored entry, in chain order;
- the running service: a *reserving* entry (:func:`reserves`: a ``requested`` operation, a
  ``rejected`` one that takes an ``Idempotency-Key``) the moment it is drafted, so the
  next decision sees the reservation; every other entry once it is durable, in chain
  order. A reserving draft that never becomes durable is taken back by :func:`undo`,
  which restores exactly what :func:`apply_to_tenant` changed, so the state is again the
  fold of the durable log. What a reserving entry does beyond its reservation
  (:func:`expire`: forgetting old idempotency records) waits until it is durable.

**Idempotency records are bounded.** A record is kept for every spawn with an
``Idempotency-Key``: its first answer, for replays. A spawn's record (in flight, or its
201) is kept for ``IDEMPOTENCY_TTL_SECONDS`` (24 hours) after the entry that made it,
and never forgotten while in flight, so a key whose first answer was a 201 can never
spawn again within that time. A quota refusal's record (403) is kept as long, but only
the newest ``MAX_REFUSALS`` of a tenant: refusals cost the tenant nothing, so without a
bound a full tenant retrying with fresh keys would grow memory without limit. Records
are forgotten when a new one is made, by the time of the entry making it (never the
clock of the process folding), so every replay forgets exactly the same ones.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

from actors.journal.entries import Entry
from actors.state import (
    IDEMPOTENCY_TTL_SECONDS,
    REFUSED,
    IdempotencyRecord,
    ProxyState,
    Quota,
    TenantSlice,
    TenantState,
    VmRecord,
)

#: quota refusal records kept per tenant (the newest; see the module docstring)
MAX_REFUSALS = 1000
#: how far past their 24 hours expired records may linger, so that they are swept in
#: batches rather than one by one (see TenantState.forget_keys)
SWEEP_GRACE_SECONDS = 3600


def quota_from(data: dict[str, Any]) -> Quota:
    return Quota(data["vcpus"], data["memory_mib"], data["vms"])


def spawn_response(vm: VmRecord, state: str) -> dict[str, Any]:
    """The body of a successful spawn, kept for idempotent replays."""
    return vm.to_json(state)


def refusal_answer(detail: dict[str, Any]) -> dict[str, Any] | None:
    """The problem a quota refusal answered, kept for idempotent replays.

    Its ``dimension`` is a member of the answer (API.md v1.1); the entry keeps it beside
    ``problem``, so entries written before it was a member replay the same answer.
    """
    problem = detail.get("problem")
    if problem is None or "dimension" not in detail:
        return problem
    return {**problem, "dimension": detail["dimension"]}


def reserves(entry: Entry) -> bool:
    """Whether the running service applies ``entry`` when it is drafted (see the module doc).

    A ``requested`` entry reserves capacity (spawn) or marks the VM (destroy); a
    ``rejected`` entry with an ``Idempotency-Key`` takes the key. Both must be seen by the
    tenant's next decision, before they are durable.
    """
    outcome = entry["outcome"]
    return outcome == "requested" or (
        outcome == "rejected" and "idempotency_key" in entry["detail"]
    )


def apply(state: ProxyState, entry: Entry) -> None:
    """Fold one audit entry into ``state`` (all of it: replay, and durable entries)."""
    op, outcome, detail = entry["op"], entry["outcome"], entry["detail"]
    tenant_id = entry["tenant"]
    if op == "tenant.create":
        if outcome == "succeeded":
            created = TenantState(tenant_id, quota_from(detail["quota"]))
            state.add_tenant(created, {detail["token_id"]})
        return
    tenant = state.tenants.get(tenant_id)
    if tenant is None:
        return
    succeeded = outcome == "succeeded"
    if op == "tenant.delete":
        if succeeded:
            state.remove_tenant(tenant_id)
    elif op == "token.issue":
        if succeeded:
            state.directory.add_token(tenant_id, detail["token_id"])
    elif op == "token.revoke":
        if succeeded:
            state.directory.remove_token(tenant_id, detail["token_id"])
    else:
        apply_to_tenant(tenant, entry)
        if remembers_key(entry):
            expire(tenant, entry)


def apply_to_tenant(tenant: TenantSlice, entry: Entry) -> None:
    """Fold one entry about a tenant's quota or VMs into that tenant's state.

    For a reserving entry (:func:`reserves`) this is the part the running service applies
    when the entry is drafted; :func:`expire` follows once it is durable. :func:`apply`
    does both.
    """
    op, outcome, detail = entry["op"], entry["outcome"], entry["detail"]
    if outcome == "rejected":
        _remember_key(tenant, entry, REFUSED, refusal_answer(detail))
    elif op == "vm.spawn":
        _apply_spawn(tenant, entry)
    elif op == "vm.destroy":
        _apply_destroy(tenant, entry)
    elif op == "tenant.update" and outcome == "succeeded":
        tenant.quota = quota_from(detail["quota"])


def undo(tenant: TenantSlice, entry: Entry) -> None:
    """Take back a reserving entry (:func:`reserves`) that never became durable.

    The decision that drafted it checked that the VM id was new (spawn), that the VM was
    settled (destroy) and that the key was free, and nothing changes a reserved VM or key
    until the entry is durable; so putting that back restores the state exactly.
    """
    detail = entry["detail"]
    if entry["outcome"] == "requested" and entry["op"] == "vm.destroy":
        tenant.set_vm_state(entry["vm"], detail["previous_state"])
        return
    if entry["outcome"] == "requested":
        tenant.remove_vm(entry["vm"])
    key = detail.get("idempotency_key")
    if key is not None:
        tenant.drop_key(key)


def remembers_key(entry: Entry) -> bool:
    """Whether ``entry`` makes an idempotency record (a keyed spawn's request or refusal)."""
    return entry["outcome"] in ("requested", "rejected") and "idempotency_key" in entry["detail"]


def expire(tenant: TenantSlice, entry: Entry) -> None:
    """Forget the tenant's idempotency records that ``entry``, a new one, retires.

    By ``entry``'s own time: settled records 24 hours older, and refusals beyond the
    newest :data:`MAX_REFUSALS`. The running service calls it for a durable reserving
    entry (:func:`undo` cannot bring forgotten records back); :func:`apply` for every
    entry that :func:`remembers_key`.
    """
    try:
        now = dt.datetime.fromisoformat(entry["ts"])
    except (TypeError, ValueError):
        return  # not a time this log writes: nothing to measure by
    before = now - dt.timedelta(seconds=IDEMPOTENCY_TTL_SECONDS)
    sweep = before - dt.timedelta(seconds=SWEEP_GRACE_SECONDS)
    tenant.forget_keys(_stamp(before), _stamp(sweep), MAX_REFUSALS)


def _stamp(moment: dt.datetime) -> str:
    """``moment`` as the audit's timestamps spell it (so that strings compare as times)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def vm_from_request(entry: Entry) -> VmRecord:
    """The VM record a ``vm.spawn`` ``requested`` entry reserves."""
    detail = entry["detail"]
    spec = detail["spec"]
    return VmRecord(
        id=entry["vm"],
        tenant=entry["tenant"],
        vcpus=spec["vcpus"],
        memory_mib=spec["memory_mib"],
        image=sys.intern(spec["image"]),
        name=spec.get("name"),
        created_at=detail["created_at"],
        state="spawning",
        idempotency_key=detail.get("idempotency_key"),
    )


def _apply_spawn(tenant: TenantSlice, entry: Entry) -> None:
    outcome, detail, vm_id = entry["outcome"], entry["detail"], entry["vm"]
    if outcome == "requested":
        tenant.add_vm(vm_from_request(entry))
        _remember_key(tenant, entry, 0, None)
    elif outcome == "succeeded":
        vm = tenant.vm(vm_id)
        if vm is not None:
            state = sys.intern(detail["state"])
            tenant.set_vm_state(vm_id, state, settled=True)
            if "idempotency_key" in detail:
                _settle_key(tenant, detail, 201, spawn_response(vm, state))
    elif outcome == "failed":
        tenant.remove_vm(vm_id)
        key = detail.get("idempotency_key")
        if key is not None:
            tenant.drop_key(key)


def _apply_destroy(tenant: TenantSlice, entry: Entry) -> None:
    outcome, detail, vm_id = entry["outcome"], entry["detail"], entry["vm"]
    vm = tenant.vm(vm_id)
    if vm is None:
        return
    if outcome == "requested":
        tenant.set_vm_state(vm_id, "destroying")
    elif outcome == "succeeded":
        tenant.remove_vm(vm_id)
    elif outcome == "failed":
        tenant.set_vm_state(vm_id, detail.get("state", vm.settled_state), settled=True)


def _remember_key(tenant: TenantSlice, entry: Entry, status: int, body: Any) -> None:
    detail = entry["detail"]
    key = detail.get("idempotency_key")
    if key is not None:
        tenant.set_key(key, IdempotencyRecord(detail["request_hash"], status, body, entry["ts"]))


def _settle_key(
    tenant: TenantSlice, detail: dict[str, Any], status: int, body: dict[str, Any]
) -> None:
    key = detail.get("idempotency_key")
    record = tenant.key(key) if key is not None else None
    if key is not None and record is not None:
        tenant.set_key(key, IdempotencyRecord(record.request_hash, status, body, record.created))
