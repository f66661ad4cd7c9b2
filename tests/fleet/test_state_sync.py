"""VM states as the fleet last reported them (``actors/fleet/sync.py``), in-process.

The real actors, store and app over the embedded fleet, whose VMs stay ``pending`` for
``boot_seconds`` of wall-clock time: a test makes the fleet report ``running`` by
shortening that, then checks what the list, a VM's page and the metrics show, and what
it cost the fleet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from actors.fleet import embedded
from actors.service import open_service
from actors.store import file as file_store
from conftest import Api, service_config
from server.app import create_app
from server.auth import Authority


@pytest.fixture
async def booting(data_dir: Path) -> AsyncIterator[Api]:
    """A service whose fleet keeps VMs pending for an hour, with a sweep every 5 s."""
    config = service_config(
        data_dir, embedded_boot_seconds=3600.0, fleet_sync_interval=5.0, inline_io=True
    )
    async with open_service(config) as service:
        app = create_app(service, Authority.for_store(service.store))
        token = (data_dir / "admin.token").read_text().strip()
        yield Api(app.test_client(), service, token)


async def listed(api: Api, token: str) -> dict[str, str]:
    response = await api.client.get("/v1/vms", headers={"Authorization": token})
    assert response.status_code == 200
    return {vm["id"]: vm["state"] for vm in (await response.get_json())["vms"]}


def vms_metric(api: Api) -> dict[str, float]:
    text = generate_latest(api.service.metrics.registry).decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vm_tenant_vms{"):
            state = line.split('state="')[1].split('"')[0]
            found[state] = float(line.rsplit(" ", 1)[1])
    return found


async def spawned(api: Api, token: str, count: int) -> list[dict[str, Any]]:
    made = []
    for _ in range(count):
        response = await api.spawn(token)
        assert response.status_code == 201
        made.append(await response.get_json())
    return made


async def test_a_sweep_brings_the_list_and_the_metric_to_the_fleets_word(
    autojump_clock: trio.testing.MockClock, booting: Api
) -> None:
    api = booting
    token = (await api.provision("acme")).bearer
    made = await spawned(api, token, 3)
    assert set((await listed(api, token)).values()) == {"pending"}
    api.fleet.boot_seconds = 0.0  # the fleet now reports them running

    calls = api.fleet.calls
    for _ in range(20):
        assert set((await listed(api, token)).values()) == {"pending"}
    assert api.fleet.calls == calls, "a list request never calls the fleet"
    assert vms_metric(api).get("pending") == 3

    await trio.sleep(5.5)  # one sweep interval, on the virtual clock
    assert await listed(api, token) == {vm["id"]: "running" for vm in made}
    assert api.fleet.calls == calls + 1, "one list call for the tenant"
    assert vms_metric(api) == {"running": 3}


async def test_a_vms_live_state_is_what_the_list_shows_next(
    autojump_clock: trio.testing.MockClock, booting: Api
) -> None:
    api = booting
    token = (await api.provision("acme")).bearer
    first, second = await spawned(api, token, 2)
    api.fleet.boot_seconds = 0.0
    page = await api.client.get(f"/v1/vms/{first['id']}", headers={"Authorization": token})
    assert (await page.get_json())["state"] == "running"
    assert await listed(api, token) == {first["id"]: "running", second["id"]: "pending"}


async def test_a_vm_with_an_operation_in_flight_keeps_its_state(
    autojump_clock: trio.testing.MockClock, booting: Api
) -> None:
    api = booting
    token = (await api.provision("acme")).bearer
    (vm,) = await spawned(api, token, 1)
    api.fleet.knobs.hang = True  # the destroy waits for the fleet...
    async with trio.open_nursery() as nursery:
        destroy = partial(api.client.delete, headers={"Authorization": token})
        nursery.start_soon(destroy, f"/v1/vms/{vm['id']}")
        await trio.testing.wait_all_tasks_blocked()
        assert await listed(api, token) == {vm["id"]: "destroying"}
        # ...and whatever the fleet says meanwhile does not take it back from its destroy
        store = api.service.store
        assert await store.record_fleet_states("acme", {vm["id"]: "running"}) == 0
        assert await listed(api, token) == {vm["id"]: "destroying"}
        api.fleet.knobs.hang = False
        nursery.cancel_scope.cancel()


async def test_no_sweep_asks_while_the_fleets_circuit_is_open(
    autojump_clock: trio.testing.MockClock, booting: Api
) -> None:
    api = booting
    token = (await api.provision("acme")).bearer
    await spawned(api, token, 1)
    breaker = api.service.fleet.breaker
    breaker.open_until = trio.current_time() + 60
    calls = api.fleet.calls
    assert await api.service.sync.sweep() == 0  # type: ignore[union-attr]
    assert api.fleet.calls == calls


async def test_a_long_list_is_recorded_in_slices_that_let_requests_run(
    autojump_clock: trio.testing.MockClock, booting: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = booting
    quota = {"vcpus": 64, "memory_mib": 65536, "vms": 16}
    token = (await api.provision("acme", quota)).bearer
    made = await spawned(api, token, 5)
    monkeypatch.setattr(file_store, "SYNC_SLICE", 2)
    monkeypatch.setattr(embedded, "LIST_SLICE", 2)
    api.fleet.boot_seconds = 0.0
    done = trio.Event()
    turns = 0  # turns another task had while the fleet's list was read and recorded

    async def other_task() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await trio.lowlevel.checkpoint()

    async def sync_once() -> None:
        states = await api.service.fleet.states("acme")
        assert await api.service.store.record_fleet_states("acme", states) == 5
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        nursery.start_soon(sync_once)
    # 5 VMs in slices of 2: the list yields twice, the recording twice (and the one
    # fleet call may yield too); without slices the other task gets one turn at most
    assert turns >= 4
    assert await listed(api, token) == {vm["id"]: "running" for vm in made}
