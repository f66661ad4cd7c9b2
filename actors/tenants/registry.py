"""The tenant registry: the directory of tenants and their tokens, and the actors' supervisor.

It answers which tenants exist and which token ids each one may use (the edge asks it,
synchronously, whether a verified token is still valid) from the store's directory,
which the fold keeps (a pending creation or token issue is tracked here until its entry
is durable). Asking starts no actor. It starts one
:class:`~actors.tenants.actor.TenantActor` per tenant lazily, on first use, inside its own
nursery. :meth:`TenantRegistry.actor` does no ``await`` between lookup and insert, so a
tenant's actor can never be started twice; an actor that exhausted its restart budget is
replaced by a fresh one over the same state on the next request. An actor idle for
``passivate_after`` seconds with no job in flight ends itself and is forgotten here (the
state stays), so memory follows the active tenants, not the provisioned ones.

Tenant and token operations are rare and involve no fleet call: the store folds their
entry into the state once it is durable, and a pending creation reserves its id meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from math import inf
from typing import Any, TypeVar

import trio

from actors.errors import AuditUnavailable, Busy, Conflict, DomainError, NotFound
from actors.fleet.client import FleetClient
from actors.journal.entries import Entry, draft
from actors.reply import Receipt, Reply
from actors.state import Quota
from actors.store import Store, Ticket
from actors.tenants.actor import TenantActor
from actors.tenants.limits import LimitSettings, TenantLimits
from actors.tenants.protocol import Reclaim, Reopen, Retire, Source, TenantMessage

log = logging.getLogger("vm_tenant.registry")

T = TypeVar("T")


def new_token_id() -> str:
    return f"tok-{secrets.token_hex(8)}"


class TenantRegistry:
    """Directory of tenants and tokens; starts and supervises the tenant actors."""

    def __init__(
        self,
        store: Store,
        fleet: FleetClient,
        *,
        mailbox_size: int = 256,
        call_timeout: float = 30.0,
        limits: LimitSettings | None = None,
        passivate_after: float = inf,
    ) -> None:
        self._store = store
        #: which tenants exist and their tokens: read here, changed by the store's fold
        self._directory = store.directory
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
            # Operations left in doubt by a crash are resolved right away, not on the
            # tenant's next request.
            try:
                for tenant_id in await self._store.tenants_in_doubt():
                    self.actor(tenant_id)
            except (AuditUnavailable, NotFound) as error:
                log.warning("operations in doubt not looked up at start: %s", error)
            if self._passivate_after < inf:
                nursery.start_soon(self._sweep)
            if self._store.claim_interval is not None:
                nursery.start_soon(self._claim_loop, self._store.claim_interval)
            task_status.started()
            await self._closed.wait()
            for actor in self._actors.values():
                actor.stop(Busy("the service is shutting down", reason="shutting_down"))

    def close(self) -> None:
        """Stop taking commands; queued ones and running jobs finish."""
        self._closed.set()

    # -- the directory ----------------------------------------------------------------------

    def exists(self, tenant_id: str) -> bool:
        """Whether the tenant exists (asking starts no actor)."""
        return self._directory.exists(tenant_id)

    def require(self, tenant_id: str) -> None:
        """``NotFound`` unless the tenant exists (asking starts no actor)."""
        if not self._directory.exists(tenant_id):
            raise NotFound("no such tenant")

    async def confirm(self, tenant_id: str) -> None:
        """``NotFound`` unless the tenant exists. One the directory does not know is looked
        up in the store first: with replicas, another one may have created it a moment
        ago, before this one's directory heard of it (the store then brings the directory
        up to date), and an operator's next call must not depend on which replica it hits."""
        if self._directory.exists(tenant_id):
            return
        await self._store.tenant(tenant_id)  # NotFound when there is no such tenant
        self.require(tenant_id)

    def token_valid(self, tenant_id: str, token_id: str) -> bool:
        """Whether the tenant exists and this token id of it is neither revoked nor unknown."""
        return self._directory.token_valid(tenant_id, token_id)

    def live_actors(self) -> list[TenantActor]:
        """The actors running now (read by the metrics at scrape time)."""
        return list(self._actors.values())

    def actor(self, tenant_id: str) -> TenantActor:
        """The tenant's actor, started on first use. Never awaits."""
        self.require(tenant_id)
        actor = self._actors.get(tenant_id)
        if actor is None or actor.failed:
            if self._nursery is None or self._closed.is_set():
                raise Busy("the service is shutting down", reason="shutting_down")
            actor = TenantActor(
                tenant_id,
                self._store,
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

    async def _claim_loop(self, interval: float) -> None:
        """Have operations whose owner went away (a dead replica) claimed and reconciled.

        A tenant without a running actor gets one (starting claims); a running actor is
        asked to claim with :class:`Reclaim`. A full mailbox skips the tenant this time.
        """
        while not self._closed.is_set():
            with trio.move_on_after(interval):
                await self._closed.wait()
            if self._closed.is_set():
                return
            try:
                tenants = await self._store.tenants_in_doubt()
            except AuditUnavailable as error:
                log.warning("could not look for operations in doubt: %s", error)
                continue
            for tenant_id in tenants:
                if not self._directory.exists(tenant_id):
                    continue
                running = self._actors.get(tenant_id)
                try:
                    if running is None or running.failed:
                        self.actor(tenant_id)
                    else:
                        running.inbox.send_nowait(Reclaim())
                except (trio.WouldBlock, trio.ClosedResourceError, Busy):
                    continue

    def is_active(self, tenant_id: str) -> bool:
        """Whether the tenant has a running actor now (not passivated, never started)."""
        return tenant_id in self._actors

    async def call(
        self,
        tenant_id: str,
        make: Callable[[Reply[T]], TenantMessage],
        receipt: Receipt | None = None,
    ) -> T:
        """Send ``make(reply)`` to the tenant's actor and wait for its answer.

        A full mailbox answers ``Busy`` at once rather than queueing without limit. The
        seqs of the entries the command wrote are noted on ``receipt`` before it answers.
        """
        actor = self.actor(tenant_id)
        reply: Reply[T] = Reply(receipt)
        try:
            actor.inbox.send_nowait(make(reply))
        except trio.WouldBlock:
            raise Busy(
                "too many requests in flight for this tenant", reason="mailbox_full"
            ) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # a closed mailbox: the actor is stopping (the service shuts down)
            raise Busy(
                "the tenant is not taking requests right now", reason="shutting_down"
            ) from None
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
        receipt: Receipt | None = None,
    ) -> str:
        """Provision a tenant with its first token; returns that token's id."""
        if self._directory.exists(tenant_id) or tenant_id in self._creating:
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
                _note(receipt, await ticket.wait())
        finally:
            self._creating.discard(tenant_id)
        return token_id

    async def delete_tenant(
        self, tenant_id: str, source: Source, request_id: str, receipt: Receipt | None = None
    ) -> None:
        """Deprovision a tenant with no VMs; all its tokens stop working."""
        await self.confirm(tenant_id)
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
            tokens = self._directory.tokens(tenant_id) | self._issuing.get(tenant_id, set())
            detail = {"revoked_token_ids": sorted(tokens)}
            try:
                ticket = self._submit("tenant.delete", tenant_id, source, request_id, detail)
                _note(receipt, await ticket.wait())
            except DomainError:
                # not deleted after all (not durable; or, with replicas, another one spawned
                # a VM meanwhile): take spawns again
                await self._reopen(actor)
                raise
        self._actors.pop(tenant_id, None)
        self.limits.forget(tenant_id)
        actor.stop(NotFound("no such tenant"))

    @staticmethod
    async def _reopen(actor: TenantActor) -> None:
        # A blocking send, so a full mailbox delays this instead of losing it.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await actor.inbox.send(Reopen())

    async def issue_token(
        self,
        tenant_id: str,
        source: Source,
        request_id: str,
        expires_at: str | None = None,
        receipt: Receipt | None = None,
    ) -> str:
        """Issue a token id (``expires_at``, RFC 3339, is recorded in the entry)."""
        await self.confirm(tenant_id)
        token_id = new_token_id()
        detail = _token_detail({"token_id": token_id}, expires_at)
        ticket = self._submit("token.issue", tenant_id, source, request_id, detail)
        issuing = self._issuing.setdefault(tenant_id, set())
        issuing.add(token_id)
        try:
            with trio.CancelScope(shield=True):
                _note(receipt, await ticket.wait())
        finally:
            issuing.discard(token_id)
            if not issuing and self._issuing.get(tenant_id) is issuing:
                del self._issuing[tenant_id]
        return token_id

    async def revoke_token(
        self,
        tenant_id: str,
        token_id: str,
        source: Source,
        request_id: str,
        receipt: Receipt | None = None,
    ) -> None:
        if not self._directory.token_valid(tenant_id, token_id):
            raise NotFound("no such token")
        ticket = self._submit("token.revoke", tenant_id, source, request_id, {"token_id": token_id})
        with trio.CancelScope(shield=True):
            _note(receipt, await ticket.wait())

    def _submit(
        self, op: str, tenant_id: str, source: Source, request_id: str, detail: dict[str, Any]
    ) -> Ticket:
        """Write a tenant or token entry; the store folds it in once it is durable."""
        entry = draft(op, "succeeded", tenant_id, None, source.to_json(), request_id, detail)
        return self._store.record(entry)


def _note(receipt: Receipt | None, entry: Entry) -> None:
    if receipt is not None:
        receipt.note(entry)


def _token_detail(detail: dict[str, Any], expires_at: str | None) -> dict[str, Any]:
    """An entry's detail, with the token's expiry when it has one (never the token)."""
    return detail if expires_at is None else {**detail, "expires_at": expires_at}
