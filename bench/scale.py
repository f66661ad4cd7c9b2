"""Scale and restart figures of the core, without HTTP: memory, listing, start-up, replay, verify.

Run by hand (never in CI at full size)::

    .venv/bin/python -m bench.scale [--tenants 100000 --vms 1000000] [--quick] [--keep DIR]

It writes real data dirs with the chain code the writer uses (``seal``, 16 MiB segments)
and snapshots them with the real compactor, then measures, each in a fresh subprocess so
that one figure's garbage is not the next one's RSS:

- full replay and ``audit verify`` of the whole history, in entries/s;
- start-up (``open_service`` until ready) over a snapshot, for the full state and for two
  histories of different length over the same small state (start-up must not grow with
  history);
- RSS (``VmRSS``) before and after loading; bytes per tenant (a tenants-only data dir)
  and per VM; with every tenant actor active, and after they all passivated;
- the cost of one page of 100 VMs of a tenant with ``--big`` VMs, with the cursor at the
  start, the middle and the end.

The result is printed as JSON (and written to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from actors.journal import snapshot
from actors.journal.chain import GENESIS, seal
from actors.journal.checkpoint import CheckpointSigner
from actors.journal.segments import lines_from, segment_name
from actors.journal.tiles import TileLog
from actors.journal.verify import verify_data_dir
from actors.service import ServiceConfig, open_service

SEGMENT_BYTES = 16 * 1024 * 1024
SOURCE = {"ip": "127.0.0.1", "token_id": "tok-0123456789abcdef"}
QUOTA = {"vcpus": 10**9, "memory_mib": 10**12, "vms": 10**7}
TS = "2026-01-01T00:00:00.000000Z"


def rss() -> int:
    """Resident set size of this process in bytes, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class History:
    """Appends sealed entries to a data dir's audit segments, as the audit writer does."""

    def __init__(self, data_dir: Path) -> None:
        self.audit_dir = data_dir / "audit"
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        self.seq = 0
        self.head = GENESIS
        self._lines: list[bytes] = []
        self._size = 0
        self._first = 1
        self._vm = 0

    def add(
        self, op: str, outcome: str, tenant: str, vm: str | None, detail: dict[str, Any]
    ) -> None:
        self.seq += 1
        entry = {
            "seq": self.seq,
            "ts": TS,
            "op": op,
            "outcome": outcome,
            "tenant": tenant,
            "vm": vm,
            "source": SOURCE,
            "request_id": f"req-{self.seq:016x}",
            "detail": detail,
            "prev": self.head,
        }
        line = seal(entry)
        self.head = entry["hash"]
        self._lines.append(line)
        self._size += len(line)
        if self._size >= SEGMENT_BYTES:
            self.flush(rotate=True)

    def flush(self, *, rotate: bool = False) -> None:
        path = self.audit_dir / segment_name(self._first)
        with path.open("ab") as f:
            f.write(b"".join(self._lines))
        self._lines = []
        if rotate:
            self._first, self._size = self.seq + 1, 0

    def tenant(self, tenant: str) -> None:
        self.add("tenant.create", "succeeded", tenant, None, {"quota": QUOTA, "token_id": "tok-1"})

    def new_vm_id(self) -> str:
        self._vm += 1
        return f"vm-{self._vm:012x}{secrets.token_hex(10)}"

    def spawn(self, tenant: str) -> str:
        vm = self.new_vm_id()
        spec = {"vcpus": 1, "memory_mib": 256, "image": "debian-12", "name": None}
        self.add("vm.spawn", "requested", tenant, vm, {"spec": spec, "created_at": TS})
        self.add("vm.spawn", "succeeded", tenant, vm, {"state": "running"})
        return vm

    def churn(self, tenant: str) -> None:
        """Four entries that leave the state as it was: a spawn and a destroy."""
        vm = self.spawn(tenant)
        self.add("vm.destroy", "requested", tenant, vm, {"previous_state": "running"})
        self.add("vm.destroy", "succeeded", tenant, vm, {})


def build(data_dir: Path, tenants: int, vms: int, big: int, history: int, tail: int) -> float:
    """Write a data dir and snapshot it ``tail`` entries before its end; returns the time."""
    started = time.perf_counter()
    h = History(data_dir)
    names = [f"tenant-{i:06d}" for i in range(tenants)]
    for name in names:
        h.tenant(name)
    if vms:
        for _ in range(min(big, vms)):
            h.spawn(names[0])
        rest = vms - min(big, vms)
        others = names[1:] or names
        for i in range(rest):
            h.spawn(others[i % len(others)])
    while h.seq < history - tail:
        h.churn(names[-1])
    h.flush()
    snapshot.compact(data_dir, h.seq, CheckpointSigner(data_dir))  # sealed as a server does
    for _ in range(0, tail, 4):
        h.churn(names[-1])
    h.flush()
    # The Merkle tree a server keeps beside its log, synced (as at a shutdown): a restart
    # then reopens it instead of building it from the whole history.
    audit = data_dir / "audit"
    TileLog.open(data_dir / "tree", h.seq, lambda first: lines_from(audit, first + 1))
    return time.perf_counter() - started


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


# -- measurements, each run in its own subprocess ---------------------------------------------


def measure_replay(data_dir: Path) -> dict[str, Any]:
    """Full replay (the snapshot moved aside) and offline verify of the whole log."""
    snap = snapshot.snapshot_path(data_dir)
    aside = snap.with_suffix(".aside")
    snap.rename(aside)
    try:
        seconds, replayed = timed(lambda: snapshot.replay(data_dir))
    finally:
        aside.rename(snap)
    entries = replayed.head.seq
    verify_seconds, report = timed(lambda: verify_data_dir(data_dir))
    assert report.verdict == "ok", report
    return {
        "entries": entries,
        "replay_s": round(seconds, 3),
        "replay_per_s": round(entries / seconds),
        "verify_s": round(verify_seconds, 3),
        "verify_per_s": round(report.entries / verify_seconds),
    }


def measure_restart(data_dir: Path) -> dict[str, Any]:
    async def main() -> float:
        started = time.perf_counter()
        async with open_service(ServiceConfig(data_dir)) as service:
            assert service.ready
            return time.perf_counter() - started

    seconds = trio.run(main)
    return {"startup_s": round(seconds, 3)}


def measure_memory(data_dir: Path, big: str, passivate_after: float) -> dict[str, Any]:
    config = ServiceConfig(data_dir, passivate_after=passivate_after, snapshot_interval=3600)
    result: dict[str, Any] = {}

    async def main() -> None:
        # Warm up on an empty data dir first, so that "before" already holds the modules,
        # worker threads and keys every service has, whatever its size.
        with tempfile.TemporaryDirectory() as empty:
            async with open_service(ServiceConfig(Path(empty))):
                pass
        result["rss_before"] = rss()
        started = time.perf_counter()
        async with open_service(config) as service:
            result["startup_s"] = round(time.perf_counter() - started, 3)
            registry = service.registry
            result["rss_loaded"] = rss()
            tenants = await all_tenants(service)
            result["tenants"] = len(tenants)
            result["vms"] = sum(service.store.vms_by_state().values())
            started = time.perf_counter()
            for tenant in tenants:
                registry.actor(tenant)
            await trio.testing.wait_all_tasks_blocked()  # every actor at its mailbox
            result["activate_all_s"] = round(time.perf_counter() - started, 3)
            result["active_actors"] = sum(map(registry.is_active, tenants))
            result["rss_all_active"] = rss()
            # Every actor is idle from here on; the registry's sweep runs every quarter of
            # passivate_after, so the last one activated goes within 1.25 x of it.
            await trio.sleep(passivate_after * 1.5 + 1)
            result["passivated_after_s"] = passivate_after
            result["active_after_idle"] = sum(map(registry.is_active, tenants))
            result["rss_passivated"] = rss()
            # Last: by now the background check of the chain before the snapshot is done
            # and no longer competes for the interpreter.
            if registry.exists(big) and (await service.reads.usage(big)).allocated.vms > 200:
                result["listing"] = await measure_listing(service, big)

    trio.run(main)
    return result


async def all_tenants(service: Any) -> list[str]:
    """Every tenant id, through the read surface, a page at a time."""
    ids: list[str] = []
    after = None
    while True:
        page, after = await service.reads.tenants(after, 1000)
        ids.extend(tenant.id for tenant in page)
        if after is None:
            return ids


async def measure_listing(service: Any, tenant: str, rounds: int = 200) -> dict[str, Any]:
    """Median microseconds for one page of 100 with the cursor at start, middle and end.

    Through the read surface the HTTP edge uses (no mailbox hop).
    """
    reads = service.reads
    ids: list[str] = []
    after = None
    while True:
        page, after = await reads.vms(tenant, after, 1000)
        ids.extend(vm.id for vm in page)
        if after is None:
            break
    cursors = {"start": None, "middle": ids[len(ids) // 2], "end": ids[-101]}
    figures: dict[str, Any] = {"tenant_vms": len(ids)}
    for where, after in cursors.items():
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            page, _ = await reads.vms(tenant, after, 100)
            samples.append(time.perf_counter() - started)
            assert len(page) == 100
        figures[f"page_{where}_us"] = round(statistics.median(samples) * 1e6, 1)
    return figures


def run_phase(phase: str, data_dir: Path, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scale",
            "--phase",
            phase,
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--tenants", type=int, default=100_000)
    p.add_argument("--vms", type=int, default=1_000_000)
    p.add_argument("--big", type=int, default=100_000, help="VMs of the one big tenant")
    p.add_argument("--histories", default="10000,1000000", help="restart history lengths")
    # Longer than activating every tenant takes (~40-60 s for 100k here), so that all
    # of them are running at once when "all active" is measured.
    p.add_argument("--passivate-after", type=float, default=90.0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    p.add_argument("--keep", type=Path, default=None, help="build data dirs here and keep them")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--phase", choices=["replay", "restart", "memory"], default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.phase is not None:
        assert args.data_dir is not None
        if args.phase == "replay":
            result = measure_replay(args.data_dir)
        elif args.phase == "restart":
            result = measure_restart(args.data_dir)
        else:
            result = measure_memory(args.data_dir, "tenant-000000", args.passivate_after)
        print(json.dumps(result))
        return 0
    if args.quick:
        args.tenants, args.vms, args.big = 50, 600, 300
        args.histories, args.passivate_after = "1000,4000", 0.5
    histories = [int(n) for n in args.histories.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="vm-tenant-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "tenants": args.tenants,
        "vms": args.vms,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    try:
        full, tenants_only = root / "full", root / "tenants-only"
        log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
        log(f"building {args.tenants} tenants / {args.vms} VMs in {full}")
        figures["build_full_s"] = round(build(full, args.tenants, args.vms, args.big, 0, 0), 1)
        build(tenants_only, args.tenants, 0, 0, 0, 0)
        log("replay and verify")
        figures["replay"] = run_phase("replay", full)
        log("memory, tenants only")
        figures["memory_tenants_only"] = run_phase(
            "memory", tenants_only, "--passivate-after", str(args.passivate_after)
        )
        log("memory, full")
        figures["memory_full"] = run_phase(
            "memory", full, "--passivate-after", str(args.passivate_after)
        )
        figures["restart_full"] = run_phase("restart", full)
        small = max(10, args.tenants // 1000)
        for n in histories:
            d = root / f"history-{n}"
            log(f"history of {n} entries")
            build(d, small, small * 10, 0, n, 1000 if n >= 10_000 else 100)
            figures[f"restart_history_{n}"] = run_phase("restart", d)
        figures["summary"] = summarize(figures)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


def summarize(f: dict[str, Any]) -> dict[str, Any]:
    t, full = f["memory_tenants_only"], f["memory_full"]
    per_tenant = (t["rss_loaded"] - t["rss_before"]) / max(1, t["tenants"])
    state_full = full["rss_loaded"] - full["rss_before"]
    per_vm = (state_full - per_tenant * full["tenants"]) / max(1, full["vms"])
    # Actors that had been idle for passivate_after while the others were still being
    # activated may already have ended: count those actually running at the peak.
    per_actor = (full["rss_all_active"] - full["rss_loaded"]) / max(1, full["active_actors"])
    return {
        "bytes_per_tenant": round(per_tenant),
        "bytes_per_vm": round(per_vm),
        "bytes_per_active_actor": round(per_actor),
        "rss_loaded_mib": round(full["rss_loaded"] / 2**20, 1),
        "rss_all_active_mib": round(full["rss_all_active"] / 2**20, 1),
        "rss_passivated_mib": round(full["rss_passivated"] / 2**20, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
