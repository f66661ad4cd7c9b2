"""Passivation: idle tenant actors end, keep their state, and come back on the next message.

Everything runs under Trio's virtual clock (each test asks for ``autojump_clock``) with
the audit file work inline, so "idle for 30 s" costs nothing and happens exactly.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from actors.errors import QuotaExceeded
from actors.fleet.embedded import EmbeddedFleet
from actors.service import Service, open_service
from actors.state import Quota, VmSpec
from actors.tenants.protocol import GetUsage, ListVms, Source, Spawn
from conftest import bearer, service_config
from server import settings
from server.app import create_app
from server.auth import Authority
from server.cli import build_parser

ADMIN = Source("127.0.0.1", "admin")
USER = Source("127.0.0.1", "tok-user")
IDLE = 30.0


@pytest.fixture
async def svc(data_dir: Path) -> AsyncIterator[Service]:
    config = service_config(data_dir, fleet_timeout=200.0, inline_io=True, passivate_after=IDLE)
    async with open_service(config) as service:
        yield service


def fleet_of(service: Service) -> EmbeddedFleet:
    driver = service.fleet.driver
    assert isinstance(driver, EmbeddedFleet)
    return driver


async def spawn(service: Service, tenant: str) -> Any:
    spec = VmSpec(1, 256, "debian-12", None)
    return await service.registry.call(
        tenant, lambda reply: Spawn(spec, None, None, USER, "req", reply)
    )


async def test_idle_actor_passivates_and_comes_back_with_its_state(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(8, 8192, 4), ADMIN, "req")
    vm = await spawn(svc, "acme")
    assert svc.registry.is_active("acme")
    await trio.sleep(IDLE / 2)
    assert svc.registry.is_active("acme")  # not idle long enough yet
    await trio.sleep(IDLE)
    assert not svc.registry.is_active("acme")

    usage = await svc.registry.call("acme", GetUsage)
    assert svc.registry.is_active("acme")
    assert usage["allocated"] == {"vcpus": 1, "memory_mib": 256, "vms": 1}
    page, _ = await svc.registry.call("acme", lambda reply: ListVms(None, 10, reply))
    assert [v["id"] for v in page] == [vm["id"]]
    # and it keeps taking writes against the same quota
    await spawn(svc, "acme")
    assert (await svc.registry.call("acme", GetUsage))["allocated"]["vms"] == 2


async def test_pending_fleet_call_keeps_the_actor_alive(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(8, 8192, 4), ADMIN, "req")
    fleet_of(svc).knobs.latency = IDLE * 3  # the spawn job waits far longer than IDLE
    done = trio.Event()

    async def slow_spawn() -> None:
        await spawn(svc, "acme")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_spawn)
        await trio.sleep(IDLE * 2)
        assert not done.is_set()
        assert svc.registry.is_active("acme")  # idle mailbox, but a job in flight
        await done.wait()
    assert svc.registry.is_active("acme")
    await trio.sleep(IDLE * 1.5)
    assert not svc.registry.is_active("acme")


async def test_concurrent_first_messages_start_exactly_one_actor(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(100, 100_000, 10), ADMIN, "req")
    await trio.sleep(IDLE + 1)
    assert not svc.registry.is_active("acme")
    fleet_of(svc).knobs.latency = 0.05
    results: list[outcome.Outcome[Any]] = []

    async def one() -> None:
        results.append(await outcome.acapture(spawn, svc, "acme"))

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(one)
    ok = [r for r in results if isinstance(r, outcome.Value)]
    refused = [r.error for r in results if isinstance(r, outcome.Error)]
    # One owner of the quota: two actors over the same state would admit more than 10.
    assert len(ok) == 10
    assert len(refused) == 20 and all(isinstance(e, QuotaExceeded) for e in refused)


async def test_a_message_in_flight_keeps_the_actor(
    autojump_clock: trio.testing.MockClock, svc: Service
) -> None:
    await svc.registry.create_tenant("acme", Quota(8, 8192, 4), ADMIN, "req")
    await svc.registry.call("acme", GetUsage)
    actor = svc.registry.actor("acme")
    actor.last_active = -math.inf  # idle long enough, whatever the sweep's clock says
    send, receive = trio.open_memory_channel[outcome.Outcome[Any]](2)
    # Handed straight to the parked loop (the buffer stays empty), not handled yet.
    actor.inbox.send_nowait(GetUsage(send))
    assert svc.registry.passivate_idle() == 0
    # Buffered behind it.
    actor.inbox.send_nowait(GetUsage(send))
    assert svc.registry.passivate_idle() == 0
    assert svc.registry.actor("acme") is actor
    for _ in range(2):
        assert (await receive.receive()).unwrap()["tenant"] == "acme"
    # Now parked with nothing pending: it goes, and the next call starts a fresh one.
    actor.last_active = -math.inf
    assert svc.registry.passivate_idle() == 1
    assert not svc.registry.is_active("acme")
    assert (await svc.registry.call("acme", GetUsage))["tenant"] == "acme"
    assert svc.registry.actor("acme") is not actor


async def test_http_requests_reach_a_passivated_tenant(
    autojump_clock: trio.testing.MockClock, svc: Service, data_dir: Path
) -> None:
    authority = Authority.for_data_dir(data_dir)
    client = create_app(svc, authority).test_client()
    admin = bearer((data_dir / "admin.token").read_text().strip())
    quota = {"vcpus": 8, "memory_mib": 8192, "vms": 4}
    created = await client.post(
        "/v1/admin/tenants", json={"id": "acme", "quota": quota}, headers=admin
    )
    assert created.status_code == 201
    token = bearer((await created.get_json())["token"])
    spec = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
    spawned = await client.post("/v1/vms", json=spec, headers=token)
    assert spawned.status_code == 201
    await trio.sleep(IDLE * 2)
    assert not svc.registry.is_active("acme")
    listed = await client.get("/v1/vms", headers=token)
    assert listed.status_code == 200
    assert [v["id"] for v in (await listed.get_json())["vms"]] == [(await spawned.get_json())["id"]]


def passivate_after(argv: list[str], environ: dict[str, str]) -> float:
    """What ``vm-tenant serve`` would run with, through the real settings layer."""
    args = build_parser().parse_args(["serve", *argv])
    return settings.from_args(args, environ).settings.service_config().passivate_after


def test_passivate_after_flag_and_environment() -> None:
    assert passivate_after(["--passivate-after", "12.5"], {}) == 12.5
    assert passivate_after([], {"VM_TENANT_PASSIVATE_AFTER": "7"}) == 7.0
    assert passivate_after([], {}) == 300.0
    with pytest.raises(settings.SettingsError):
        passivate_after(["--passivate-after", "0"], {})
