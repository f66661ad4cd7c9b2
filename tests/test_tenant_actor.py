"""Tenant actors in-process, under the virtual clock: reservation, release, ordering, restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from actors.errors import AuditUnavailable, FleetError, FleetInDoubt, InternalError, QuotaExceeded
from actors.fleet.embedded import EmbeddedFleet
from actors.service import Service, open_service
from actors.state import Quota, TenantState, VmSpec
from actors.tenants import actor as tenant_module
from actors.tenants.protocol import Destroy, GetUsage, GetVm, ListVms, Source, Spawn
from conftest import audit_lines, service_config

ADMIN = Source("127.0.0.1", "admin")
USER = Source("127.0.0.1", "tok-user")


def fleet_of(service: Service) -> EmbeddedFleet:
    driver = service.fleet.driver
    assert isinstance(driver, EmbeddedFleet)
    return driver


async def spawn(service: Service, tenant: str, vcpus: int = 1, memory: int = 256) -> Any:
    spec = VmSpec(vcpus, memory, "debian-12", None)
    return await service.registry.call(
        tenant, lambda reply: Spawn(spec, None, None, USER, "req", reply)
    )


async def destroy(service: Service, tenant: str, vm_id: str) -> Any:
    return await service.registry.call(tenant, lambda reply: Destroy(vm_id, USER, "req", reply))


async def usage(service: Service, tenant: str) -> dict[str, int]:
    return (await service.registry.call(tenant, GetUsage))["allocated"]


# pytest-trio takes the clock from the test's own arguments, so every test below asks for
# ``autojump_clock`` itself.
@pytest.fixture
async def svc(data_dir: Path) -> Any:
    config = service_config(data_dir, fleet_timeout=2.0, inline_io=True)
    async with open_service(config) as service:
        yield service


@pytest.mark.parametrize(
    ("quota", "vcpus", "memory"),
    [
        (Quota(1000, 100_000, 10), 1, 256),  # vms
        (Quota(10, 100_000, 1000), 1, 256),  # vcpus
        (Quota(1000, 10 * 256, 1000), 1, 256),  # memory_mib
    ],
)
async def test_concurrent_spawns_never_exceed_quota(
    autojump_clock: trio.testing.MockClock, svc: Service, quota: Quota, vcpus: int, memory: int
) -> None:
    await svc.registry.create_tenant("acme", quota, ADMIN, "req")
    fleet_of(svc).knobs.latency = 0.05  # spawns overlap at the fleet
    results: list[outcome.Outcome[Any]] = []

    async def one() -> None:
        results.append(await outcome.acapture(spawn, svc, "acme", vcpus, memory))

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(one)
    ok = [r.unwrap() for r in results if isinstance(r, outcome.Value)]
    refused = [r.error for r in results if isinstance(r, outcome.Error)]
    assert len(ok) == 10
    assert len(refused) == 30 and all(isinstance(e, QuotaExceeded) for e in refused)
    allocated = await usage(svc, "acme")
    assert allocated == {"vcpus": 10 * vcpus, "memory_mib": 10 * memory, "vms": 10}
    assert fleet_of(svc).vm_ids() == {vm["id"] for vm in ok}


async def test_fleet_failure_releases_the_reservation(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 1), ADMIN, "req")
    fleet_of(svc).knobs.fail_next = 1
    with pytest.raises(FleetError):
        await spawn(svc, "acme")
    assert await usage(svc, "acme") == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    vm = await spawn(svc, "acme")  # the released capacity is usable again
    assert vm["state"] == "running"
    ops = [(e["op"], e["outcome"]) for e in map(_json, audit_lines(svc.config.data_dir))]
    assert ops[1:] == [
        ("vm.spawn", "requested"),
        ("vm.spawn", "failed"),
        ("vm.spawn", "requested"),
        ("vm.spawn", "succeeded"),
    ]


async def test_capacity_is_released_only_after_the_fleet_confirms_destroy(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 1), ADMIN, "req")
    vm = await spawn(svc, "acme")
    fleet_of(svc).knobs.latency = 1.5  # below the 2 s fleet timeout
    async with trio.open_nursery() as nursery:
        nursery.start_soon(destroy, svc, "acme", vm["id"])
        await trio.testing.wait_all_tasks_blocked()
        # the destroy is at the fleet: the VM still counts and no new spawn fits
        assert await usage(svc, "acme") == {"vcpus": 1, "memory_mib": 256, "vms": 1}
        record = await svc.registry.call("acme", lambda reply: GetVm(vm["id"], reply))
        assert record["state"] == "destroying"
        fleet_of(svc).knobs.latency = 0.0
        with pytest.raises(QuotaExceeded):
            await spawn(svc, "acme")
    assert await usage(svc, "acme") == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    assert fleet_of(svc).vm_ids() == set()


async def test_failed_destroy_keeps_the_vm_and_its_capacity(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 2), ADMIN, "req")
    vm = await spawn(svc, "acme")
    fleet_of(svc).knobs.fail_next = 1
    with pytest.raises(FleetError):
        await destroy(svc, "acme", vm["id"])
    record = await svc.registry.call("acme", lambda reply: GetVm(vm["id"], reply))
    assert record["state"] == "running"
    assert (await usage(svc, "acme"))["vms"] == 1


async def test_lost_fleet_answer_keeps_capacity_until_reconciled(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 1), ADMIN, "req")
    fleet_of(svc).knobs.hang = True
    with pytest.raises(FleetInDoubt):
        await spawn(svc, "acme")
    page, _ = await svc.registry.call("acme", lambda reply: ListVms(None, 10, reply))
    assert [vm["state"] for vm in page] == ["unknown"]
    assert (await usage(svc, "acme"))["vms"] == 1
    fleet_of(svc).knobs.hang = False
    # the reconciler repeats the spawn (idempotent by id) until the fleet answers
    for _ in range(100):
        vm = (await svc.registry.call("acme", lambda reply: ListVms(None, 10, reply)))[0][0]
        if vm["state"] != "unknown":
            break
        await trio.sleep(1)
    assert vm["state"] == "running"
    assert fleet_of(svc).vm_ids() == {vm["id"]}
    assert (await usage(svc, "acme"))["vms"] == 1
    # tenant.create, vm.spawn requested, and the reconciler's resolution
    await svc.audit.wait_durable(3)
    last = _json(audit_lines(svc.config.data_dir)[-1])
    assert (last["op"], last["outcome"], last["vm"], last["source"]["token_id"]) == (
        "vm.spawn",
        "succeeded",
        vm["id"],
        "system",
    )


async def test_definite_refusal_while_reconciling_releases(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 1), ADMIN, "req")
    fleet_of(svc).knobs.hang = True
    with pytest.raises(FleetInDoubt):
        await spawn(svc, "acme")
    fleet_of(svc).knobs.hang = False
    fleet_of(svc).knobs.fail_next = 1  # the repeated spawn is refused for good
    for _ in range(100):
        if (await usage(svc, "acme"))["vms"] == 0:
            break
        await trio.sleep(1)
    assert (await usage(svc, "acme"))["vms"] == 0
    assert fleet_of(svc).vm_ids() == set()


async def test_one_slow_tenant_does_not_stall_another(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("slow", Quota(4, 4096, 4), ADMIN, "req")
    await svc.registry.create_tenant("fast", Quota(4, 4096, 4), ADMIN, "req")
    fleet_of(svc).knobs.hang = True
    answered = trio.Event()

    async def stuck_spawn() -> None:
        with pytest.raises(FleetInDoubt):
            await spawn(svc, "slow")
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck_spawn)
        while fleet_of(svc).calls == 0:
            await trio.sleep(0.001)
        # the spawn sits at the fleet; reads of that tenant and of another still answer
        assert (await usage(svc, "slow"))["vms"] == 1
        assert (await usage(svc, "fast"))["vms"] == 0
        assert not answered.is_set()
        fleet_of(svc).knobs.hang = False


async def test_supervisor_restarts_a_crashed_actor(
    autojump_clock: trio.testing.MockClock, svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "req")
    vm = await spawn(svc, "acme")
    real_usage = tenant_module.usage_view
    crashes = {"left": 1}

    def crashing_usage(tenant: TenantState) -> dict[str, Any]:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("bug")
        return real_usage(tenant)

    monkeypatch.setattr(tenant_module, "usage_view", crashing_usage)
    with pytest.raises(InternalError):
        await usage(svc, "acme")
    actor = svc.registry.actor("acme")
    assert actor.restarts == 1 and not actor.failed
    assert (await usage(svc, "acme"))["vms"] == 1  # same state after the restart
    record = await svc.registry.call("acme", lambda reply: GetVm(vm["id"], reply))
    assert record["id"] == vm["id"]


async def test_restart_budget_exhausted_gives_a_fresh_actor(
    autojump_clock: trio.testing.MockClock, svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "req")
    first = svc.registry.actor("acme")
    real_usage = tenant_module.usage_view
    monkeypatch.setattr(tenant_module, "usage_view", lambda tenant: 1 / 0)
    for _ in range(6):
        with pytest.raises(InternalError):
            await usage(svc, "acme")
    assert first.failed
    monkeypatch.setattr(tenant_module, "usage_view", real_usage)
    assert (await usage(svc, "acme"))["vms"] == 0
    assert svc.registry.actor("acme") is not first


async def test_audit_failure_means_nothing_is_forwarded(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "req")
    svc.audit.mark_damaged("test")
    with pytest.raises(AuditUnavailable):
        await spawn(svc, "acme")
    assert fleet_of(svc).calls == 0
    assert (await usage(svc, "acme"))["vms"] == 0
    assert not svc.ready


def _json(line: bytes) -> dict[str, Any]:
    return json.loads(line)


async def test_a_lone_spawn_pays_one_fsync_per_entry_and_no_linger(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(64, 64 * 256, 64), ADMIN, "req")
    before, lingered = svc.audit.stats.fsyncs, svc.audit.stats.lingered
    for _ in range(3):
        await spawn(svc, "acme")
    # requested + succeeded per spawn, each made durable on its own ...
    assert svc.audit.stats.fsyncs - before == 6
    # ... at once: with no other operation in flight the writer never waits for company.
    assert svc.audit.stats.lingered == lingered


async def test_concurrent_spawns_share_their_fsyncs(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(64, 64 * 256, 64), ADMIN, "req")
    before = svc.audit.stats.fsyncs
    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(spawn, svc, "acme")
    assert await usage(svc, "acme") == {"vcpus": 64, "memory_mib": 64 * 256, "vms": 64}
    fsyncs = svc.audit.stats.fsyncs - before
    # 128 entries; the outcomes due after the first batch are gathered into one commit.
    assert fsyncs / 64 < 0.2, fsyncs
    assert svc.audit.stats.lingered > 0
