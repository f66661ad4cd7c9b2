"""The tenant actor: sole owner of one tenant's quota, VM records and allocation.

Its mailbox is a bounded Trio memory channel and it handles one message at a time, so
the check-and-reserve of capacity is atomic without a lock: two concurrent spawns can
never both pass against the same total. A turn is only in-memory work plus a
non-blocking audit ``submit``; the waiting (for the fsync, for the fleet) happens in
*jobs*, tasks in the actor's own nursery that report back through the mailbox. So a busy
tenant pipelines its spawns through the writer's group commit, and a slow fleet stalls
neither other tenants nor this tenant's reads.

Capacity is reserved before the ``requested`` entry is written and released only when the
fleet confirms a destroy or a spawn definitely failed. Every window errs on the safe side:
a VM that may exist is never released from the quota.

:meth:`TenantActor.run` is the supervisor: it owns the mailbox and the jobs, restarts the
message loop after a crash (bounded: more than ``MAX_RESTARTS`` in ``RESTART_PERIOD``
seconds marks the actor failed, cancels its jobs and answers everything queued), and
answers the caller of the message that crashed it. The jobs themselves live in
``actors/tenants/jobs.py``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from typing import Any

import outcome
import trio

from actors.errors import (
    AuditUnavailable,
    Busy,
    Conflict,
    DomainError,
    FleetUnavailable,
    IdempotencyConflict,
    InternalError,
    NotFound,
    QuotaExceeded,
)
from actors.fleet.client import FleetClient
from actors.journal.writer import SYSTEM_SOURCE, AuditTicket, AuditWriter, utc_now
from actors.reply import send_reply
from actors.state import IN_DOUBT_STATES, IdempotencyRecord, TenantState, VmRecord, VmSpec
from actors.tenants.jobs import TenantJobs
from actors.tenants.protocol import (
    WRITE_COMMANDS,
    ApplyOutcome,
    Destroy,
    ForgetKey,
    GetUsage,
    GetVm,
    ListVms,
    MarkInDoubt,
    QuotaApplied,
    RecordOutcome,
    Reopen,
    Replay,
    Retire,
    Rollback,
    Settle,
    Source,
    Spawn,
    TenantMessage,
    UpdateQuota,
)
from actors.tenants.views import usage_view, vm_page, vm_view

log = logging.getLogger("vm_tenant.tenant")

MAX_RESTARTS = 5
RESTART_PERIOD = 10.0
SYSTEM = Source(SYSTEM_SOURCE["ip"], SYSTEM_SOURCE["token_id"])
#: the longest VM id written to the audit log as given; longer ones are cut
MAX_LOGGED_ID = 128


def new_vm_id() -> str:
    """Unguessable (80 random bits), unique, and roughly ordered by creation time."""
    return f"vm-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def quota_problem(tenant: TenantState, dimension: str, spec: VmSpec) -> str:
    asked = {"vms": 1, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib}[dimension]
    allocated = getattr(tenant.allocated, dimension)
    ceiling = getattr(tenant.quota, dimension)
    return (
        f"spawning would exceed the {dimension} quota: "
        f"{allocated} allocated + {asked} requested > {ceiling}"
    )


class TenantActor:
    """One tenant's actor: a supervised message loop plus the jobs it started."""

    def __init__(
        self,
        state: TenantState,
        audit: AuditWriter,
        fleet: FleetClient,
        *,
        mailbox_size: int = 256,
        reconcile_backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.state = state
        self.audit = audit
        self.fleet = fleet
        self.failed = False
        self.restarts = 0
        self.closing = False
        self.inbox, self._receive = trio.open_memory_channel[TenantMessage](mailbox_size)
        # Jobs report through clones of this end, which the registry never sees, so the
        # registry closing ``inbox`` cannot cut a job off from its actor.
        self._internal = self.inbox.clone()
        self._stopping: DomainError | None = None
        self._quota_seq = 0
        self._jobs = TenantJobs(state.id, fleet, SYSTEM, reconcile_backoff)
        self._nursery: trio.Nursery | None = None
        self._current: TenantMessage | None = None
        #: when the last message was taken (trio clock), for passivation
        self.last_active = 0.0

    @property
    def tenant_id(self) -> str:
        return self.state.id

    def stop(self, error: DomainError) -> None:
        """Take no more commands (queued ones are answered ``error``); jobs finish.

        The loop ends once the last job has reported back.
        """
        if self._stopping is None:
            self._stopping = error
            self.inbox.close()
            self._internal.close()

    # -- supervision ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped and every job has finished."""
        recent: deque[float] = deque()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.last_active = trio.current_time()
            for vm in list(self.state.vms.values()):
                if vm.state in IN_DOUBT_STATES:
                    self._start_reconcile(vm)
            task_status.started()
            with self._receive:
                while True:
                    try:
                        await self._loop()
                        break
                    except Exception as error:
                        if self._crashed(error, recent):
                            nursery.cancel_scope.cancel()
                            break

    def _crashed(self, error: Exception, recent: deque[float]) -> bool:
        """Handle a crash of the loop; True when the restart budget is spent."""
        log.exception("tenant actor %s crashed", self.tenant_id, exc_info=error)
        message, self._current = self._current, None
        reply = getattr(message, "reply", None)
        send_reply(reply, outcome.Error(InternalError("internal error while handling request")))
        now = trio.current_time()
        recent.append(now)
        while recent and recent[0] < now - RESTART_PERIOD:
            recent.popleft()
        self.restarts += 1
        if len(recent) <= MAX_RESTARTS:
            return False
        self.failed = True
        log.error("tenant actor %s failed too often; replacing it", self.tenant_id)
        self.stop(InternalError("the tenant actor is restarting"))
        # Answer everything still queued: its callers must not wait for a dead loop.
        while True:
            try:
                queued = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            unavailable = InternalError("the tenant actor is restarting")
            send_reply(getattr(queued, "reply", None), outcome.Error(unavailable))
        return True

    async def _loop(self) -> None:
        async for message in self._receive:
            self.last_active = trio.current_time()
            self._current = message
            if self._stopping is not None and isinstance(message, WRITE_COMMANDS):
                send_reply(message.reply, outcome.Error(self._stopping))
            else:
                self._handle(message)
            self._current = None

    def passivate_if_idle(self, idle_since: float) -> bool:
        """End the actor if it took no message since ``idle_since`` and has nothing pending.

        Synchronous, so nothing can reach the mailbox between the checks and the close.
        The loop must be parked in ``receive`` with an empty buffer: a message handed
        straight to a waiting receiver has left the buffer but not been handled yet.
        The caller forgets the actor when this returns True; its state is not touched.
        """
        stats = self._receive.statistics()
        if (
            self.last_active > idle_since
            or self.closing
            or self._stopping is not None
            or self._nursery is None
            or self._nursery.child_tasks
            or stats.current_buffer_used
            or stats.tasks_waiting_receive != 1
        ):
            return False
        self._stopping = Busy("the tenant actor was passivated")
        self.inbox.close()
        self._internal.close()
        return True

    def _handle(self, message: TenantMessage) -> None:
        match message:
            case Spawn():
                self._spawn(message)
            case Destroy():
                self._destroy(message)
            case GetVm(vm_id, reply):
                send_reply(reply, outcome.capture(vm_view, self.state, vm_id))
            case ListVms(after, limit, reply):
                send_reply(reply, outcome.Value(vm_page(self.state, after, limit)))
            case GetUsage(reply):
                send_reply(reply, outcome.Value(usage_view(self.state)))
            case UpdateQuota():
                self._update_quota(message)
            case QuotaApplied(quota, seq, reply):
                if seq > self._quota_seq:
                    self.state.quota, self._quota_seq = quota, seq
                send_reply(reply, outcome.Value(usage_view(self.state)))
            case Retire(reply):
                if self.closing:
                    send_reply(reply, outcome.Error(Conflict("the tenant is being deleted")))
                elif self.state.vms:
                    send_reply(reply, outcome.Error(Conflict("the tenant still has VMs")))
                else:
                    self.closing = True
                    send_reply(reply, outcome.Value(None))
            case Reopen():
                self.closing = False
            case RecordOutcome(settle, reply):
                send_reply(reply, self._record_outcome(settle))
            case ApplyOutcome(settle, reply):
                send_reply(reply, outcome.Value(self._apply_outcome(settle)))
            case Rollback():
                self._rollback(message)
            case MarkInDoubt(vm_id, kind):
                vm = self.state.vms.get(vm_id)
                if vm is not None:
                    vm.state, vm.doubt = "unknown", kind
            case ForgetKey(key):
                self.state.idempotency.pop(key, None)

    def _refuse_write(self) -> DomainError | None:
        if self.closing:
            return Conflict("the tenant is being deleted")
        if not self.fleet.accepting():
            return FleetUnavailable("the fleet is unreachable right now; try again shortly")
        return None

    def _submit(
        self, op: str, outcome_: str, vm: str | None, source: Source, request_id: str | None,
        detail: dict[str, Any],
    ) -> AuditTicket:  # fmt: skip
        return self.audit.submit(
            op=op,
            outcome=outcome_,
            tenant=self.state.id,
            vm=vm,
            source=source.to_json(),
            request_id=request_id,
            detail=detail,
        )

    def _start(self, job: Any, *args: Any) -> None:
        assert self._nursery is not None
        # Each job holds its own clone of the internal inbox so the loop only ends once
        # the last job has reported back.
        self._nursery.start_soon(self._guarded, job, self._internal.clone(), *args)

    async def _guarded(self, job: Any, inbox: trio.MemorySendChannel[Any], *args: Any) -> None:
        """Run one job; its failure is logged, never allowed to take the actor down."""
        with inbox:
            try:
                await job(inbox, *args)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("tenant actor %s stopped before a job could report", self.tenant_id)
            except Exception:
                log.exception("a job of tenant actor %s failed", self.tenant_id)

    # -- spawn -------------------------------------------------------------------------------

    def _spawn(self, msg: Spawn) -> None:
        tenant, spec, key = self.state, msg.spec, msg.idempotency_key
        if key is not None and key in tenant.idempotency:
            record = tenant.idempotency[key]
            if record.request_hash != msg.request_hash:
                error: DomainError = IdempotencyConflict(
                    "this Idempotency-Key was used with a different request body"
                )
            elif record.status == 0 or record.body is None:
                error = Conflict("a request with this Idempotency-Key is still in progress")
            else:
                send_reply(msg.reply, outcome.Value(Replay(record.status, record.body)))
                return
            send_reply(msg.reply, outcome.Error(error))
            return
        if refusal := self._refuse_write():
            send_reply(msg.reply, outcome.Error(refusal))
            return
        key_detail = (
            {} if key is None else {"idempotency_key": key, "request_hash": msg.request_hash}
        )
        spec_detail = {
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "image": spec.image,
            "name": spec.name,
        }
        dimension = tenant.over_quota(spec.vcpus, spec.memory_mib)
        if dimension is not None:
            text = quota_problem(tenant, dimension, spec)
            problem = {"code": "quota_exceeded", "detail": text}
            detail = {
                "reason": "quota_exceeded",
                "dimension": dimension,
                "spec": spec_detail,
                "problem": problem,
                **key_detail,
            }
            try:
                ticket = self._submit(
                    "vm.spawn", "rejected", None, msg.source, msg.request_id, detail
                )
            except AuditUnavailable as exc:
                send_reply(msg.reply, outcome.Error(exc))
                return
            if key is not None:
                tenant.idempotency[key] = IdempotencyRecord(
                    msg.request_hash or "", 403, problem, utc_now()
                )
            self._start(self._jobs.rejected, ticket, QuotaExceeded(dimension, text), key, msg.reply)
            return
        vm = VmRecord(
            id=new_vm_id(),
            tenant=tenant.id,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            image=spec.image,
            name=spec.name,
            created_at=utc_now(),
            state="spawning",
            idempotency_key=key,
        )
        detail = {"spec": spec_detail, "created_at": vm.created_at, **key_detail}
        try:
            ticket = self._submit(
                "vm.spawn", "requested", vm.id, msg.source, msg.request_id, detail
            )
        except AuditUnavailable as exc:
            send_reply(msg.reply, outcome.Error(exc))
            return
        tenant.add_vm(vm)
        if key is not None:
            tenant.idempotency[key] = IdempotencyRecord(
                msg.request_hash or "", 0, None, vm.created_at
            )
        self._start(
            self._jobs.operate, ticket, vm.id, spec, None, msg.source, msg.request_id, msg.reply
        )

    # -- destroy -------------------------------------------------------------------------------

    def _destroy(self, msg: Destroy) -> None:
        vm = self.state.vms.get(msg.vm_id)
        if vm is None:
            logged, detail = msg.vm_id, {"reason": "not_found"}
            if len(logged) > MAX_LOGGED_ID:
                logged, detail["vm_id_truncated"] = logged[:MAX_LOGGED_ID], True
            try:
                ticket = self._submit(
                    "vm.destroy", "rejected", logged, msg.source, msg.request_id, detail
                )
            except AuditUnavailable as exc:
                send_reply(msg.reply, outcome.Error(exc))
                return
            self._start(self._jobs.rejected, ticket, NotFound("no such VM"), None, msg.reply)
            return
        if vm.state in IN_DOUBT_STATES:
            what = {
                "destroying": "is already being destroyed",
                "spawning": "is still being spawned",
            }.get(vm.state, "has an operation in doubt that is being reconciled")
            send_reply(msg.reply, outcome.Error(Conflict(f"the VM {what}")))
            return
        if refusal := self._refuse_write():
            send_reply(msg.reply, outcome.Error(refusal))
            return
        detail = {"previous_state": vm.state}
        try:
            ticket = self._submit(
                "vm.destroy", "requested", vm.id, msg.source, msg.request_id, detail
            )
        except AuditUnavailable as exc:
            send_reply(msg.reply, outcome.Error(exc))
            return
        previous, vm.state = vm.state, "destroying"
        self._start(
            self._jobs.operate, ticket, vm.id, None, previous, msg.source, msg.request_id, msg.reply
        )

    # -- outcomes ------------------------------------------------------------------------------

    def _record_outcome(self, settle: Settle) -> outcome.Outcome[Any]:
        """Submit the outcome entry of a settled operation; nothing changes yet."""
        vm = self.state.vms.get(settle.vm_id)
        if vm is None:
            return outcome.Error(NotFound("no such VM"))
        detail: dict[str, Any] = {}
        if settle.kind == "spawn" and vm.idempotency_key is not None:
            detail["idempotency_key"] = vm.idempotency_key
        if not settle.ok:
            detail["reason"] = settle.reason
        if settle.kind == "spawn" and settle.ok:
            detail["state"] = settle.state
        if settle.kind == "destroy" and not settle.ok:
            detail["state"] = settle.state or vm.settled_state
        if settle.source is SYSTEM:
            detail["resolution"] = "reconciled"
        result = "succeeded" if settle.ok else "failed"
        op = f"vm.{settle.kind}"
        try:
            ticket = self._submit(op, result, vm.id, settle.source, settle.request_id, detail)
        except AuditUnavailable as exc:
            return outcome.Error(exc)
        return outcome.Value(ticket)

    def _apply_outcome(self, settle: Settle) -> dict[str, Any] | None:
        """Apply an outcome whose entry is durable, exactly as the fold in state.py does."""
        tenant = self.state
        vm = tenant.vms.get(settle.vm_id)
        if vm is None:
            return None
        key = vm.idempotency_key
        if settle.kind == "spawn" and settle.ok:
            vm.state = vm.settled_state = settle.state or "pending"
            vm.doubt = None
            record = tenant.idempotency.get(key) if key is not None else None
            if key is not None and record is not None:
                tenant.idempotency[key] = IdempotencyRecord(
                    record.request_hash, 201, vm.to_json(), record.created
                )
            return vm.to_json()
        if settle.kind == "spawn":
            tenant.remove_vm(vm.id)
            if key is not None:
                tenant.idempotency.pop(key, None)
            return None
        if settle.ok:
            tenant.remove_vm(vm.id)
            return {"id": vm.id, "state": "destroyed"}
        vm.state = vm.settled_state = settle.state or vm.settled_state
        vm.doubt = None
        return None

    def _rollback(self, msg: Rollback) -> None:
        vm = self.state.vms.get(msg.vm_id)
        if vm is None:
            return
        if msg.kind == "spawn":
            self.state.remove_vm(vm.id)
            if vm.idempotency_key is not None:
                self.state.idempotency.pop(vm.idempotency_key, None)
        else:
            vm.state = msg.previous_state or vm.settled_state

    def _start_reconcile(self, vm: VmRecord) -> None:
        spawning = vm.state == "spawning" or (vm.state == "unknown" and vm.doubt == "spawn")
        spec = VmSpec(vm.vcpus, vm.memory_mib, vm.image, vm.name) if spawning else None
        self._start(self._jobs.reconcile, vm.id, spec)

    # -- quota -------------------------------------------------------------------------------

    def _update_quota(self, msg: UpdateQuota) -> None:
        if self.closing:
            send_reply(msg.reply, outcome.Error(Conflict("the tenant is being deleted")))
            return
        detail = {"quota": msg.quota.to_json(), "previous": self.state.quota.to_json()}
        try:
            ticket = self._submit(
                "tenant.update", "succeeded", None, msg.source, msg.request_id, detail
            )
        except AuditUnavailable as exc:
            send_reply(msg.reply, outcome.Error(exc))
            return
        self._start(self._jobs.quota, ticket, msg.quota, msg.reply)
