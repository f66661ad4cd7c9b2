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
seconds marks the actor failed), and answers the caller of the message that crashed it.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import deque
from typing import Any

import outcome
import trio

from actors.audit import SYSTEM_SOURCE, AuditTicket, AuditWriter, utc_now
from actors.errors import (
    AuditUnavailable,
    Conflict,
    DomainError,
    FleetError,
    FleetUnavailable,
    IdempotencyConflict,
    NotFound,
    QuotaExceeded,
)
from actors.fleet import FleetBusy, FleetClient, FleetInDoubt, VmSpec
from actors.messages import (
    Destroy,
    DestroySettled,
    ForgetKey,
    GetUsage,
    GetVm,
    ListVms,
    MarkInDoubt,
    QuotaApplied,
    Reopen,
    Replay,
    Reply,
    Retire,
    Source,
    Spawn,
    SpawnSettled,
    TenantMessage,
    UpdateQuota,
    send_reply,
)
from actors.state import IN_DOUBT_STATES, IdempotencyRecord, TenantState, VmRecord

log = logging.getLogger("vm_tenant.tenant")

MAX_RESTARTS = 5
RESTART_PERIOD = 10.0
SYSTEM = Source(SYSTEM_SOURCE["ip"], SYSTEM_SOURCE["token_id"])


class InternalError(DomainError):
    """The actor hit a bug while handling this request (never caused by input alone)."""


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
        reconcile_backoff: float = 0.5,
        reconcile_backoff_max: float = 30.0,
    ) -> None:
        self.state = state
        self.audit = audit
        self.fleet = fleet
        self.failed = False
        self.restarts = 0
        self.closing = False
        self._backoff = (reconcile_backoff, reconcile_backoff_max)
        self.inbox, self._receive = trio.open_memory_channel[TenantMessage](mailbox_size)
        self._jobs: trio.Nursery | None = None
        self._current: TenantMessage | None = None

    @property
    def tenant_id(self) -> str:
        return self.state.id

    def mailbox_depth(self) -> int:
        return self._receive.statistics().current_buffer_used

    # -- supervision ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the inbox is closed and every job has finished."""
        recent: deque[float] = deque()
        async with trio.open_nursery() as jobs:
            self._jobs = jobs
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
        if len(recent) > MAX_RESTARTS:
            self.failed = True
            log.error("tenant actor %s failed too often; stopping it", self.tenant_id)
            # Answer everything still queued: its callers must not wait for a dead loop.
            while True:
                try:
                    queued = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                unavailable = InternalError("the tenant actor is restarting")
                send_reply(getattr(queued, "reply", None), outcome.Error(unavailable))
            return True
        return False

    async def _loop(self) -> None:
        async for message in self._receive:
            self._current = message
            self._handle(message)
            self._current = None

    def _handle(self, message: TenantMessage) -> None:
        match message:
            case Spawn():
                self._spawn(message)
            case Destroy():
                self._destroy(message)
            case GetVm(vm_id, reply):
                vm = self.state.vms.get(vm_id)
                result = NotFound("no such VM") if vm is None else vm.to_json()
                send_reply(reply, _wrap(result))
            case ListVms(after, limit, reply):
                send_reply(reply, outcome.Value(self._list(after, limit)))
            case GetUsage(reply):
                send_reply(reply, outcome.Value(self._usage()))
            case UpdateQuota():
                self._update_quota(message)
            case QuotaApplied(quota, reply):
                self.state.quota = quota
                send_reply(reply, outcome.Value(self._usage()))
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
            case ForgetKey(key):
                self.state.idempotency.pop(key, None)
            case SpawnSettled():
                self._spawn_settled(message)
            case DestroySettled():
                self._destroy_settled(message)
            case MarkInDoubt(vm_id):
                vm = self.state.vms.get(vm_id)
                if vm is not None:
                    vm.state = "unknown"

    def _usage(self) -> dict[str, Any]:
        return {
            "tenant": self.state.id,
            "quota": self.state.quota.to_json(),
            "allocated": self.state.allocated.to_json(),
        }

    def _list(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        ids = self.state.vms.irange(minimum=after, inclusive=(False, False))
        page: list[dict[str, Any]] = []
        for vm_id in ids:
            if len(page) == limit:
                return page, page[-1]["id"]
            page.append(self.state.vms[vm_id].to_json())
        return page, None

    def _submit(
        self,
        op: str,
        outcome_: str,
        vm: str | None,
        source: Source,
        request_id: str | None,
        detail: dict[str, Any],
    ) -> AuditTicket:
        return self.audit.submit(
            op=op,
            outcome=outcome_,
            tenant=self.state.id,
            vm=vm,
            source=source.to_json(),
            request_id=request_id,
            detail=detail,
        )

    def _try_submit(
        self, op: str, outcome_: str, msg: SpawnSettled | DestroySettled, detail: dict[str, Any]
    ) -> AuditTicket | None:
        """Submit an outcome entry; None (logged) when the writer refuses it.

        An outcome that cannot be recorded stays true in memory: the fleet did what it
        did, and a restart resolves the ``requested`` entry against the fleet the same way.
        """
        try:
            return self._submit(op, outcome_, msg.vm_id, msg.source, msg.request_id, detail)
        except AuditUnavailable as exc:
            log.warning("outcome of %s on %s not recorded: %s", op, msg.vm_id, exc)
            return None

    def _start(self, job: Any, *args: Any) -> None:
        assert self._jobs is not None
        # Each job holds its own clone of the inbox so the loop only ends once the last
        # job has reported back.
        self._jobs.start_soon(self._guarded, job, self.inbox.clone(), *args)

    async def _guarded(self, job: Any, inbox: Any, *args: Any) -> None:
        """Run one job; its failure is logged, never allowed to take the actor down."""
        try:
            await job(inbox, *args)
        except trio.BrokenResourceError:
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
        if self.closing:
            send_reply(msg.reply, outcome.Error(Conflict("the tenant is being deleted")))
            return
        if not self.fleet.accepting():
            send_reply(msg.reply, outcome.Error(FleetBusy("the fleet is unreachable right now")))
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
            self._start(self._rejected_job, ticket, QuotaExceeded(dimension, text), key, msg.reply)
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
            self._spawn_job, ticket, vm.id, spec, key, msg.source, msg.request_id, msg.reply
        )

    async def _rejected_job(
        self, inbox: Any, ticket: AuditTicket, error: DomainError, key: str | None, reply: Reply
    ) -> None:
        with inbox:
            try:
                await ticket.wait()
            except AuditUnavailable as exc:
                if key is not None:
                    # Nothing durable says this key was answered: let a retry decide anew.
                    await inbox.send(ForgetKey(key))
                send_reply(reply, outcome.Error(exc))
                return
            send_reply(reply, outcome.Error(error))

    async def _spawn_job(
        self,
        inbox: Any,
        ticket: AuditTicket,
        vm_id: str,
        spec: VmSpec,
        key: str | None,
        source: Source,
        request_id: str,
        reply: Reply,
    ) -> None:
        with inbox:
            try:
                await ticket.wait()
            except AuditUnavailable as exc:
                await inbox.send(
                    SpawnSettled(vm_id, None, "audit", source, request_id, False, None)
                )
                send_reply(reply, outcome.Error(exc))
                return
            try:
                state = await self.fleet.spawn(vm_id, self.state.id, spec)
            except FleetInDoubt as exc:
                await inbox.send(MarkInDoubt(vm_id))
                send_reply(reply, outcome.Error(exc))
                await self._reconcile(inbox, vm_id, spec)
                return
            except (FleetError, FleetBusy) as exc:
                # The spawn definitely did not happen, whether or not its outcome entry
                # becomes durable (a restart would resolve it the same way).
                await self._settle_spawn(inbox, vm_id, None, str(exc), source, request_id)
                send_reply(reply, outcome.Error(exc))
                return
            body = await self._settle_spawn(inbox, vm_id, state, "", source, request_id)
            send_reply(reply, _wrap(body or NotFound("no such VM")))

    async def _settle_spawn(
        self,
        inbox: Any,
        vm_id: str,
        state: str | None,
        reason: str,
        source: Source,
        request_id: str | None,
    ) -> dict[str, Any] | None:
        """Report the fleet's answer to the loop; the VM body once its entry is durable."""
        send, receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        await inbox.send(SpawnSettled(vm_id, state, reason, source, request_id, True, send))
        return await _settled(receive)

    def _spawn_settled(self, msg: SpawnSettled) -> None:
        tenant = self.state
        vm = tenant.vms.get(msg.vm_id)
        if vm is None:
            send_reply(msg.reply, outcome.Value((None, None)))
            return
        key = vm.idempotency_key
        if msg.state is None:
            tenant.remove_vm(msg.vm_id)
            if key is not None:
                tenant.idempotency.pop(key, None)
        else:
            vm.state = vm.settled_state = msg.state
            if key is not None:
                old = tenant.idempotency[key]
                tenant.idempotency[key] = IdempotencyRecord(
                    old.request_hash, 201, vm.to_json(), old.created
                )
        if not msg.audit:
            return
        detail: dict[str, Any] = {"idempotency_key": key} if key is not None else {}
        if msg.state is None:
            detail["reason"] = msg.reason
        else:
            detail["state"] = msg.state
        if msg.source is SYSTEM:
            detail["resolution"] = "reconciled"
        result = "failed" if msg.state is None else "succeeded"
        body = vm.to_json() if msg.state is not None else None
        send_reply(
            msg.reply, outcome.Value((self._try_submit("vm.spawn", result, msg, detail), body))
        )

    # -- destroy -------------------------------------------------------------------------------

    def _destroy(self, msg: Destroy) -> None:
        vm = self.state.vms.get(msg.vm_id)
        if vm is None:
            detail = {"reason": "not_found"}
            try:
                ticket = self._submit(
                    "vm.destroy", "rejected", msg.vm_id, msg.source, msg.request_id, detail
                )
            except AuditUnavailable as exc:
                send_reply(msg.reply, outcome.Error(exc))
                return
            self._start(self._rejected_job, ticket, NotFound("no such VM"), None, msg.reply)
            return
        if vm.state in IN_DOUBT_STATES:
            what = {
                "destroying": "is already being destroyed",
                "spawning": "is still being spawned",
            }.get(vm.state, "has an operation in doubt that is being reconciled")
            send_reply(msg.reply, outcome.Error(Conflict(f"the VM {what}")))
            return
        if not self.fleet.accepting():
            send_reply(msg.reply, outcome.Error(FleetBusy("the fleet is unreachable right now")))
            return
        detail = {"previous_state": vm.state}
        try:
            ticket = self._submit(
                "vm.destroy", "requested", vm.id, msg.source, msg.request_id, detail
            )
        except AuditUnavailable as exc:
            send_reply(msg.reply, outcome.Error(exc))
            return
        previous = vm.state
        vm.state = "destroying"
        self._start(
            self._destroy_job, ticket, vm.id, previous, msg.source, msg.request_id, msg.reply
        )

    async def _destroy_job(
        self,
        inbox: Any,
        ticket: AuditTicket,
        vm_id: str,
        previous: str,
        source: Source,
        request_id: str,
        reply: Reply,
    ) -> None:
        with inbox:
            try:
                await ticket.wait()
            except AuditUnavailable as exc:
                await inbox.send(
                    DestroySettled(vm_id, False, previous, "audit", source, None, False, None)
                )
                send_reply(reply, outcome.Error(exc))
                return
            try:
                await self.fleet.destroy(vm_id)
            except FleetInDoubt as exc:
                await inbox.send(MarkInDoubt(vm_id))
                send_reply(reply, outcome.Error(exc))
                await self._reconcile(inbox, vm_id, None)
                return
            except (FleetError, FleetBusy) as exc:
                await self._settle_destroy(
                    inbox, vm_id, False, previous, str(exc), source, request_id
                )
                send_reply(reply, outcome.Error(exc))
                return
            body = await self._settle_destroy(inbox, vm_id, True, None, "", source, request_id)
            send_reply(reply, _wrap(body or NotFound("no such VM")))

    async def _settle_destroy(
        self,
        inbox: Any,
        vm_id: str,
        destroyed: bool,
        state: str | None,
        reason: str,
        source: Source,
        request_id: str | None,
    ) -> dict[str, Any] | None:
        send, receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        await inbox.send(
            DestroySettled(vm_id, destroyed, state, reason, source, request_id, True, send)
        )
        return await _settled(receive)

    def _destroy_settled(self, msg: DestroySettled) -> None:
        vm = self.state.vms.get(msg.vm_id)
        if vm is None:
            send_reply(msg.reply, outcome.Value((None, None)))
            return
        if msg.destroyed:
            self.state.remove_vm(msg.vm_id)
        else:
            vm.state = msg.state or vm.settled_state
            vm.settled_state = vm.state
        if not msg.audit:
            return
        detail: dict[str, Any] = {} if msg.destroyed else {"reason": msg.reason, "state": vm.state}
        if msg.source is SYSTEM:
            detail["resolution"] = "reconciled"
        result = "succeeded" if msg.destroyed else "failed"
        body = {"id": msg.vm_id, "state": "destroyed"} if msg.destroyed else None
        send_reply(
            msg.reply, outcome.Value((self._try_submit("vm.destroy", result, msg, detail), body))
        )

    # -- reconciliation of operations in doubt ------------------------------------------------

    def _start_reconcile(self, vm: VmRecord) -> None:
        spec = None
        if vm.state != "destroying":
            spec = VmSpec(vm.vcpus, vm.memory_mib, vm.image, vm.name)
        self._start(self._reconcile_job, vm.id, spec)

    async def _reconcile_job(self, inbox: Any, vm_id: str, spec: VmSpec | None) -> None:
        with inbox:
            await self._reconcile(inbox, vm_id, spec)

    async def _reconcile(self, inbox: Any, vm_id: str, spec: VmSpec | None) -> None:
        """Repeat the operation in doubt until the fleet answers definitely; audit that.

        A ``spec`` means a spawn was in flight when the answer was lost, none a destroy.
        Both calls are idempotent by VM id, so repeating one converges even if
        the lost call still lands late; merely asking for the VM's status could not rule
        that out. The capacity stays counted the whole time.
        """
        delay, ceiling = self._backoff
        while True:
            try:
                if spec is not None:
                    state = await self.fleet.spawn(vm_id, self.state.id, spec)
                    await self._settle_spawn(inbox, vm_id, state, "", SYSTEM, None)
                else:
                    await self.fleet.destroy(vm_id)
                    await self._settle_destroy(inbox, vm_id, True, None, "", SYSTEM, None)
                return
            except FleetError as exc:
                break_reason = str(exc)
                break
            except FleetUnavailable:
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, ceiling)
        if spec is not None:
            await self._settle_spawn(inbox, vm_id, None, break_reason, SYSTEM, None)
        else:
            await self._settle_destroy(inbox, vm_id, False, None, break_reason, SYSTEM, None)

    # -- quota -------------------------------------------------------------------------------

    def _update_quota(self, msg: UpdateQuota) -> None:
        detail = {"quota": msg.quota.to_json(), "previous": self.state.quota.to_json()}
        try:
            ticket = self._submit(
                "tenant.update", "succeeded", None, msg.source, msg.request_id, detail
            )
        except AuditUnavailable as exc:
            send_reply(msg.reply, outcome.Error(exc))
            return
        self._start(self._quota_job, ticket, msg)

    async def _quota_job(self, inbox: Any, ticket: AuditTicket, msg: UpdateQuota) -> None:
        with inbox:
            try:
                await ticket.wait()
            except AuditUnavailable as exc:
                send_reply(msg.reply, outcome.Error(exc))
                return
            # Applied only once durable: an unacknowledged raise never admits a spawn.
            await inbox.send(QuotaApplied(msg.quota, msg.reply))


def _wrap(result: Any) -> outcome.Outcome[Any]:
    return outcome.Error(result) if isinstance(result, BaseException) else outcome.Value(result)


async def _settled(receive: trio.MemoryReceiveChannel[outcome.Outcome[Any]]) -> Any:
    """The loop's answer to a settle report: wait for its entry, return the reply body."""
    with receive:
        ticket, body = (await receive.receive()).unwrap()
    if ticket is not None:
        try:
            await ticket.wait()
        except AuditUnavailable as exc:
            log.warning("an outcome entry did not become durable: %s", exc)
    return body
