"""The waiting half of a tenant actor: jobs that wait for the journal and the fleet.

A job runs in its actor's nursery, so it outlives the request that started it (a caller
that goes away never leaves an operation half done). It changes no state itself: it
writes entries through the store, and the store folds them into the state once they are
durable (``actors/store/``). So the state in memory and the state a replay of the log
rebuilds never disagree, and nothing is acknowledged that a restart could undo.

An operation (spawn, destroy) goes: its ``requested`` entry durable, the fleet's answer,
its outcome entry. What the caller hears:

- ``requested`` not durable: 503 ``audit_unavailable``; the store took the reservation
  back and nothing reached the fleet;
- the fleet confirmed: success, also when the outcome entry cannot be made durable at
  once (the operation happened; API.md v1.1, "Faults, clarified"): the outcome is then
  recorded later with source ``system``, and until it is the VM stays ``spawning`` or
  ``destroying``, still counted;
- the fleet refused: its error once the ``failed`` entry is durable. If that entry cannot
  be made durable, the refusal is not on record, and after a crash the operation would be
  repeated and might then be carried out: so the caller hears 503 (in doubt), the VM is
  ``unknown``, still counted, and a reconciler settles it;
- no answer from the fleet: 503 (in doubt), and the reconciler repeats the operation
  (idempotent by VM id) with backoff until both the fleet's answer and its record are
  definite.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import outcome
import trio

from actors.errors import AuditUnavailable, DomainError, FleetError, FleetInDoubt, FleetUnavailable
from actors.fleet.client import FleetClient
from actors.journal.entries import Entry
from actors.reply import Reply, send_reply
from actors.store import Store, Ticket
from actors.tenants.decisions import SYSTEM, Operation, outcome_entry
from actors.tenants.protocol import Source
from actors.views import Destroyed, Vm, vm_view

log = logging.getLogger("vm_tenant.tenant")

#: seconds between attempts to record an outcome the journal could not take at once
RECORD_RETRY = 1.0


class TenantJobs:
    """The job coroutines of one tenant actor (started by it, in its nursery)."""

    def __init__(
        self, store: Store, fleet: FleetClient, backoff: tuple[float, float] = (0.5, 30.0)
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.backoff = backoff

    async def refused(self, ticket: Ticket, error: DomainError, reply: Reply[Any]) -> None:
        """Answer a refused write once its ``rejected`` entry is durable."""
        try:
            reply.audited(await ticket.wait())
        except AuditUnavailable as exc:
            send_reply(reply, outcome.Error(exc))
            return
        send_reply(reply, outcome.Error(error))

    async def recorded(self, ticket: Ticket, reply: Reply[Any]) -> None:
        """Answer once the entry is durable (and so folded into the state)."""
        try:
            reply.audited(await ticket.wait())
        except AuditUnavailable as exc:
            send_reply(reply, outcome.Error(exc))
            return
        send_reply(reply, outcome.Value(None))

    async def operate(
        self, ticket: Ticket, operation: Operation, source: Source, request_id: str,
        reply: Reply[Any],
    ) -> None:  # fmt: skip
        """Carry out a spawn or a destroy once its ``requested`` entry is durable."""
        try:
            reply.audited(await ticket.wait())
        except AuditUnavailable as exc:
            send_reply(reply, outcome.Error(exc))
            return
        try:
            state = await self._call_fleet(operation)
        except FleetInDoubt as exc:
            await self._in_doubt(operation, reply, exc)
            return
        except (FleetError, FleetUnavailable) as exc:
            entry = outcome_entry(operation, False, None, str(exc), source, request_id)
            if (failed := await self._durable(entry)) is not None:
                reply.audited(failed)
                send_reply(reply, outcome.Error(exc))
            else:
                unrecorded = FleetInDoubt(
                    "the fleet's answer could not be recorded; the operation is being reconciled"
                )
                await self._in_doubt(operation, reply, unrecorded)
            return
        entry = outcome_entry(operation, True, state, "", source, request_id)
        recorded = await self._durable(entry)
        if recorded is not None:
            reply.audited(recorded)
        send_reply(reply, outcome.Value(self._answer(operation, state)))
        if recorded is None:
            await self._record_late(operation, state, request_id)

    @staticmethod
    def _answer(operation: Operation, state: str | None) -> Vm | Destroyed:
        if operation.vm is not None:
            return vm_view(operation.vm, state or "pending")
        return Destroyed(operation.vm_id, "destroyed")

    async def _call_fleet(self, operation: Operation) -> str | None:
        """Spawn (returning the fleet's state) or destroy (returning None)."""
        if operation.spec is not None:
            return await self.fleet.spawn(operation.vm_id, operation.tenant, operation.spec)
        await self.fleet.destroy(operation.vm_id)
        return None

    async def _durable(self, entry: Entry) -> Entry | None:
        """Write ``entry`` and wait until it is durable: the stored entry, or None when it
        could not be made durable."""
        try:
            return await self.store.record(entry).wait()
        except AuditUnavailable as error:
            log.warning("outcome of %s not recorded yet: %s", entry["vm"], error)
            return None

    async def _in_doubt(self, operation: Operation, reply: Reply[Any], error: DomainError) -> None:
        await self.store.mark_in_doubt(operation.tenant, operation.vm_id, operation.kind)
        send_reply(reply, outcome.Error(error))
        await self.reconcile(operation)

    async def _record_late(self, operation: Operation, state: str | None, request_id: str) -> None:
        """Record a confirmed outcome whose entry failed, as ``system``, once the journal
        takes writes again; the fleet is not asked again.

        Only the local journal is retried here, so it is retried every
        ``RECORD_RETRY`` seconds once the store is ready again, not with the fleet's
        backoff: the VM leaves ``spawning`` / ``destroying`` soon after the disk is back.
        """
        while True:
            await trio.sleep(RECORD_RETRY)
            if not self.store.ready:
                continue
            entry = outcome_entry(operation, True, state, "", SYSTEM, request_id, "recorded_late")
            if await self._durable(entry) is not None:
                return

    async def reconcile(self, operation: Operation) -> None:
        """Repeat the operation in doubt until its outcome is definite and durable.

        Both calls are idempotent by VM id, so repeating one converges even if the lost
        call lands late; merely asking for the VM's status could not rule that out. The
        capacity stays counted the whole time.
        """
        delay, ceiling = self.backoff
        while True:
            entry: Entry | None = None
            try:
                state = await self._call_fleet(operation)
                entry = outcome_entry(operation, True, state, "", SYSTEM, None, "reconciled")
            except FleetError as exc:
                entry = outcome_entry(operation, False, None, str(exc), SYSTEM, None, "reconciled")
            except (FleetUnavailable, FleetInDoubt):
                pass  # still in doubt: ask again after the backoff
            if entry is not None and await self._durable(entry) is not None:
                return
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, ceiling)
