"""The tenant actor: the one place where a tenant's commands are decided, one at a time.

Its mailbox is a bounded Trio memory channel and it handles one message at a time, so
the check-and-reserve of capacity is atomic without a lock: two concurrent spawns can
never both pass against the same total. A turn asks the store to run the command's
decision (``actors/tenants/decisions.py``) against the tenant's state and to write its
entry; with the file store that is in-memory work plus a non-blocking submit. The
waiting (for the fsync, for the fleet) happens in *jobs*, tasks in the actor's own
nursery (``actors/tenants/jobs.py``). So a busy tenant pipelines its spawns through the
writer's group commit, and a slow fleet stalls neither other tenants nor this tenant's
reads.

Capacity is reserved before the ``requested`` entry is written and released only when the
fleet confirms a destroy or a spawn definitely failed. Every window errs on the safe side:
a VM that may exist is never released from the quota.

:meth:`TenantActor.run` is the supervisor: it owns the mailbox and the jobs, restarts the
message loop after a crash (bounded: more than ``MAX_RESTARTS`` in ``RESTART_PERIOD``
seconds marks the actor failed, cancels its jobs and answers everything queued), and
answers the caller of the message that crashed it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import outcome
import trio

from actors.errors import Busy, Conflict, DomainError, InternalError
from actors.fleet.client import FleetClient
from actors.reply import Reply, send_reply
from actors.store import Store
from actors.tenants.decisions import (
    Answer,
    Context,
    Decision,
    Operate,
    Operation,
    Record,
    Refuse,
    decide_destroy,
    decide_quota,
    decide_spawn,
)
from actors.tenants.jobs import TenantJobs
from actors.tenants.protocol import (
    WRITE_COMMANDS,
    Destroy,
    Reclaim,
    Reopen,
    Retire,
    Spawn,
    TenantMessage,
    UpdateQuota,
)

log = logging.getLogger("vm_tenant.tenant")

MAX_RESTARTS = 5
RESTART_PERIOD = 10.0
#: the most messages one turn of the loop takes before it lets other tasks run
TURN_MESSAGES = 32


class TenantActor:
    """One tenant's actor: a supervised message loop plus the jobs it started."""

    def __init__(
        self,
        tenant_id: str,
        store: Store,
        fleet: FleetClient,
        *,
        mailbox_size: int = 256,
        reconcile_backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.tenant_id = tenant_id
        self.store = store
        self.fleet = fleet
        self.failed = False
        self.restarts = 0
        self.closing = False
        self.inbox, self._receive = trio.open_memory_channel[TenantMessage](mailbox_size)
        self._stopping: DomainError | None = None
        self._jobs = TenantJobs(store, fleet, reconcile_backoff)
        self._nursery: trio.Nursery | None = None
        self._current: TenantMessage | None = None
        #: when the last message was taken (trio clock), for passivation
        self.last_active = 0.0

    def stop(self, error: DomainError) -> None:
        """Take no more commands (queued ones are answered ``error``); jobs finish.

        The actor ends once the last job has finished.
        """
        if self._stopping is None:
            self._stopping = error
            self.inbox.close()

    # -- supervision ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped and every job has finished."""
        recent: deque[float] = deque()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.last_active = trio.current_time()
            try:
                claimed = await self.store.claim_in_doubt(self.tenant_id)
            except DomainError as error:  # the store is away: a later look claims them
                log.warning("tenant %s could not claim operations: %s", self.tenant_id, error)
                claimed = []
            for vm in claimed:
                self._start(self._jobs.reconcile, Operation.in_doubt(vm))
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
        reply: Reply[Any] | None = getattr(message, "reply", None)
        if reply is not None and not reply.answered:
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
            queued_reply: Reply[Any] | None = getattr(queued, "reply", None)
            send_reply(queued_reply, outcome.Error(unavailable))
        return True

    async def _loop(self) -> None:
        receive = self._receive
        async for message in receive:
            await self._take(message)
            # What is queued already is taken in the same turn (up to TURN_MESSAGES): a
            # busy tenant's decisions then reach the journal together, in one batch,
            # rather than one per scheduling round, and other tasks still get the loop
            # between two such turns.
            for _ in range(TURN_MESSAGES - 1):
                try:
                    message = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                await self._take(message)

    async def _take(self, message: TenantMessage) -> None:
        self.last_active = trio.current_time()
        self._current = message
        if self._stopping is not None and isinstance(message, WRITE_COMMANDS):
            stopped: Reply[Any] = message.reply
            send_reply(stopped, outcome.Error(self._stopping))
        else:
            await self._handle(message)
        self._current = None

    def passivate_if_idle(self, idle_since: float) -> bool:
        """End the actor if it took no message since ``idle_since`` and has nothing pending.

        Synchronous, so nothing can reach the mailbox between the checks and the close.
        The loop must be parked in ``receive`` with an empty buffer: a message handed
        straight to a waiting receiver has left the buffer but not been handled yet.
        The caller forgets the actor when this returns True; the state is the store's.
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
        self._stopping = Busy("the tenant actor was passivated", reason="shutting_down")
        self.inbox.close()
        return True

    # -- turns ---------------------------------------------------------------------------------

    def _context(self) -> Context:
        return Context(closing=self.closing, accepting=self.fleet.accepting())

    async def _handle(self, message: TenantMessage) -> None:
        match message:
            case Spawn():
                decide = partial(decide_spawn, cmd=message, ctx=self._context())
                await self._decide(decide, message, key=message.idempotency_key)
            case Destroy():
                decide = partial(decide_destroy, cmd=message, ctx=self._context())
                await self._decide(decide, message, vm_id=message.vm_id)
            case UpdateQuota():
                await self._decide(partial(decide_quota, cmd=message, ctx=self._context()), message)
            case Retire(reply):
                if self.closing:
                    send_reply(reply, outcome.Error(Conflict("the tenant is being deleted")))
                    return
                try:
                    usage = await self.store.usage(self.tenant_id)
                except DomainError as error:  # the store cannot tell (a database away)
                    send_reply(reply, outcome.Error(error))
                    return
                if usage.allocated.vms:
                    send_reply(reply, outcome.Error(Conflict("the tenant still has VMs")))
                else:
                    self.closing = True
                    send_reply(reply, outcome.Value(None))
            case Reopen():
                self.closing = False
            case Reclaim():
                try:
                    claimed = await self.store.claim_in_doubt(self.tenant_id, others_only=True)
                except DomainError as error:  # the store is away: the next look claims them
                    log.warning("tenant %s could not claim operations: %s", self.tenant_id, error)
                    return
                for vm in claimed:
                    self._start(self._jobs.reconcile, Operation.in_doubt(vm))

    async def _decide(
        self,
        decide: Callable[..., Decision],
        message: Spawn | Destroy | UpdateQuota,
        *,
        vm_id: str | None = None,
        key: str | None = None,
    ) -> None:
        """Run one decision through the store and start what follows from it.

        An entry that cannot even be queued (``AuditUnavailable``) is answered here, once,
        for every kind of command: nothing changed and nothing was forwarded.
        """
        reply: Reply[Any] = message.reply
        try:
            decision, ticket = await self.store.decide(self.tenant_id, decide, vm_id=vm_id, key=key)
        except DomainError as refused:
            send_reply(reply, outcome.Error(refused))
            return
        match decision:
            case Answer(result):
                send_reply(reply, result)
            case Refuse(_, error):
                assert ticket is not None
                self._start(self._jobs.refused, ticket, error, reply)
            case Operate(_, operation):
                assert ticket is not None
                request_id = message.request_id
                self._start(
                    self._jobs.operate, ticket, operation, message.source, request_id, reply
                )
            case Record():
                assert ticket is not None
                self._start(self._jobs.recorded, ticket, reply)

    def _start(self, job: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, job, *args)

    async def _guarded(self, job: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one job; its failure is logged, never allowed to take the actor down."""
        try:
            await job(*args)
        except Exception:
            log.exception("a job of tenant actor %s failed", self.tenant_id)
