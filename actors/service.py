"""The running core: the store, the actors' nurseries, background upkeep, ordered shutdown.

:func:`open_service` is the one place that wires the actors together. On entry it opens
the store that ``ServiceConfig.store`` names (:func:`open_store`: the file store rebuilds
the state from the snapshot and a verified replay, cutting a torn last line, and starts
the audit writer; the PostgreSQL store joins the database, creating the schema and the
log's keys on the first start, and runs the replica's sequencer and followers), then
starts the fleet client and the tenant registry, each in a nursery of its own so that
shutdown runs in order: the store's upkeep and the fleet state sweep stop, tenant actors
drain, then the fleet client, then the store closes (the audit writer flushes; a last
checkpoint and snapshot). The edge (HTTP) must have drained before it leaves the context.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from actors.errors import StartupError
from actors.fleet.client import FleetClient, FleetDriver
from actors.fleet.embedded import EmbeddedFleet
from actors.fleet.http import HttpFleet
from actors.fleet.sync import FleetSync
from actors.journal import snapshot
from actors.journal.checkpoint import CheckpointSigner
from actors.journal.writer import AuditWriter
from actors.metrics import Metrics, StateReading
from actors.store import Store
from actors.store.file import FileStore, FileStoreConfig, open_file_store
from actors.tenants.limits import LimitSettings
from actors.tenants.registry import TenantRegistry

log = logging.getLogger("vm_tenant.service")


@dataclass(slots=True)
class ServiceConfig:
    """Settings of the core; the CLI fills them from flags and the environment."""

    data_dir: Path
    #: ``file`` (the data dir) or a ``postgresql://`` URL (replicas sharing that database)
    store: str = "file"
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
    #: an idle tenant actor ends after this many seconds; its state stays in the store
    passivate_after: float = 300.0
    #: seconds between two sweeps that copy the fleet's VM states (actors/fleet/sync.py)
    fleet_sync_interval: float = 10.0
    #: audit file work on the event loop thread (tests under Trio's virtual clock only)
    inline_io: bool = False

    def file_store(self) -> FileStoreConfig:
        return FileStoreConfig(
            self.data_dir,
            snapshot_interval=self.snapshot_interval,
            checkpoint_interval=self.checkpoint_interval,
            checkpoint_every=self.checkpoint_every,
            inline_io=self.inline_io,
        )


@dataclass(slots=True)
class Service:
    """Handles to the running core, for the edge: the store (as the interface) and the
    actors."""

    config: ServiceConfig
    store: Store
    fleet: FleetClient
    registry: TenantRegistry
    metrics: Metrics = field(default_factory=Metrics)
    #: the sweep that keeps VM states as the fleet last reported them
    sync: FleetSync | None = None
    recovered: bool = False
    #: the same store when it is the file store, for what only it has (the tests, the
    #: bench): the edge sees ``store``, the interface, only
    file_store: FileStore | None = None

    @property
    def reads(self) -> Store:
        """The store, as the edge, the tests and the bench read it (immutable views)."""
        return self.store

    @property
    def ready(self) -> bool:
        return self.recovered and self.store.ready

    # -- the file store's own pieces ---------------------------------------------------------

    def _file(self) -> FileStore:
        if self.file_store is None:
            raise RuntimeError("this service does not run on the file store")
        return self.file_store

    @property
    def audit(self) -> AuditWriter:
        return self._file().writer

    @property
    def checkpoints(self) -> CheckpointSigner:
        return self._file().checkpoints

    @property
    def snapshot_anchor(self) -> snapshot.Anchor:
        return self._file().snapshot_anchor

    async def write_checkpoint(self) -> None:
        await self._file().write_checkpoint()

    async def write_snapshot(self) -> snapshot.Anchor:
        return await self._file().write_snapshot()

    def latest_checkpoint(self) -> dict[str, Any] | None:
        return self._file().checkpoints.latest


def read_state(registry: TenantRegistry, store: Store, fleet: FleetClient) -> StateReading:
    """What the metrics export at scrape time, read between two turns of the actors."""
    actors = registry.live_actors()
    journal = store.journal_stats()
    return StateReading(
        active_actors=len(actors),
        provisioned_tenants=len(store.directory),
        mailbox_depths=[
            (actor.tenant_id, actor.inbox.statistics().current_buffer_used) for actor in actors
        ],
        vms_by_state=store.vms_by_state(),
        audit_seq=journal.seq,
        audit_queue_depth=journal.queue_depth,
        audit_healthy=journal.healthy,
        fleet_breaker=fleet.breaker.state,
        fleet_failures=fleet.breaker.failures,
        checkpoint=journal.checkpoint,
        snapshot=journal.snapshot,
    )


#: URL schemes that name a PostgreSQL database (asyncpg takes both)
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(config: ServiceConfig, metrics: Metrics) -> AbstractAsyncContextManager[Store]:
    """The store ``config.store`` names, to be entered (StartupError for an unknown one)."""
    if config.store == "file":
        return open_file_store(config.file_store(), metrics)
    if config.store.startswith(POSTGRES_SCHEMES):
        # imported here: only a replica on PostgreSQL loads asyncpg and trio-asyncio
        from actors.store.postgres.store import PostgresStoreConfig, open_postgres_store

        pg = PostgresStoreConfig(
            config.store,
            config.data_dir,
            checkpoint_interval=config.checkpoint_interval,
            checkpoint_every=config.checkpoint_every,
            with_vms_interval=min(5.0, config.fleet_sync_interval),
        )
        if config.fleet == "embedded":
            log.warning(
                "the embedded fleet lives in this replica's data dir: replicas on one "
                "database need one fleet they share (--fleet http://...)"
            )
        return open_postgres_store(pg, metrics)
    raise StartupError(f"--store must be 'file' or a postgresql:// URL, not {config.store!r}")


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
    """Open the store and run the core until the context exits."""
    limits = limit_settings(config)
    metrics = Metrics()
    async with open_store(config, metrics) as store:
        fleet = FleetClient(
            driver or make_driver(config), timeout=config.fleet_timeout, metrics=metrics
        )
        registry = TenantRegistry(
            store,
            fleet,
            mailbox_size=config.mailbox_size,
            call_timeout=config.fleet_timeout * 2 + 5,
            limits=limits,
            passivate_after=config.passivate_after,
        )
        metrics.watch(lambda: read_state(registry, store, fleet))
        file_store = store if isinstance(store, FileStore) else None
        sync = FleetSync(store, fleet, interval=config.fleet_sync_interval)
        service = Service(config, store, fleet, registry, metrics, sync, file_store=file_store)
        async with trio.open_nursery() as fleet_nursery:
            await fleet_nursery.start(fleet.run)
            async with trio.open_nursery() as tenants_nursery:
                await tenants_nursery.start(registry.run)
                service.recovered = True
                async with trio.open_nursery() as upkeep:
                    upkeep.start_soon(store.upkeep)
                    upkeep.start_soon(sync.run)
                    try:
                        yield service
                    finally:
                        upkeep.cancel_scope.cancel()
                registry.close()
                tenants_nursery.cancel_scope.deadline = trio.current_time() + config.shutdown_grace
            fleet.close()
