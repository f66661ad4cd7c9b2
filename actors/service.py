"""The running core: recovery, the actors' nurseries, background upkeep, ordered shutdown.

:func:`open_service` is the one place that wires the actors together. On entry it
rebuilds the state (snapshot + verified replay, cutting a torn last line), then starts
the audit writer, the fleet client and the tenant registry, each in a nursery of its own
so that shutdown runs in order: tenant actors drain first, then the fleet client, then
the audit writer flushes, then a final snapshot is written. The edge (HTTP) must have
drained before it leaves the context.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from actors.errors import StartupError
from actors.fleet.client import FleetClient, FleetDriver
from actors.fleet.embedded import EmbeddedFleet
from actors.fleet.http import HttpFleet
from actors.journal import snapshot
from actors.journal.chain import ChainBroken
from actors.journal.checkpoint import CheckpointSigner
from actors.journal.writer import AuditWriter, utc_now
from actors.metrics import Metrics, StateReading
from actors.tenants.limits import LimitSettings
from actors.tenants.registry import TenantRegistry

log = logging.getLogger("vm_tenant.service")


@dataclass(slots=True)
class ServiceConfig:
    """Settings of the core; the CLI fills them from flags and the environment."""

    data_dir: Path
    fleet: str = "embedded"
    fleet_timeout: float = 10.0
    snapshot_interval: float = 60.0
    checkpoint_interval: float = 10.0
    checkpoint_every: int = 1000
    shutdown_grace: float = 10.0
    mailbox_size: int = 256
    embedded_boot_seconds: float = 1.0
    #: per-tenant requests/s (0 = off), bucket size, spawns in flight (0 = off)
    rate_limit: float = 50.0
    rate_burst: int = 100
    max_inflight_spawns: int = 32
    #: an idle tenant actor ends after this many seconds; its state stays in memory
    passivate_after: float = 300.0
    #: audit file work on the event loop thread (tests under Trio's virtual clock only)
    inline_io: bool = False


@dataclass(slots=True)
class Service:
    """Handles to the running actors, for the edge."""

    config: ServiceConfig
    audit: AuditWriter
    fleet: FleetClient
    registry: TenantRegistry
    checkpoints: CheckpointSigner
    metrics: Metrics = field(default_factory=Metrics)
    recovered: bool = False
    snapshot_anchor: snapshot.Anchor = field(default_factory=snapshot.Anchor)

    @property
    def ready(self) -> bool:
        return self.recovered and self.audit.healthy

    def latest_checkpoint(self) -> dict[str, Any] | None:
        return self.checkpoints.latest

    async def write_checkpoint(self) -> None:
        """Sign the durable head, unless the latest checkpoint already covers it."""
        latest = self.checkpoints.latest
        seq, head = self.audit.seq, self.audit.head
        if seq == 0 or (latest is not None and latest["seq"] == seq):
            return
        await trio.to_thread.run_sync(self.checkpoints.append, seq, head, utc_now())

    async def write_snapshot(self) -> snapshot.Anchor:
        """Compact the durable log into a new snapshot (in a worker thread)."""
        upto = self.audit.seq
        self.snapshot_anchor = await trio.to_thread.run_sync(
            snapshot.compact, self.config.data_dir, upto
        )
        return self.snapshot_anchor


def read_state(registry: TenantRegistry, writer: AuditWriter) -> StateReading:
    """What the metrics export at scrape time, read from the actors between their turns."""
    actors = registry.live_actors()
    tenants = registry.tenant_states()
    by_state: dict[str, int] = {}
    for tenant in tenants:
        for vm in tenant.vms.values():
            by_state[vm.state] = by_state.get(vm.state, 0) + 1
    return StateReading(
        active_actors=len(actors),
        provisioned_tenants=len(tenants),
        mailbox_depths=[
            (actor.tenant_id, actor.inbox.statistics().current_buffer_used) for actor in actors
        ],
        vms_by_state=by_state,
        audit_seq=writer.seq,
        audit_queue_depth=writer.queue_depth,
        audit_healthy=writer.healthy,
    )


def make_driver(config: ServiceConfig) -> FleetDriver:
    if config.fleet == "embedded":
        return EmbeddedFleet(config.data_dir / "fleet", boot_seconds=config.embedded_boot_seconds)
    if config.fleet.startswith(("http://", "https://")):
        return HttpFleet(config.fleet, read_timeout=config.fleet_timeout)
    raise StartupError(f"--fleet must be 'embedded' or an http(s):// URL, not {config.fleet!r}")


def limit_settings(config: ServiceConfig) -> LimitSettings:
    try:
        return LimitSettings(config.rate_limit, config.rate_burst, config.max_inflight_spawns)
    except ValueError as error:
        raise StartupError(f"bad limits: {error}") from None


@asynccontextmanager
async def open_service(
    config: ServiceConfig, *, driver: FleetDriver | None = None
) -> AsyncIterator[Service]:
    """Recover the data dir and run the core until the context exits."""
    limits = limit_settings(config)
    data_dir = config.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (data_dir / "audit").mkdir(mode=0o700, exist_ok=True)
    try:
        replayed = await trio.to_thread.run_sync(lambda: snapshot.replay(data_dir, cut_torn=True))
    except (ChainBroken, snapshot.SnapshotError) as error:
        raise StartupError(f"cannot start on {data_dir}: {error}") from error
    if replayed.torn_cut:
        log.warning("cut an incomplete last audit line (it was never acknowledged)")
    head = replayed.head
    metrics = Metrics()
    writer = AuditWriter(
        data_dir / "audit", head.seq, head.hash, inline_io=config.inline_io, metrics=metrics
    )
    fleet = FleetClient(
        driver or make_driver(config), timeout=config.fleet_timeout, metrics=metrics
    )
    registry = TenantRegistry(
        replayed.state.tenants,
        writer,
        fleet,
        mailbox_size=config.mailbox_size,
        call_timeout=config.fleet_timeout * 2 + 5,
        limits=limits,
        passivate_after=config.passivate_after,
    )
    signer = await trio.to_thread.run_sync(CheckpointSigner, data_dir)
    metrics.watch(lambda: read_state(registry, writer))
    service = Service(
        config, writer, fleet, registry, signer, metrics, snapshot_anchor=replayed.anchor
    )
    async with trio.open_nursery() as audit_nursery:
        await audit_nursery.start(writer.run)
        async with trio.open_nursery() as fleet_nursery:
            await fleet_nursery.start(fleet.run)
            async with trio.open_nursery() as tenants_nursery:
                await tenants_nursery.start(registry.run)
                service.recovered = True
                async with trio.open_nursery() as upkeep:
                    upkeep.start_soon(_verify_prefix, service, replayed.anchor)
                    upkeep.start_soon(_snapshot_loop, service)
                    upkeep.start_soon(_checkpoint_loop, service)
                    try:
                        yield service
                    finally:
                        upkeep.cancel_scope.cancel()
                registry.close()
                tenants_nursery.cancel_scope.deadline = trio.current_time() + config.shutdown_grace
            fleet.close()
        writer.close()
    with trio.CancelScope(shield=True):
        await _final_upkeep(service)


async def _final_upkeep(service: Service) -> None:
    """After the writer flushed: a last checkpoint and a last snapshot."""
    if not service.audit.healthy:
        log.error("audit log unhealthy at shutdown; no final checkpoint or snapshot")
        return
    try:
        await service.write_checkpoint()
        anchor = await service.write_snapshot()
    except (OSError, ChainBroken, snapshot.SnapshotError) as error:
        log.error("final checkpoint/snapshot failed: %s", error)
        return
    log.info("stopped; snapshot at seq %d", anchor.seq)


async def _verify_prefix(service: Service, anchor: snapshot.Anchor) -> None:
    """Verify the chain before the snapshot's anchor; damage there stops all writes."""
    audit_dir = service.config.data_dir / "audit"
    report = await trio.to_thread.run_sync(
        snapshot.verify_prefix, audit_dir, anchor, abandon_on_cancel=True
    )
    if report.intact:
        return
    service.audit.mark_damaged(
        f"audit chain {report.verdict} at seq {report.bad_seq}: {report.reason}"
    )


async def _snapshot_loop(service: Service) -> None:
    while True:
        await trio.sleep(service.config.snapshot_interval)
        if service.audit.seq > service.snapshot_anchor.seq:
            try:
                await service.write_snapshot()
            except (OSError, ChainBroken, snapshot.SnapshotError) as error:
                log.error("snapshot failed (will retry): %s", error)


async def _checkpoint_loop(service: Service) -> None:
    """Sign the head every ``checkpoint_interval`` s, or every ``checkpoint_every`` entries."""
    while True:
        latest = service.checkpoints.latest
        since = latest["seq"] if latest is not None else 0
        with trio.move_on_after(service.config.checkpoint_interval):
            await service.audit.wait_durable(since + service.config.checkpoint_every)
        try:
            if not service.audit.healthy:
                raise OSError("the audit log is not healthy")
            await service.write_checkpoint()
        except OSError as error:
            log.error("checkpoint failed (will retry): %s", error)
            # not in a tight loop: the entry-count trigger is still past due
            await trio.sleep(min(1.0, service.config.checkpoint_interval))
