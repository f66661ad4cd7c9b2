"""The tenant registry: the directory of tenants and their tokens, and the actors' supervisor.

It owns which tenants exist and which token ids each one has issued (the edge asks it,
synchronously, whether a verified token is still valid), and it starts one
:class:`~actors.tenant.TenantActor` per tenant lazily, on first use, inside its own
nursery. :meth:`TenantRegistry.actor` does no ``await`` between lookup and insert, so a
tenant's actor can never be started twice; an actor that exhausted its restart budget is
replaced by a fresh one over the same state on the next request. An actor idle for
``passivate_after`` seconds with no job in flight ends itself and is forgotten here (the
state stays), so memory follows the active tenants, not the provisioned ones.

Tenant and token operations are rare and involve no fleet call: they are applied only
once their audit entry is durable, and a pending creation reserves its id meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
from collections.abc import Callable
from math import inf
from typing import Any

import trio
from sortedcontainers import SortedDict

from actors.errors import AuditUnavailable, Busy, Conflict, NotFound
from actors.fleet.client import FleetClient
from actors.journal.writer import AuditWriter
from actors.reply import Reply
from actors.state import IN_DOUBT_STATES, Quota, TenantState
from actors.tenants.actor import TenantActor
from actors.tenants.limits import LimitSettings, TenantLimits
from actors.tenants.protocol import Reopen, Retire, Source
from actors.tenants.views import tenant_view

log = logging.getLogger("vm_tenant.registry")


def new_token_id() -> str:
    return f"tok-{secrets.token_hex(8)}"


class TenantRegistry:
    """Directory of tenants and tokens; starts and supervises the tenant actors."""

    def __init__(
        self,
        tenants: dict[str, TenantState],
        audit: AuditWriter,
        fleet: FleetClient,
        *,
        mailbox_size: int = 256,
        call_timeout: float = 30.0,
        limits: LimitSettings | None = None,
        passivate_after: float = inf,
    ) -> None:
        # Sorted by id, so that listing pages start after a cursor without a scan.
        self._tenants = tenants if isinstance(tenants, SortedDict) else SortedDict(tenants)
        self._audit = audit
        self._fleet = fleet
        self._mailbox_size = mailbox_size
        self.call_timeout = call_timeout
        self._passivate_after = passivate_after
        self._actors: dict[str, TenantActor] = {}
        self._creating: set[str] = set()
        #: token ids whose issue entry is submitted but not yet durable, per tenant
        self._issuing: dict[str, set[str]] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()
        #: per-tenant rate and spawn limits, consulted by the edge without any actor
        self.limits = TenantLimits(limits or LimitSettings())

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the actors' nursery until :meth:`close`, then until every actor has drained."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for tenant in self._tenants.values():
                # Operations left in doubt by a crash are resolved right away, not on the
                # tenant's next request.
                if any(vm.state in IN_DOUBT_STATES for vm in tenant.vms.values()):
                    self.actor(tenant.id)
            if self._passivate_after < inf:
                nursery.start_soon(self._sweep)
            task_status.started()
            await self._closed.wait()
            for actor in self._actors.values():
                actor.stop(Busy("the service is shutting down"))

    def close(self) -> None:
        """Stop taking commands; queued ones and running jobs finish."""
        self._closed.set()

    # -- lookup ------------------------------------------------------------------------------

    def exists(self, tenant_id: str) -> bool:
        return tenant_id in self._tenants

    def token_valid(self, tenant_id: str, token_id: str) -> bool:
        tenant = self._tenants.get(tenant_id)
        return tenant is not None and token_id in tenant.tokens

    def list_tenants(
        self, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` tenants with ids after ``after``, by id; and the id to continue after.

        Reads each tenant's quota and allocation without a call to its actor (so listing
        starts no actors); a read with no ``await`` in between sees each tenant whole.
        """
        ids = list(
            itertools.islice(
                self._tenants.irange(minimum=after, inclusive=(False, True)), limit + 1
            )
        )
        page = [tenant_view(self._tenants[tenant_id]) for tenant_id in ids[:limit]]
        return page, (ids[limit - 1] if len(ids) > limit else None)

    def live_actors(self) -> list[TenantActor]:
        """The actors running now (read by the metrics at scrape time)."""
        return list(self._actors.values())

    def tenant_states(self) -> list[TenantState]:
        """Every provisioned tenant's state, running or not (read-only use)."""
        return list(self._tenants.values())

    def state(self, tenant_id: str) -> TenantState:
        """The tenant's state, for reads only (see ``actors/tenants/views.py``)."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        return tenant

    def actor(self, tenant_id: str) -> TenantActor:
        """The tenant's actor, started on first use. Never awaits."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        actor = self._actors.get(tenant_id)
        if actor is None or actor.failed:
            if self._nursery is None or self._closed.is_set():
                raise Busy("the service is shutting down")
            actor = TenantActor(
                tenant,
                self._audit,
                self._fleet,
                mailbox_size=self._mailbox_size,
            )
            self._actors[tenant_id] = actor
            self._nursery.start_soon(actor.run)
        return actor

    def passivate_idle(self) -> int:
        """End every actor idle for ``passivate_after`` with nothing pending; returns how many.

        The next message for such a tenant starts a fresh actor over the same state.
        """
        idle_since = trio.current_time() - self._passivate_after
        idle = [
            tenant_id
            for tenant_id, actor in self._actors.items()
            if actor.passivate_if_idle(idle_since)
        ]
        for tenant_id in idle:
            del self._actors[tenant_id]
        return len(idle)

    async def _sweep(self) -> None:
        # One timer for all actors rather than a deadline per message: an actor ends
        # between passivate_after and 1.25 x passivate_after after its last message.
        while not self._closed.is_set():
            with trio.move_on_after(self._passivate_after / 4):
                await self._closed.wait()
            if not self._closed.is_set():
                self.passivate_idle()

    def is_active(self, tenant_id: str) -> bool:
        """Whether the tenant has a running actor now (not passivated, never started)."""
        return tenant_id in self._actors

    async def call(self, tenant_id: str, make: Callable[[Reply], Any]) -> Any:
        """Send ``make(reply)`` to the tenant's actor and wait for its answer.

        A full mailbox answers ``Busy`` at once rather than queueing without limit.
        """
        actor = self.actor(tenant_id)
        reply = Reply()
        try:
            actor.inbox.send_nowait(make(reply))
        except trio.WouldBlock:
            raise Busy("too many requests in flight for this tenant") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise Busy("the tenant is not taking requests right now") from None
        with trio.fail_after(self.call_timeout):
            result = await reply.receive()
        return result.unwrap()

    # -- tenant and token operations -------------------------------------------------------

    async def create_tenant(
        self,
        tenant_id: str,
        quota: Quota,
        source: Source,
        request_id: str,
        expires_at: str | None = None,
    ) -> str:
        """Provision a tenant with its first token; returns that token's id."""
        if tenant_id in self._tenants or tenant_id in self._creating:
            raise Conflict(f"tenant {tenant_id!r} already exists")
        token_id = new_token_id()
        self._creating.add(tenant_id)
        try:
            ticket = self._submit(
                "tenant.create",
                tenant_id,
                source,
                request_id,
                _token_detail({"quota": quota.to_json(), "token_id": token_id}, expires_at),
            )
            with trio.CancelScope(shield=True):
                await ticket.wait()
            self._tenants[tenant_id] = TenantState(tenant_id, quota, {token_id})
        finally:
            self._creating.discard(tenant_id)
        return token_id

    async def delete_tenant(self, tenant_id: str, source: Source, request_id: str) -> None:
        """Deprovision a tenant with no VMs; all its tokens stop working."""
        # Once Retire is queued the tenant refuses writes until the delete ends one way or
        # the other, so a caller that goes away must not leave it half-deleted: shielded
        # (each wait inside still has its own deadline).
        with trio.CancelScope(shield=True):
            try:
                await self.call(tenant_id, Retire)
            except trio.TooSlowError:
                # Retire may still be handled later: take it back behind it.
                await self._reopen(self.actor(tenant_id))
                raise
            actor = self.actor(tenant_id)
            # Deleting revokes every token, also one whose issue is not durable yet (its
            # entry precedes this one in the log).
            tokens = self._tenants[tenant_id].tokens | self._issuing.get(tenant_id, set())
            detail = {"revoked_token_ids": sorted(tokens)}
            try:
                ticket = self._submit("tenant.delete", tenant_id, source, request_id, detail)
                await ticket.wait()
            except AuditUnavailable:
                await self._reopen(actor)  # not deleted after all: take spawns again
                raise
        del self._tenants[tenant_id]
        self._actors.pop(tenant_id, None)
        self.limits.forget(tenant_id)
        actor.stop(NotFound("no such tenant"))

    @staticmethod
    async def _reopen(actor: TenantActor) -> None:
        # A blocking send, so a full mailbox delays this instead of losing it.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await actor.inbox.send(Reopen())

    async def issue_token(
        self, tenant_id: str, source: Source, request_id: str, expires_at: str | None = None
    ) -> str:
        """Issue a token id (``expires_at``, RFC 3339, is recorded in the entry)."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        token_id = new_token_id()
        detail = _token_detail({"token_id": token_id}, expires_at)
        ticket = self._submit("token.issue", tenant_id, source, request_id, detail)
        issuing = self._issuing.setdefault(tenant_id, set())
        issuing.add(token_id)
        try:
            with trio.CancelScope(shield=True):
                await ticket.wait()
        finally:
            issuing.discard(token_id)
            if not issuing and self._issuing.get(tenant_id) is issuing:
                del self._issuing[tenant_id]
        # Only the tenant that issued it: a tenant deleted meanwhile (and perhaps created
        # again under the same id) must not gain this token.
        if self._tenants.get(tenant_id) is tenant:
            tenant.tokens.add(token_id)
        return token_id

    async def revoke_token(
        self, tenant_id: str, token_id: str, source: Source, request_id: str
    ) -> None:
        tenant = self._tenants.get(tenant_id)
        if tenant is None or token_id not in tenant.tokens:
            raise NotFound("no such token")
        ticket = self._submit("token.revoke", tenant_id, source, request_id, {"token_id": token_id})
        with trio.CancelScope(shield=True):
            await ticket.wait()
        tenant.tokens.discard(token_id)

    def _submit(
        self, op: str, tenant_id: str, source: Source, request_id: str, detail: dict[str, Any]
    ) -> Any:
        return self._audit.submit(
            op=op,
            outcome="succeeded",
            tenant=tenant_id,
            vm=None,
            source=source.to_json(),
            request_id=request_id,
            detail=detail,
        )


def _token_detail(detail: dict[str, Any], expires_at: str | None) -> dict[str, Any]:
    """An entry's detail, with the token's expiry when it has one (never the token)."""
    return detail if expires_at is None else {**detail, "expires_at": expires_at}
