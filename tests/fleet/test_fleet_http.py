"""The proxy against a real fleet controller over HTTP, both as real processes.

Each test starts the reference fleet (``tests/fleet_server.py``) and a ``vm-tenant serve``
pointed at it (``VM_TENANT_FLEET``, a 1 s fleet deadline), on 127.0.0.1, and checks the
rules of ``docs/fleet-api.md`` from the outside: what the tenant is answered, what the
proxy counts and audits, and what the fleet really holds (asked directly). Faults come
from the fleet's ``/_knobs`` (refusals, overload, hangs, garbled answers, latency) and
from ``kill -9`` of either process.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import LiveServer, Provision, bearer
from fleet_server import FleetServer

SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
BIG_QUOTA = {"vcpus": 1000, "memory_mib": 1_000_000, "vms": 1000}
IN_DOUBT = frozenset({"spawning", "destroying", "unknown"})
LIVE = frozenset({"pending", "running"})
SYSTEM_SOURCE = {"ip": None, "token_id": "system"}
TERMINAL = frozenset({"succeeded", "failed"})
NO_KNOBS: dict[str, Any] = {"reset": True}


# -- the two processes -----------------------------------------------------------------------


@dataclass
class Rig:
    """A fleet, a proxy in front of it, and a client for each."""

    fleet: FleetServer
    proxy: LiveServer
    api: httpx.AsyncClient
    ctl: httpx.AsyncClient
    provision: Provision

    @property
    def admin(self) -> dict[str, str]:
        return bearer(self.proxy.admin_token)

    async def reconnect(self) -> None:
        """New clients after a restart (the old pools hold dead connections)."""
        await self.api.aclose()
        await self.ctl.aclose()
        self.api = self.proxy.client()
        self.ctl = httpx.AsyncClient(base_url=self.fleet.url, timeout=30.0)

    async def tenant(self, tenant: str, quota: dict[str, int]) -> str:
        """A tenant through the proxy (the ``provision`` fixture); its token."""
        return (await self.provision(self.api, self.admin, tenant, quota)).token

    async def spawn(self, token: str, **spec: Any) -> httpx.Response:
        return await self.api.post("/v1/vms", json={**SPEC, **spec}, headers=bearer(token))

    async def spawn_ok(self, token: str, **spec: Any) -> dict[str, Any]:
        response = await self.spawn(token, **spec)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def destroy(self, token: str, vm_id: str) -> httpx.Response:
        return await self.api.delete(f"/v1/vms/{vm_id}", headers=bearer(token))

    async def vm(self, token: str, vm_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/v1/vms/{vm_id}", headers=bearer(token))
        assert response.status_code == 200, response.text
        vm: dict[str, Any] = response.json()
        return vm

    async def listed(self, token: str) -> list[dict[str, Any]]:
        response = await self.api.get("/v1/vms", params={"limit": 1000}, headers=bearer(token))
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["next"] is None
        vms: list[dict[str, Any]] = page["vms"]
        return vms

    async def allocated(self, token: str) -> dict[str, int]:
        response = await self.api.get("/v1/usage", headers=bearer(token))
        assert response.status_code == 200, response.text
        allocated: dict[str, int] = response.json()["allocated"]
        return allocated

    async def audit(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for _ in range(100):
            response = await self.api.get(
                "/v1/admin/audit", params={"after": len(entries), "limit": 1000}, headers=self.admin
            )
            assert response.status_code == 200, response.text
            page = response.json()["entries"]
            if not page:
                return entries
            entries.extend(page)
        raise AssertionError("the audit log did not end within 100 pages")

    async def settled(self, token: str, seconds: float = 30.0) -> list[dict[str, Any]]:
        """The tenant's VMs once none is in doubt any more (bounded polling)."""
        vms: list[dict[str, Any]] = []
        with trio.move_on_after(seconds):
            while True:
                vms = await self.listed(token)
                if not any(vm["state"] in IN_DOUBT for vm in vms):
                    return vms
                await trio.sleep(0.1)
        doubtful = [(vm["id"], vm["state"]) for vm in vms if vm["state"] in IN_DOUBT]
        raise AssertionError(f"still in doubt after {seconds} s: {doubtful}")

    # -- the fleet, asked directly ----------------------------------------------------------

    async def knobs(self, **knobs: Any) -> None:
        response = await self.ctl.post("/_knobs", json=knobs)
        assert response.status_code == 200, response.text

    async def stats(self) -> dict[str, Any]:
        response = await self.ctl.get("/_stats")
        assert response.status_code == 200, response.text
        stats: dict[str, Any] = response.json()
        return stats

    async def held(self, tenant: str) -> dict[str, dict[str, Any]]:
        """The fleet's VMs of one tenant, by id."""
        response = await self.ctl.get("/_vms", params={"tenant": tenant})
        assert response.status_code == 200, response.text
        return {vm["id"]: vm for vm in response.json()["vms"]}

    async def wait_for_calls(self, kind: str, count: int, seconds: float = 10.0) -> None:
        with trio.fail_after(seconds):
            while (await self.stats())["calls"][kind] < count:
                await trio.sleep(0.02)


def ids(vms: Any) -> set[str]:
    return {vm["id"] for vm in vms} if isinstance(vms, list) else set(vms)


def allocation_of(vms: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "vcpus": sum(vm["vcpus"] for vm in vms),
        "memory_mib": sum(vm["memory_mib"] for vm in vms),
        "vms": len(vms),
    }


def about(entries: list[dict[str, Any]], op: str, vm_id: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["op"] == op and e["vm"] == vm_id]


def outcomes(entries: list[dict[str, Any]], op: str, vm_id: str) -> list[str]:
    return [e["outcome"] for e in about(entries, op, vm_id)]


def problem_code(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json", response.text
    code: str = response.json()["code"]
    return code


@pytest.fixture
def proxy(
    tmp_path: Path, fleet: FleetServer, request: pytest.FixtureRequest
) -> Iterator[LiveServer]:
    env = {"VM_TENANT_FLEET": fleet.url, "VM_TENANT_FLEET_TIMEOUT": "1"}
    # The fleet's knobs apply to every call: no state sweep (a list call) may take an
    # injected fault meant for a spawn, so it runs only where a test asks for it.
    env["VM_TENANT_FLEET_SYNC_INTERVAL"] = getattr(request, "param", "3600")
    server = LiveServer(tmp_path / "proxy-data", env=env).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def rig(fleet: FleetServer, proxy: LiveServer, provision: Provision) -> AsyncIterator[Rig]:
    rig = Rig(fleet, proxy, proxy.client(), httpx.AsyncClient(base_url=fleet.url), provision)
    try:
        yield rig
    finally:
        await rig.api.aclose()
        await rig.ctl.aclose()


# -- the happy path --------------------------------------------------------------------------


async def test_proxy_and_fleet_agree_on_every_vm(rig: Rig) -> None:
    token = await rig.tenant("acme", BIG_QUOTA)
    other = await rig.tenant("other", BIG_QUOTA)
    made = [
        await rig.spawn_ok(token, name="web-1"),
        await rig.spawn_ok(token),
        await rig.spawn_ok(token, vcpus=2, memory_mib=512, image="ubuntu-24.04"),
    ]
    assert all(vm["state"] in LIVE and vm["tenant"] == "acme" for vm in made)
    listed = await rig.listed(token)
    held = await rig.held("acme")
    assert ids(listed) == ids(held) == ids(made)
    for vm in listed:
        fleet_vm = held[vm["id"]]
        for member in ("tenant", "vcpus", "memory_mib", "image", "name"):
            assert fleet_vm[member] == vm[member], member
    assert await rig.allocated(token) == allocation_of(made)

    # A GET reads the live state: the fleet boots a VM (pending -> running) on its own.
    first = made[0]["id"]
    with trio.fail_after(10):
        while (await rig.vm(token, first))["state"] != "running":
            await trio.sleep(0.1)

    # Ownership is checked before the fleet is called: another tenant costs it no call.
    before = (await rig.stats())["calls"]
    for method in ("GET", "DELETE"):
        response = await rig.api.request(method, f"/v1/vms/{first}", headers=bearer(other))
        assert response.status_code == 404
    after = (await rig.stats())["calls"]
    assert (after["GET"], after["DELETE"]) == (before["GET"], before["DELETE"])

    gone = await rig.destroy(token, first)
    assert gone.status_code == 200, gone.text
    assert gone.json() == {"id": first, "state": "destroyed"}
    assert (await rig.api.get(f"/v1/vms/{first}", headers=bearer(token))).status_code == 404
    assert (await rig.ctl.get(f"/fleet/v1/vms/{first}")).status_code == 404
    listed = await rig.listed(token)
    assert ids(listed) == ids(await rig.held("acme")) == ids(made[1:])
    assert await rig.allocated(token) == allocation_of(listed)
    assert (await rig.stats())["authorization"] == 0, "a token was sent to the fleet"

    # The VM id is the idempotency key: a repeated PUT answers the VM it already holds.
    again = made[1]
    body = {"tenant": "acme", "name": None, **SPEC}
    for _ in range(2):
        response = await rig.ctl.put(f"/fleet/v1/vms/{again['id']}", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["id"] == again["id"]
    assert ids(await rig.held("acme")) == ids(made[1:])
    fresh = f"vm-{secrets.token_hex(16)}"
    statuses = [
        (await rig.ctl.put(f"/fleet/v1/vms/{fresh}", json={**body, "tenant": "direct"})).status_code
        for _ in range(3)
    ]
    assert statuses == [201, 200, 200]
    assert ids(await rig.held("direct")) == {fresh}
    assert (await rig.ctl.delete(f"/fleet/v1/vms/{fresh}")).status_code == 200
    assert (await rig.ctl.delete(f"/fleet/v1/vms/{fresh}")).status_code == 404
    assert (await rig.ctl.get(f"/fleet/v1/vms/{fresh}")).status_code == 404


# -- definite answers ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 422])
async def test_a_refusal_is_definite(rig: Rig, status: int) -> None:
    token = await rig.tenant("acme", {"vcpus": 8, "memory_mib": 8192, "vms": 2})
    keep = await rig.spawn_ok(token)

    await rig.knobs(fail_status=status)
    refused = await rig.spawn(token)
    assert refused.status_code == 502, refused.text
    assert problem_code(refused) == "fleet_error"
    # Released: nothing counted, listed or held beyond the VM from before.
    assert await rig.allocated(token) == allocation_of([keep])
    assert ids(await rig.listed(token)) == ids(await rig.held("acme")) == {keep["id"]}
    entries = await rig.audit()
    requested = [e for e in entries if e["op"] == "vm.spawn" and e["outcome"] == "requested"]
    failed_vm = requested[-1]["vm"]
    assert failed_vm != keep["id"]
    assert outcomes(entries, "vm.spawn", failed_vm) == ["requested", "failed"]
    assert about(entries, "vm.spawn", failed_vm)[-1]["source"]["token_id"] != "system"

    # A refused destroy keeps the VM, counted, in the proxy and in the fleet.
    refused = await rig.destroy(token, keep["id"])
    assert refused.status_code == 502, refused.text
    assert problem_code(refused) == "fleet_error"
    await rig.knobs(**NO_KNOBS)
    assert outcomes(await rig.audit(), "vm.destroy", keep["id"]) == ["requested", "failed"]
    assert (await rig.vm(token, keep["id"]))["state"] in LIVE
    assert ids(await rig.held("acme")) == {keep["id"]}
    assert await rig.allocated(token) == allocation_of([keep])

    # The released reservation is really free: the quota (2 VMs) admits one more.
    await rig.spawn_ok(token)
    assert len(await rig.held("acme")) == 2


async def test_an_overloaded_fleet_is_retried(rig: Rig) -> None:
    token = await rig.tenant("acme", BIG_QUOTA)

    await rig.knobs(fail_status=503)
    before = (await rig.stats())["calls"]["PUT"]
    response = await rig.spawn(token)
    assert response.status_code == 503, response.text
    assert problem_code(response) == "fleet_unavailable"
    assert (await rig.stats())["calls"]["PUT"] - before > 1, "a 503 was not retried"
    # Every 503 said "nothing changed", so this is definite: released, audited failed.
    assert await rig.allocated(token) == allocation_of([])
    assert await rig.listed(token) == []
    assert await rig.held("acme") == {}
    entries = await rig.audit()
    spawned = {e["vm"] for e in entries if e["op"] == "vm.spawn"}
    assert len(spawned) == 1
    assert outcomes(entries, "vm.spawn", spawned.pop()) == ["requested", "failed"]

    # One 503, then the retry passes.
    await rig.knobs(fail_status=503, fail_count=1)
    before = (await rig.stats())["calls"]["PUT"]
    vm = await rig.spawn_ok(token)
    assert (await rig.stats())["calls"]["PUT"] - before >= 2
    assert ids(await rig.listed(token)) == ids(await rig.held("acme")) == {vm["id"]}
    assert outcomes(await rig.audit(), "vm.spawn", vm["id"]) == ["requested", "succeeded"]


# -- answers in doubt ------------------------------------------------------------------------


async def test_a_hanging_fleet_leaves_the_spawn_in_doubt_until_reconciled(rig: Rig) -> None:
    token = await rig.tenant("acme", {"vcpus": 8, "memory_mib": 8192, "vms": 1})
    # The spawn takes effect in the fleet, but its answer never comes.
    await rig.knobs(hang=True, effect=True)
    with trio.fail_after(10):  # a hang guard, not a timing assertion
        response = await rig.spawn(token)
    assert response.status_code == 503, response.text
    assert problem_code(response) == "fleet_unavailable"

    [vm] = await rig.listed(token)
    assert vm["state"] == "unknown"
    assert await rig.allocated(token) == allocation_of([vm])
    # Still counted: the ceiling (1 VM) refuses another spawn.
    refused = await rig.spawn(token)
    assert refused.status_code == 403, refused.text
    assert problem_code(refused) == "quota_exceeded"
    assert outcomes(await rig.audit(), "vm.spawn", vm["id"]) == ["requested"]
    assert (await rig.stats())["vms"] == 1

    await rig.knobs(**NO_KNOBS)
    [settled] = await rig.settled(token)
    assert settled["id"] == vm["id"]
    assert settled["state"] in LIVE
    assert ids(await rig.held("acme")) == {vm["id"]}
    assert await rig.allocated(token) == allocation_of([settled])
    entries = about(await rig.audit(), "vm.spawn", vm["id"])
    assert [e["outcome"] for e in entries] == ["requested", "succeeded"]
    assert entries[-1]["source"] == SYSTEM_SOURCE


async def test_a_garbled_answer_is_in_doubt(rig: Rig) -> None:
    token = await rig.tenant("acme", BIG_QUOTA)

    # A spawn answered with garbage (it did not take effect): in doubt, then reconciled.
    await rig.knobs(garbage=True)
    response = await rig.spawn(token)
    assert response.status_code == 503, response.text
    assert problem_code(response) == "fleet_unavailable"
    [vm] = await rig.listed(token)
    assert vm["state"] == "unknown"
    assert await rig.allocated(token) == allocation_of([vm])
    await rig.knobs(**NO_KNOBS)
    assert ids(await rig.settled(token)) == ids(await rig.held("acme")) == {vm["id"]}
    spawn_entries = about(await rig.audit(), "vm.spawn", vm["id"])
    assert [e["outcome"] for e in spawn_entries] == ["requested", "succeeded"]
    assert spawn_entries[-1]["source"] == SYSTEM_SOURCE

    # A destroy that took effect but was answered with garbage: in doubt, still counted.
    await rig.knobs(garbage=True, effect=True)
    response = await rig.destroy(token, vm["id"])
    assert response.status_code == 503, response.text
    assert problem_code(response) == "fleet_unavailable"
    [doubtful] = await rig.listed(token)
    assert doubtful["state"] in IN_DOUBT
    assert await rig.allocated(token) == allocation_of([doubtful])
    assert (await rig.stats())["vms"] == 0
    await rig.knobs(**NO_KNOBS)
    assert await rig.settled(token) == []
    assert await rig.held("acme") == {}
    assert await rig.allocated(token) == allocation_of([])
    destroy_entries = about(await rig.audit(), "vm.destroy", vm["id"])
    assert [e["outcome"] for e in destroy_entries] == ["requested", "succeeded"]
    assert destroy_entries[-1]["source"] == SYSTEM_SOURCE


async def test_a_hanging_fleet_opens_the_circuit(rig: Rig) -> None:
    """Several calls in doubt (no answer in time) stop the proxy calling for a while."""
    token = await rig.tenant("acme", BIG_QUOTA)
    await rig.knobs(hang=True)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await rig.spawn(token)).status_code)

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
    assert statuses == [503] * 8
    # The reconcilers' first repeats time out too.
    await trio.sleep(1.5)

    requested = sum(e["outcome"] == "requested" for e in await rig.audit())
    allocated = await rig.allocated(token)
    assert allocated["vms"] == 8
    for _ in range(3):
        with trio.fail_after(10):
            response = await rig.spawn(token)
        assert response.status_code == 503, response.text
        assert problem_code(response) == "fleet_unavailable"
    # Answered without reserving or auditing anything.
    assert await rig.allocated(token) == allocated
    assert sum(e["outcome"] == "requested" for e in await rig.audit()) == requested


# -- crashes ---------------------------------------------------------------------------------


async def test_a_fleet_killed_mid_storm_loses_nothing(rig: Rig) -> None:
    token = await rig.tenant("acme", BIG_QUOTA)
    # Each spawn takes effect, then waits before answering: a kill loses some answers.
    await rig.knobs(latency=0.05, lag=0.3)
    responses: list[httpx.Response] = []

    async def one(i: int) -> None:
        responses.append(await rig.spawn(token, name=f"storm-{i}"))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(24):
                nursery.start_soon(one, i)
            await rig.wait_for_calls("PUT", 8)
            await trio.to_thread.run_sync(rig.fleet.kill)

    assert len(responses) == 24
    assert {r.status_code for r in responses} <= {201, 502, 503}, [
        (r.status_code, r.text) for r in responses if r.status_code not in (201, 502, 503)
    ]
    for response in responses:
        if response.status_code != 201:
            expected = "fleet_error" if response.status_code == 502 else "fleet_unavailable"
            assert problem_code(response) == expected
    answered = {r.json()["id"] for r in responses if r.status_code == 201}
    in_doubt = {vm["id"] for vm in await rig.listed(token) if vm["state"] in IN_DOUBT}
    assert in_doubt, "the kill left no answer in doubt"

    await trio.sleep(0.5)
    await trio.to_thread.run_sync(rig.fleet.start)
    await rig.reconnect()
    listed = await rig.settled(token)
    held = await rig.held("acme")
    assert ids(listed) == ids(held)
    assert answered <= ids(listed)
    assert await rig.allocated(token) == allocation_of(listed)

    entries = [e for e in await rig.audit() if e["op"] == "vm.spawn"]
    requested = {e["vm"] for e in entries if e["outcome"] == "requested"}
    succeeded = {e["vm"] for e in entries if e["outcome"] == "succeeded"}
    assert answered | in_doubt <= requested
    for vm_id in requested:
        assert sum(e["vm"] == vm_id and e["outcome"] in TERMINAL for e in entries) == 1, vm_id
    assert succeeded == ids(listed)
    for vm_id in in_doubt:
        [terminal] = [e for e in about(entries, "vm.spawn", vm_id) if e["outcome"] in TERMINAL]
        assert terminal["source"] == SYSTEM_SOURCE


async def test_a_dead_fleet_costs_a_fast_error_without_a_reservation(rig: Rig) -> None:
    token = await rig.tenant("acme", BIG_QUOTA)
    await trio.to_thread.run_sync(rig.fleet.kill)

    fast: list[int] = []  # spawns answered without a `requested` entry
    for attempt in range(13):
        before = sum(e["outcome"] == "requested" for e in await rig.audit())
        with trio.fail_after(10):  # a hang guard, not a timing assertion
            response = await rig.spawn(token)
        assert response.status_code == 503, response.text
        assert problem_code(response) == "fleet_unavailable"
        # Nothing reached the fleet: definite, so never counted.
        assert await rig.allocated(token) == allocation_of([])
        if sum(e["outcome"] == "requested" for e in await rig.audit()) == before:
            fast.append(attempt)
        if len(fast) == 4:
            break
    assert fast, "the proxy kept calling a dead fleet"
    assert fast[0] < 10, "the circuit did not open after a few failures"
    assert fast == list(range(fast[0], fast[0] + 4)), "the circuit closed again at once"
    entries = [e for e in await rig.audit() if e["op"] == "vm.spawn"]
    for vm_id in {e["vm"] for e in entries if e["outcome"] == "requested"}:
        assert outcomes(entries, "vm.spawn", vm_id) == ["requested", "failed"]
    assert await rig.listed(token) == []


async def test_a_proxy_killed_with_fleet_calls_in_flight_resolves_them(rig: Rig) -> None:
    token = await rig.tenant("acme", BIG_QUOTA)
    old = [await rig.spawn_ok(token, name=f"old-{i}") for i in range(3)]
    calls = (await rig.stats())["calls"]
    # The fleet carries out each call at once but answers only after the proxy is gone.
    await rig.knobs(lag=2.0)

    async def attempt(method: str, path: str, body: Any = None) -> None:
        with contextlib.suppress(httpx.TransportError):  # the proxy dies under it
            await rig.api.request(method, path, json=body, headers=bearer(token))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(partial(attempt, "POST", "/v1/vms", {**SPEC, "name": f"n-{i}"}))
            for vm in old[:2]:
                nursery.start_soon(attempt, "DELETE", f"/v1/vms/{vm['id']}")
            await rig.wait_for_calls("PUT", calls["PUT"] + 4)
            await rig.wait_for_calls("DELETE", calls["DELETE"] + 2)
            await trio.to_thread.run_sync(rig.proxy.kill)

    await rig.knobs(**NO_KNOBS)
    await trio.to_thread.run_sync(rig.proxy.start)
    await rig.reconnect()
    listed = await rig.settled(token)
    held = await rig.held("acme")
    assert ids(listed) == ids(held)
    assert old[2]["id"] in ids(listed)
    assert not ids(old[:2]) & ids(listed)
    assert len(listed) == 5  # old-2 and the four spawns, which the fleet carried out
    assert await rig.allocated(token) == allocation_of(listed)

    entries = await rig.audit()
    new = ids(listed) - {old[2]["id"]}
    for op, vm_ids in (("vm.spawn", new), ("vm.destroy", ids(old[:2]))):
        for vm_id in vm_ids:
            mine = about(entries, op, vm_id)
            assert [e["outcome"] for e in mine] == ["requested", "succeeded"], (op, vm_id)
            assert mine[-1]["source"] == SYSTEM_SOURCE, (op, vm_id)

    verify = await trio.to_thread.run_sync(
        partial(rig.proxy.cli, "audit", "verify", "--data-dir", str(rig.proxy.data_dir))
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("intact"), verify.stdout


# -- the state the fleet reports -------------------------------------------------------------


@pytest.mark.parametrize("proxy", ["0.2"], indirect=True)
async def test_the_list_shows_the_state_the_fleet_reports_without_asking_per_request(
    rig: Rig,
) -> None:
    """The list once showed ``pending`` minutes after the fleet said ``running``."""
    token = await rig.tenant("acme", BIG_QUOTA)
    await rig.knobs(boot=3600.0)  # the fleet keeps new VMs pending until told otherwise
    made = [await rig.spawn_ok(token) for _ in range(3)]
    assert {vm["state"] for vm in made} == {"pending"}
    await rig.knobs(boot=0.0)  # ...and now reports them all running

    before = (await rig.stats())["calls"]
    with trio.fail_after(30):
        while {vm["state"] for vm in await rig.listed(token)} != {"running"}:
            await trio.sleep(0.05)
    after = (await rig.stats())["calls"]
    # The list requests cost no call each: the sweep asked, one list call per tenant.
    assert after["GET"] == before["GET"]
    assert after["LIST"] > before["LIST"]
    usage = await rig.api.get("/v1/usage", headers=bearer(token))
    assert usage.json()["allocated"] == allocation_of(made), "counted the same"
