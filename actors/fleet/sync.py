"""VM states as the fleet last reported them: a periodic sweep, never a call per read.

A VM's state in the proxy is what the fleet answered when its spawn was confirmed
(usually ``pending``); the fleet moves it on (``running``, ``error``) without telling
anyone. Reads (``GET /v1/vms``, the ``vm_tenant_vms`` metric) answer from the store and
never call the fleet, so :class:`FleetSync` asks instead: every ``interval`` seconds, one
``list`` call per tenant that has VMs, ``concurrency`` of them at once, and records the
answers through the store (:meth:`~actors.store.Store.record_fleet_states`), which gives
the fleet's state only to VMs with no operation in flight. A single VM's live status (the
answer ``GET /v1/vms/{id}`` asks for) is recorded the same way by the edge.

How stale a state can be: one sweep, i.e. ``interval`` plus the time a sweep takes
(about ``tenants with VMs / concurrency`` round trips to the fleet), while the fleet
answers. While its circuit breaker is open the sweep asks nothing and the states stay as
last reported; a tenant whose list call fails keeps its states until the next sweep.
"""

from __future__ import annotations

import logging

import trio

from actors.errors import DomainError
from actors.fleet.client import FleetClient
from actors.store import Store

log = logging.getLogger("vm_tenant.fleet.sync")


class FleetSync:
    """The sweep that copies the fleet's VM states into the store (see the module doc)."""

    def __init__(
        self, store: Store, fleet: FleetClient, *, interval: float, concurrency: int = 4
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.interval = interval
        self.concurrency = concurrency
        #: sweeps completed, and VMs whose state changed, since start
        self.sweeps = 0
        self.changed = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``interval`` seconds until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception:
                # A bug here must not end the service: the states just stay older.
                log.exception("the fleet state sweep failed")

    async def sweep(self) -> int:
        """Ask the fleet once about each tenant with VMs; returns how many VMs changed."""
        tenants = iter(self.store.tenants_with_vms())
        changed = 0

        async def worker() -> None:
            nonlocal changed
            for tenant in tenants:
                if not self.fleet.accepting():
                    return  # the breaker is open: asking would only be refused
                try:
                    states = await self.fleet.states(tenant)
                    changed += await self.store.record_fleet_states(tenant, states)
                except DomainError as error:
                    log.debug("fleet states of %s not synced: %s", tenant, error)

        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(worker)
        self.sweeps += 1
        self.changed += changed
        return changed
