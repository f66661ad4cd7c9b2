"""Replicas for the tests: ``vm-tenant serve`` processes on one PostgreSQL database, one fleet.

A :class:`Replicas` set is a private PostgreSQL cluster (the test may stop and start it),
one database on it, the reference fleet controller (``tests/fleet_server.py``, shared by
every replica, as a real fleet would be) and N replicas, each a real ``vm-tenant serve``
with its own data dir and ``--store`` on that database, started concurrently. The
operator's token is the one the replica that created the log wrote into its data dir.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from actors.store.postgres.schema import advisory_key
from conftest import UNLIMITED, LiveServer, bearer
from fleet_server import FleetServer
from pgcluster import PgCluster, start_cluster

SEQUENCER_LOCK = advisory_key("vm-tenant.audit.sequencer")


@dataclass
class Replicas:
    cluster: PgCluster
    database: str
    fleet: FleetServer
    root: Path
    count: int = 3
    servers: list[LiveServer] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.database)

    def env(self) -> dict[str, str]:
        return {
            **UNLIMITED,
            "VM_TENANT_STORE": self.dsn,
            "VM_TENANT_FLEET": self.fleet.url,
            "VM_TENANT_FLEET_TIMEOUT": "2",
            "VM_TENANT_LOG_LEVEL": "warning",
        }

    def start(self) -> Replicas:
        self.servers = [
            LiveServer(self.root / f"replica-{n}", env=self.env()) for n in range(self.count)
        ]
        with ThreadPoolExecutor(self.count) as pool:
            list(pool.map(LiveServer.start, self.servers))
        return self

    def restart(self, n: int) -> LiveServer:
        """Start replica ``n`` again (after it was killed), on its data dir."""
        server = LiveServer(self.servers[n].data_dir, env=self.env()).start()
        self.servers[n] = server
        return server

    @property
    def admin(self) -> dict[str, str]:
        """The operator's header (the token the first replica wrote)."""
        for server in self.servers:
            path = server.data_dir / "admin.token"
            if path.exists():
                return bearer(path.read_text().strip())
        raise AssertionError("no replica wrote admin.token")

    def clients(self) -> list[httpx.AsyncClient]:
        return [server.client() for server in self.servers]

    def sequencing(self) -> int:
        """The index of the replica that holds the sequencer lock now."""
        classid, objid = (SEQUENCER_LOCK >> 32) & 0xFFFFFFFF, SEQUENCER_LOCK & 0xFFFFFFFF
        name = self.cluster.psql(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            f"WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {classid} "
            f"AND l.objid = {objid}",
            self.database,
        ).strip()
        pids = [server.proc.pid if server.proc else -1 for server in self.servers]
        return pids.index(int(name.rpartition("/")[2]))

    def sql(self, query: str) -> str:
        return self.cluster.psql(query, self.database)

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        self.fleet.kill()
        self.cluster.close()


@contextlib.contextmanager
def replica_set(root: Path, count: int = 3) -> Iterator[Replicas]:
    """A cluster, a database, a fleet and ``count`` replicas; everything stopped after."""
    cluster = start_cluster()
    fleet: FleetServer | None = None
    replicas: Replicas | None = None
    try:
        database = cluster.create_database()
        fleet = FleetServer(root / "fleet-state.jsonl").start()
        replicas = Replicas(cluster, database, fleet, root, count)
        replicas.start()
        yield replicas
    finally:
        if replicas is not None:
            replicas.close()
        else:
            if fleet is not None:
                fleet.kill()
            cluster.close()


async def spawn(client: httpx.AsyncClient, token: str, **spec: Any) -> httpx.Response:
    body = {"vcpus": 1, "memory_mib": 256, "image": "debian-12", **spec}
    return await client.post("/v1/vms", json=body, headers=bearer(token))
