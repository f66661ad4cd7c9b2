"""The waiting half of a tenant actor: jobs that wait for the audit fsync and the fleet.

A job runs in its actor's nursery with a clone of the actor's inbox, and it never touches
the tenant's state: everything it learns goes back to the actor as a message (see
``actors/tenants/protocol.py``), so the actor stays the only owner of that state.

Outcomes are settled in two phases. The job reports the fleet's definite answer
(:class:`~actors.messages.RecordOutcome`); the actor submits the outcome entry; once that
entry is durable the job asks the actor to apply it (:class:`~actors.messages.ApplyOutcome`)
and only then answers its caller. An outcome that cannot be made durable leaves the VM
``unknown``, still counted, and the job turns into a reconciler: it repeats the
operation (idempotent by VM id) with backoff until both the fleet's answer and its
record are definite. So the state in memory and the state a replay of the log rebuilds
never disagree, and nothing is acknowledged that a restart could undo.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import outcome
import trio

from actors.errors import (
    AuditUnavailable,
    DomainError,
    FleetError,
    FleetInDoubt,
    FleetUnavailable,
)
from actors.fleet.client import FleetClient
from actors.journal.writer import AuditTicket
from actors.reply import Reply, send_reply
from actors.state import Quota, VmSpec
from actors.tenants.protocol import (
    ApplyOutcome,
    ForgetKey,
    MarkInDoubt,
    QuotaApplied,
    RecordOutcome,
    Rollback,
    Settle,
    Source,
)

log = logging.getLogger("vm_tenant.tenant")

Inbox = trio.MemorySendChannel[Any]


class TenantJobs:
    """The job coroutines of one tenant actor (started by it, reporting to it)."""

    def __init__(
        self,
        tenant_id: str,
        fleet: FleetClient,
        system: Source,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.tenant_id = tenant_id
        self.fleet = fleet
        self.system = system
        self.backoff = backoff

    async def rejected(
        self, inbox: Inbox, ticket: AuditTicket, error: DomainError, key: str | None, reply: Reply
    ) -> None:
        """Answer a refused write once its ``rejected`` entry is durable."""
        try:
            await ticket.wait()
        except AuditUnavailable as exc:
            if key is not None:
                # Nothing durable says this key was answered: let a retry decide anew.
                await inbox.send(ForgetKey(key))
            send_reply(reply, outcome.Error(exc))
            return
        send_reply(reply, outcome.Error(error))

    async def operate(
        self, inbox: Inbox, ticket: AuditTicket, vm_id: str, spec: VmSpec | None,
        previous: str | None, source: Source, request_id: str, reply: Reply,
    ) -> None:  # fmt: skip
        """Carry out a spawn (``spec`` given) or a destroy once its request is durable."""
        kind = "spawn" if spec is not None else "destroy"
        try:
            await ticket.wait()
        except AuditUnavailable as exc:
            await inbox.send(Rollback(vm_id, kind, previous))
            send_reply(reply, outcome.Error(exc))
            return
        failure: DomainError | None = None
        try:
            state = await self._call_fleet(vm_id, spec)
            settle = Settle(vm_id, kind, True, state, "", source, request_id)
        except FleetInDoubt as exc:
            await self._in_doubt(inbox, vm_id, spec, reply, exc)
            return
        except (FleetError, FleetUnavailable) as exc:
            failure = exc
            settle = Settle(vm_id, kind, False, previous, str(exc), source, request_id)
        await self._finish(inbox, settle, spec, reply, failure)

    async def _call_fleet(self, vm_id: str, spec: VmSpec | None) -> str | None:
        """Spawn (returning the fleet's state) or destroy (returning None)."""
        if spec is not None:
            return await self.fleet.spawn(vm_id, self.tenant_id, spec)
        await self.fleet.destroy(vm_id)
        return None

    async def _finish(
        self, inbox: Inbox, settle: Settle, spec: VmSpec | None, reply: Reply,
        failure: DomainError | None,
    ) -> None:  # fmt: skip
        try:
            body = await self._settle(inbox, settle)
        except AuditUnavailable as exc:
            await self._in_doubt(inbox, settle.vm_id, spec, reply, exc)
            return
        send_reply(reply, outcome.Error(failure) if failure else outcome.Value(body))

    async def _in_doubt(
        self, inbox: Inbox, vm_id: str, spec: VmSpec | None, reply: Reply, error: DomainError
    ) -> None:
        kind = "spawn" if spec is not None else "destroy"
        await inbox.send(MarkInDoubt(vm_id, kind))
        send_reply(reply, outcome.Error(error))
        await self.reconcile(inbox, vm_id, spec)

    async def reconcile(self, inbox: Inbox, vm_id: str, spec: VmSpec | None) -> None:
        """Repeat the operation in doubt until its outcome is definite and durable.

        A ``spec`` means a spawn was in flight when the answer was lost, none a destroy.
        Both calls are idempotent by VM id, so repeating one converges even if the lost
        call lands late; merely asking for the VM's status could not rule that out. The
        capacity stays counted the whole time.
        """
        kind = "spawn" if spec is not None else "destroy"
        delay, ceiling = self.backoff
        while True:
            settle: Settle | None = None
            try:
                state = await self._call_fleet(vm_id, spec)
                settle = Settle(vm_id, kind, True, state, "", self.system, None)
            except FleetError as exc:
                settle = Settle(vm_id, kind, False, None, str(exc), self.system, None)
            except (FleetUnavailable, FleetInDoubt):
                pass  # still in doubt: ask again after the backoff
            if settle is not None:
                try:
                    await self._settle(inbox, settle)
                    return
                except AuditUnavailable as exc:
                    log.warning("resolution of %s not recorded yet: %s", vm_id, exc)
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, ceiling)

    async def _settle(self, inbox: Inbox, settle: Settle) -> Any:
        """Record the outcome, wait until it is durable, then have it applied."""
        recorded = Reply()
        await inbox.send(RecordOutcome(settle, recorded))
        ticket: AuditTicket = (await recorded.receive()).unwrap()
        await ticket.wait()
        applied = Reply()
        await inbox.send(ApplyOutcome(settle, applied))
        return (await applied.receive()).unwrap()

    async def quota(self, inbox: Inbox, ticket: AuditTicket, quota: Quota, reply: Reply) -> None:
        try:
            entry = await ticket.wait()
        except AuditUnavailable as exc:
            send_reply(reply, outcome.Error(exc))
            return
        # Applied only once durable, in log order: an unacknowledged raise never admits
        # a spawn, and two racing changes end as the log says.
        await inbox.send(QuotaApplied(quota, entry["seq"], reply))
