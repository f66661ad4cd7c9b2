"""Recovery from the data dir: snapshot + replay, torn lines, damage, operations in doubt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.errors import AuditUnavailable, StartupError
from actors.fleet.embedded import EmbeddedFleet
from actors.journal import snapshot as snapshot_module
from actors.journal.chain import seal
from actors.journal.snapshot import snapshot_path
from actors.journal.writer import SYSTEM_SOURCE
from actors.service import Service, open_service
from actors.state import Quota, VmSpec
from actors.tenants.protocol import Destroy, GetUsage, ListVms, Source, Spawn
from conftest import audit_lines, service_config

ADMIN = Source("127.0.0.1", "admin")
USER = Source("127.0.0.1", "tok-user")
SPEC = VmSpec(1, 256, "debian-12", "web")


def fleet_of(service: Service) -> EmbeddedFleet:
    driver = service.fleet.driver
    assert isinstance(driver, EmbeddedFleet)
    return driver


async def spawn(service: Service, tenant: str, key: str | None = None) -> Any:
    return await service.registry.call(
        tenant, lambda reply: Spawn(SPEC, key, "h" if key else None, USER, "req", reply)
    )


async def view(service: Service) -> dict[str, Any]:
    """Everything a restart must keep, as plain data."""
    result: dict[str, Any] = {}
    for tenant in ("acme", "beta"):
        if not service.registry.exists(tenant):
            continue
        vms, _ = await service.registry.call(tenant, lambda reply: ListVms(None, 1000, reply))
        usage = await service.registry.call(tenant, GetUsage)
        tokens = sorted(service.registry._tenants[tenant].tokens)
        result[tenant] = {"vms": vms, "usage": usage, "tokens": tokens}
    return result


async def populate(service: Service) -> None:
    registry = service.registry
    await registry.create_tenant("acme", Quota(8, 8192, 8), ADMIN, "r")
    await registry.create_tenant("beta", Quota(2, 2048, 2), ADMIN, "r")
    token = await registry.issue_token("acme", ADMIN, "r")
    await registry.revoke_token("acme", token, ADMIN, "r")
    vms = [await spawn(service, "acme", key=f"k{n}") for n in range(3)]
    await spawn(service, "beta")
    await registry.call("acme", lambda reply: Destroy(vms[0]["id"], USER, "r", reply))


async def test_restart_with_and_without_snapshot_rebuilds_the_same_state(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await populate(service)
        before = await view(service)
    assert snapshot_path(data_dir).exists()
    async with open_service(config) as service:
        assert await view(service) == before
        assert service.audit.seq == len(audit_lines(data_dir))
    snapshot_path(data_dir).unlink()  # full replay from the genesis
    async with open_service(config) as service:
        assert await view(service) == before
        # the idempotency keys survived too: a retry replays, no second VM
        again = await spawn(service, "acme", key="k1")
        assert again.status == 201
        assert (await view(service))["acme"]["usage"] == before["acme"]["usage"]


async def test_snapshot_mid_run_then_more_entries(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await populate(service)
        anchor = await service.write_snapshot()
        assert anchor.seq == service.audit.seq
        await spawn(service, "acme")
        before = await view(service)
        # a crash: the final snapshot never happens
        snapshot_bytes = snapshot_path(data_dir).read_bytes()
    snapshot_path(data_dir).write_bytes(snapshot_bytes)
    async with open_service(config) as service:
        assert service.snapshot_anchor.seq == anchor.seq
        assert await view(service) == before


async def test_torn_last_line_is_cut_on_start(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await populate(service)
        before = await view(service)
        count = service.audit.seq
    segment = sorted((data_dir / "audit").glob("*.jsonl"))[-1]
    with segment.open("ab") as f:
        f.write(b'{"seq": 999, "op": "vm.sp')
    async with open_service(config) as service:
        assert await view(service) == before
        await spawn(service, "beta")
    lines = audit_lines(data_dir)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, len(lines) + 1))
    assert len(lines) > count


async def test_damage_in_the_replayed_part_stops_the_start(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await populate(service)
    snapshot_path(data_dir).unlink()
    segment = sorted((data_dir / "audit").glob("*.jsonl"))[-1]
    text = segment.read_bytes().replace(b'"vcpus":8', b'"vcpus":80', 1)
    segment.write_bytes(text)
    with pytest.raises(StartupError, match="tampered at seq 1"):
        async with open_service(config):
            pass


async def test_damage_before_the_snapshot_anchor_refuses_writes(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await populate(service)
    segment = sorted((data_dir / "audit").glob("*.jsonl"))[-1]
    # same length, so the snapshot's anchor offset still points at its line
    segment.write_bytes(segment.read_bytes().replace(b'"vcpus":8', b'"vcpus":9', 1))
    async with open_service(config) as service:
        with trio.fail_after(30):
            while service.audit.healthy:
                await trio.sleep(0.01)
        assert not service.ready
        with pytest.raises(AuditUnavailable):
            await spawn(service, "acme")


async def test_operations_in_doubt_are_resolved_against_the_fleet(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await service.registry.create_tenant("acme", Quota(8, 8192, 8), ADMIN, "r")
        doomed = await spawn(service, "acme")
    # Simulate a crash after three `requested` entries were made durable: one spawn the
    # fleet carried out, one it never saw (repeated now, so it lands), and one destroy
    # the fleet carried out.
    fleet = EmbeddedFleet(data_dir / "fleet", boot_seconds=0)
    await fleet.spawn("vm-landed", "acme", SPEC)
    await fleet.destroy(doomed["id"])
    await fleet.aclose()
    lines = audit_lines(data_dir)
    head = json.loads(lines[-1])
    spec = {"vcpus": 1, "memory_mib": 256, "image": "debian-12", "name": None}
    pending = [
        ("vm.spawn", "vm-landed", {"spec": spec, "created_at": "2026-11-27T00:00:00.000000Z"}),
        ("vm.spawn", "vm-lost", {"spec": spec, "created_at": "2026-11-27T00:00:00.000000Z"}),
        ("vm.destroy", doomed["id"], {"previous_state": "running"}),
    ]
    seq, prev, extra = head["seq"], head["hash"], b""
    for op, vm, detail in pending:
        seq += 1
        entry = {
            "seq": seq, "ts": "2026-11-27T00:00:00.000000Z", "tenant": "acme", "vm": vm,
            "op": op, "outcome": "requested", "source": {"ip": "127.0.0.1", "token_id": "t"},
            "request_id": "r", "detail": detail, "prev": prev,
        }  # fmt: skip
        extra += seal(entry)
        prev = entry["hash"]
    segment = sorted((data_dir / "audit").glob("*.jsonl"))[-1]
    with segment.open("ab") as f:
        f.write(extra)

    async with open_service(config) as service:
        with trio.fail_after(30):
            while True:
                vms, _ = await service.registry.call("acme", lambda r: ListVms(None, 10, r))
                if all(vm["state"] in ("pending", "running") for vm in vms):
                    break
                await trio.sleep(0.01)
        assert sorted(vm["id"] for vm in vms) == ["vm-landed", "vm-lost"]
        usage = await service.registry.call("acme", GetUsage)
        assert usage["allocated"] == {"vcpus": 2, "memory_mib": 512, "vms": 2}
        assert fleet_of(service).vm_ids() == {"vm-landed", "vm-lost"}
        await service.audit.wait_durable(seq + 3)
    resolutions = {
        (e["vm"], e["op"]): e for e in map(json.loads, audit_lines(data_dir)) if e["seq"] > seq
    }
    assert resolutions[("vm-landed", "vm.spawn")]["outcome"] == "succeeded"
    assert resolutions[("vm-lost", "vm.spawn")]["outcome"] == "succeeded"
    assert resolutions[(doomed["id"], "vm.destroy")]["outcome"] == "succeeded"
    assert all(e["source"] == SYSTEM_SOURCE for e in resolutions.values())


async def test_a_compaction_while_serving_leaves_the_collector_on(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_service(service_config(data_dir)) as service:
        await populate(service)

        def refuse() -> None:
            raise AssertionError("a compaction switched the process's cyclic GC off")

        # The switch is process-wide: while requests are served it must stay on.
        monkeypatch.setattr(snapshot_module.gc, "disable", refuse)
        anchor = await service.write_snapshot()
        assert anchor.seq == service.audit.seq
