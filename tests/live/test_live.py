"""Black-box tests against a real ``vm-tenant serve`` subprocess on 127.0.0.1.

Everything here talks HTTP over real sockets to a server started by the ``live_server``
fixture, stops it with real signals (SIGTERM, ``kill -9``), starts it again on the same
data dir, and reads the real files it leaves behind. Covered: quota under a storm of
concurrent spawns (per dimension), isolation between tenants on the ``{id}`` routes,
state and audit chain across clean and crash restarts, a crash in the middle of a burst of
writes, SIGTERM with requests in flight, and the operator's ``tenant``/``token`` commands.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import pytest
import trio

from conftest import UNLIMITED, LiveServer, Provision, bearer

SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
BIG_QUOTA = {"vcpus": 1000, "memory_mib": 1_000_000, "vms": 1000}
IN_DOUBT = frozenset({"spawning", "destroying", "unknown"})
SYSTEM_SOURCE = {"ip": None, "token_id": "system"}
TERMINAL = frozenset({"succeeded", "failed"})


# -- helpers -------------------------------------------------------------------------------


async def spawn(client: httpx.AsyncClient, token: str, **spec: Any) -> httpx.Response:
    return await client.post("/v1/vms", json={**SPEC, **spec}, headers=bearer(token))


async def spawn_ok(client: httpx.AsyncClient, token: str, **spec: Any) -> dict[str, Any]:
    response = await spawn(client, token, **spec)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def list_all(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    """Every VM of the token's tenant, following cursors (bounded)."""
    vms: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    for _ in range(100):
        response = await client.get("/v1/vms", params=params, headers=bearer(token))
        assert response.status_code == 200, response.text
        page = response.json()
        vms.extend(page["vms"])
        if page["next"] is None:
            return vms
        params = {"limit": 1000, "cursor": page["next"]}
    raise AssertionError("the VM listing did not end within 100 pages")


async def usage(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    response = await client.get("/v1/usage", headers=bearer(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def audit_entries(client: httpx.AsyncClient, server: LiveServer) -> list[dict[str, Any]]:
    """The whole audit log through the admin API (bounded paging)."""
    entries: list[dict[str, Any]] = []
    for _ in range(100):
        response = await client.get(
            "/v1/admin/audit",
            params={"after": len(entries), "limit": 1000},
            headers=bearer(server.admin_token),
        )
        assert response.status_code == 200, response.text
        page = response.json()["entries"]
        if not page:
            return entries
        entries.extend(page)
    raise AssertionError("the audit log did not end within 100 pages")


async def audit_head(client: httpx.AsyncClient, server: LiveServer) -> dict[str, Any]:
    response = await client.get(
        "/v1/admin/audit", params={"limit": 1}, headers=bearer(server.admin_token)
    )
    assert response.status_code == 200, response.text
    head: dict[str, Any] = response.json()["head"]
    return head


async def settled_vms(
    client: httpx.AsyncClient, token: str, attempts: int = 200
) -> list[dict[str, Any]]:
    """The listing once no VM is in doubt any more (bounded polling of a real process)."""
    vms: list[dict[str, Any]] = []
    for _ in range(attempts):
        vms = await list_all(client, token)
        if not any(vm["state"] in IN_DOUBT for vm in vms):
            return vms
        await trio.sleep(0.05)
    doubtful = [(vm["id"], vm["state"]) for vm in vms if vm["state"] in IN_DOUBT]
    raise AssertionError(f"operations still in doubt after {attempts} polls: {doubtful}")


async def run_cli(server: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(partial(server.cli, *args))


async def verify_audit(server: LiveServer) -> subprocess.CompletedProcess[str]:
    return await run_cli(server, "audit", "verify", "--data-dir", str(server.data_dir))


async def restart(server: LiveServer, *, crash: bool = False) -> None:
    """SIGTERM (asserting exit code 0) or ``kill -9``, then start on the same data dir."""
    if crash:
        await trio.to_thread.run_sync(server.kill)
    else:
        code = await trio.to_thread.run_sync(server.stop)
        assert code == 0, "".join(server.log[-30:])
    await trio.to_thread.run_sync(server.start)


def read_log_file(data_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """The stored audit entries straight from the segment files, and whether one is torn."""
    data = b"".join(p.read_bytes() for p in sorted((data_dir / "audit").glob("*.jsonl")))
    *complete, tail = data.split(b"\n")
    return [json.loads(line) for line in complete], tail != b""


def allocation_of(vms: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "vcpus": sum(vm["vcpus"] for vm in vms),
        "memory_mib": sum(vm["memory_mib"] for vm in vms),
        "vms": len(vms),
    }


def fleet_vm_ids(data_dir: Path) -> set[str]:
    """The VMs the embedded fleet holds, from its journal under ``<data-dir>/fleet/``.

    White-box: the journal is the simulator's own append-only record (``spawn`` records
    carry the VM, ``destroy`` records its id). Read only while the server is stopped.
    """
    ids: set[str] = set()
    for line in (data_dir / "fleet" / "vms.jsonl").read_bytes().splitlines():
        record = json.loads(line)
        if record["op"] == "spawn":
            ids.add(record["vm"]["id"])
        elif record["op"] == "destroy":
            ids.discard(record["id"])
    return ids


def vm_identity(vm: dict[str, Any]) -> tuple[Any, ...]:
    """What a VM is, without its (live, changing) state."""
    return (vm["id"], vm["vcpus"], vm["memory_mib"], vm["image"], vm["name"], vm["created_at"])


# -- spawn storm ---------------------------------------------------------------------------


STORMS = [
    pytest.param("vms", {"vcpus": 1000, "memory_mib": 1_000_000, "vms": 10}, SPEC, id="vms"),
    pytest.param("vcpus", {"vcpus": 10, "memory_mib": 1_000_000, "vms": 1000}, SPEC, id="vcpus"),
    pytest.param(
        "memory_mib", {"vcpus": 1000, "memory_mib": 10 * 256, "vms": 1000}, SPEC, id="memory_mib"
    ),
]


@pytest.mark.parametrize("live_server", [UNLIMITED], indirect=True, ids=["unlimited"])
@pytest.mark.parametrize(("dimension", "quota", "spec"), STORMS)
async def test_spawn_storm_admits_exactly_the_quota(
    live_server: LiveServer,
    dimension: str,
    quota: dict[str, int],
    spec: dict[str, Any],
    provision: Provision,
) -> None:
    async with live_server.client() as client:
        token = (await provision(client, bearer(live_server.admin_token), "storm", quota)).token
        responses: list[httpx.Response] = []

        async def one(i: int) -> None:
            responses.append(await spawn(client, token, **spec, name=f"storm-{i}"))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(one, i)

        assert Counter(r.status_code for r in responses) == {201: 10, 403: 54}
        created = {r.json()["id"] for r in responses if r.status_code == 201}
        assert len(created) == 10
        for r in responses:
            if r.status_code == 403:
                assert r.headers["content-type"] == "application/problem+json"
                problem = r.json()
                assert problem["code"] == "quota_exceeded"
                assert dimension in problem["detail"]

        used = await usage(client, token)
        assert used["quota"] == quota
        assert used["allocated"][dimension] == quota[dimension]
        assert used["allocated"] == {
            "vcpus": 10 * spec["vcpus"],
            "memory_mib": 10 * spec["memory_mib"],
            "vms": 10,
        }
        listed = await list_all(client, token)
        assert {vm["id"] for vm in listed} == created
        assert len(listed) == 10

        entries = await audit_entries(client, live_server)
        spawns = [e for e in entries if e["tenant"] == "storm" and e["op"] == "vm.spawn"]
        assert Counter(e["outcome"] for e in spawns) == {
            "requested": 10,
            "succeeded": 10,
            "rejected": 54,
        }
        assert {e["vm"] for e in spawns if e["outcome"] == "requested"} == created
        assert {e["vm"] for e in spawns if e["outcome"] == "succeeded"} == created
        rejected = [e for e in spawns if e["outcome"] == "rejected"]
        assert all(e["detail"]["dimension"] == dimension for e in rejected)
        assert all(e["vm"] is None for e in rejected)


# -- isolation -----------------------------------------------------------------------------


async def test_other_tenants_vms_are_indistinguishable_from_missing_ones(
    live_server: LiveServer, provision: Provision
) -> None:
    async with live_server.client() as client:
        alpha = (await provision(client, bearer(live_server.admin_token), "alpha", BIG_QUOTA)).token
        beta = (await provision(client, bearer(live_server.admin_token), "beta", BIG_QUOTA)).token
        vm_a = await spawn_ok(client, alpha, name="alpha-vm")
        vm_b = await spawn_ok(client, beta, name="beta-vm")
        usage_a = await usage(client, alpha)
        missing_ids: list[str] = []

        for method in ("GET", "DELETE"):
            missing_id = f"vm-{secrets.token_hex(16)}"
            missing_ids.append(missing_id)
            foreign = await client.request(method, f"/v1/vms/{vm_a['id']}", headers=bearer(beta))
            missing = await client.request(method, f"/v1/vms/{missing_id}", headers=bearer(beta))
            assert foreign.status_code == missing.status_code == 404, method
            assert foreign.content == missing.content, method
            assert foreign.headers["content-type"] == "application/problem+json"
            assert missing.headers["content-type"] == "application/problem+json"
            assert foreign.json()["code"] == "not_found"

        # A method the route does not take answers the same for a foreign id and a missing one.
        # (Without a body: see test_early_error_response_leaves_the_connection_usable.)
        foreign = await client.put(f"/v1/vms/{vm_a['id']}", headers=bearer(beta))
        missing = await client.put(f"/v1/vms/{missing_ids[0]}", headers=bearer(beta))
        assert foreign.status_code == missing.status_code == 405
        assert foreign.content == missing.content

        # Alpha's VM is untouched by beta's attempts.
        mine = await client.get(f"/v1/vms/{vm_a['id']}", headers=bearer(alpha))
        assert mine.status_code == 200
        assert vm_identity(mine.json()) == vm_identity(vm_a)
        assert mine.json()["tenant"] == "alpha"
        assert mine.json()["state"] in {"pending", "running"}
        assert await usage(client, alpha) == usage_a
        assert [vm["id"] for vm in await list_all(client, alpha)] == [vm_a["id"]]

        # Beta sees only its own VM, and its own usage.
        assert [vm["id"] for vm in await list_all(client, beta)] == [vm_b["id"]]
        usage_b = await usage(client, beta)
        assert usage_b["tenant"] == "beta"
        assert usage_b["allocated"] == {"vcpus": 1, "memory_mib": 256, "vms": 1}
        assert usage_a["tenant"] == "alpha"
        assert usage_a["allocated"] == {"vcpus": 1, "memory_mib": 256, "vms": 1}

        # And the other way round.
        reverse = await client.delete(f"/v1/vms/{vm_b['id']}", headers=bearer(alpha))
        assert reverse.status_code == 404
        assert len(await list_all(client, beta)) == 1

        # Both rejected destroys are audited alike, under the caller's tenant.
        destroys = [e for e in await audit_entries(client, live_server) if e["op"] == "vm.destroy"]
        by_vm = {e["vm"]: e for e in destroys if e["tenant"] == "beta"}
        assert set(by_vm) == {vm_a["id"], missing_ids[1]}
        assert all(e["outcome"] == "rejected" for e in by_vm.values())
        assert by_vm[vm_a["id"]]["detail"] == by_vm[missing_ids[1]]["detail"]
        assert [(e["tenant"], e["vm"]) for e in destroys if e["tenant"] == "alpha"] == [
            ("alpha", vm_b["id"])
        ]


# -- restarts ------------------------------------------------------------------------------


async def observed_state(
    client: httpx.AsyncClient, server: LiveServer, tokens: dict[str, str]
) -> dict[str, Any]:
    """What a client can see of each tenant: admin view, usage and VMs (without states)."""
    state: dict[str, Any] = {}
    for tenant, token in tokens.items():
        admin = await client.get(f"/v1/admin/tenants/{tenant}", headers=bearer(server.admin_token))
        assert admin.status_code == 200, admin.text
        vms = await list_all(client, token)
        assert all(vm["state"] in {"pending", "running"} for vm in vms), vms
        state[tenant] = {
            "admin": admin.json(),
            "usage": await usage(client, token),
            "vms": sorted(vm_identity(vm) for vm in vms),
        }
    return state


async def assert_unauthorized(client: httpx.AsyncClient, token: str) -> None:
    response = await client.get("/v1/usage", headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def assert_chain_continues(
    client: httpx.AsyncClient, server: LiveServer, head: dict[str, Any], token: str
) -> None:
    """The next write links onto the head seen before the restart."""
    vm = await spawn_ok(client, token, name="after-restart")
    new = await audit_entries(client, server)
    following = [e for e in new if e["seq"] > head["seq"]]
    assert following, "no audit entry after the restart"
    assert following[0]["seq"] == head["seq"] + 1
    assert following[0]["prev"] == head["hash"]
    assert following[0]["vm"] == vm["id"]
    assert [e["seq"] for e in new] == list(range(1, len(new) + 1))
    gone = await client.delete(f"/v1/vms/{vm['id']}", headers=bearer(token))
    assert gone.status_code == 200


async def test_restart_keeps_state_and_the_audit_chain(
    live_server: LiveServer, provision: Provision
) -> None:
    admin = bearer(live_server.admin_token)
    async with live_server.client() as client:
        quota = {"vcpus": 8, "memory_mib": 4096, "vms": 5}
        keep = (await provision(client, admin, "keep", quota)).body
        other = (await provision(client, admin, "other", BIG_QUOTA)).body
        token = keep["token"]
        issued = []
        for _ in range(2):
            response = await client.post("/v1/admin/tenants/keep/tokens", headers=admin)
            assert response.status_code == 201
            issued.append(response.json())
        revoked, spare = issued
        response = await client.delete(
            f"/v1/admin/tenants/keep/tokens/{revoked['token_id']}", headers=admin
        )
        assert response.status_code == 204
        patched = {"vcpus": 6, "memory_mib": 3072, "vms": 4}
        response = await client.patch(
            "/v1/admin/tenants/keep", json={"quota": patched}, headers=admin
        )
        assert response.status_code == 200
        vms = [await spawn_ok(client, token, name=f"keep-{i}", vcpus=2) for i in range(3)]
        await spawn_ok(client, other["token"], name="other-0")
        response = await client.delete(f"/v1/vms/{vms[0]['id']}", headers=bearer(token))
        assert response.status_code == 200
        tokens = {"keep": token, "other": other["token"]}
        before = await observed_state(client, live_server, tokens)
        head = await audit_head(client, live_server)
    assert before["keep"]["usage"]["quota"] == patched
    assert before["keep"]["usage"]["allocated"] == {"vcpus": 4, "memory_mib": 512, "vms": 2}

    # A clean restart: SIGTERM, exit code 0, start again on the same data dir.
    await restart(live_server)
    async with live_server.client() as client:
        assert await observed_state(client, live_server, tokens) == before
        # The shutdown signed a checkpoint of the head it left.
        response = await client.get("/v1/admin/audit/head", headers=admin)
        assert response.status_code == 200
        assert {k: response.json()[k] for k in ("seq", "hash")} == head
        assert response.json()["signature"]
        await assert_unauthorized(client, revoked["token"])
        assert (await usage(client, spare["token"]))["tenant"] == "keep"
        await assert_chain_continues(client, live_server, head, token)
        # The quota still holds: 4 vcpus allocated of 6, a 4-vcpu VM does not fit.
        response = await spawn(client, token, vcpus=4)
        assert response.status_code == 403
        assert response.json()["code"] == "quota_exceeded"

        # More writes after the restart, which a crash restart has to replay.
        response = await client.delete(
            f"/v1/admin/tenants/keep/tokens/{spare['token_id']}", headers=admin
        )
        assert response.status_code == 204
        patched = {"vcpus": 7, "memory_mib": 2048, "vms": 3}
        response = await client.patch(
            "/v1/admin/tenants/keep", json={"quota": patched}, headers=admin
        )
        assert response.status_code == 200
        await spawn_ok(client, token, name="keep-late")
        response = await client.delete(f"/v1/vms/{vms[1]['id']}", headers=bearer(token))
        assert response.status_code == 200
        before = await observed_state(client, live_server, tokens)
        head = await audit_head(client, live_server)
    verified = await verify_audit(live_server)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert before["keep"]["usage"]["quota"] == patched

    # A crash restart: kill -9 (no snapshot at shutdown), the state comes back by replay.
    await restart(live_server, crash=True)
    async with live_server.client() as client:
        assert await observed_state(client, live_server, tokens) == before
        await assert_unauthorized(client, revoked["token"])
        await assert_unauthorized(client, spare["token"])
        await assert_chain_continues(client, live_server, head, token)
    verified = await verify_audit(live_server)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "intact" in verified.stdout


# -- kill -9 in the middle of a burst -----------------------------------------------------


@pytest.mark.parametrize("live_server", [UNLIMITED], indirect=True, ids=["unlimited"])
async def test_kill_during_a_burst_loses_no_acknowledged_write(
    live_server: LiveServer, provision: Provision
) -> None:
    spawns, kill_after = 40, 20
    async with live_server.client() as client:
        token = (await provision(client, bearer(live_server.admin_token), "burst", BIG_QUOTA)).token
        existing = [await spawn_ok(client, token, name=f"pre-{i}") for i in range(20)]

        spawned: set[str] = set()
        destroyed: set[str] = set()
        statuses: list[int] = []
        transport_errors: list[str] = []

        def answered(status: int) -> None:
            statuses.append(status)
            if len(statuses) == kill_after:
                assert live_server.proc is not None
                live_server.proc.kill()  # kill -9, right now, while others are in flight

        async def guarded(request: Callable[[], Awaitable[httpx.Response]]) -> None:
            try:
                response = await request()
            except httpx.TransportError as error:
                transport_errors.append(type(error).__name__)
                return
            answered(response.status_code)
            if response.status_code == 201:
                spawned.add(response.json()["id"])
            elif response.status_code == 200:
                destroyed.add(response.json()["id"])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(spawns):
                    nursery.start_soon(guarded, partial(spawn, client, token, name=f"new-{i}"))
                    if i < len(existing):
                        destroy = partial(
                            client.delete,
                            f"/v1/vms/{existing[i]['id']}",
                            headers=bearer(token),
                        )
                        nursery.start_soon(guarded, destroy)
    assert len(statuses) >= kill_after
    assert len(statuses) + len(transport_errors) == spawns + len(existing)
    assert set(statuses) <= {200, 201}, Counter(statuses)

    await trio.to_thread.run_sync(live_server.kill)
    pre_crash, _ = read_log_file(live_server.data_dir)  # a torn last line is dropped
    pre_head = pre_crash[-1]["seq"]
    # Acknowledged means durable: every 201/200 has its outcome entry in the log already.
    logged = {(e["op"], e["vm"]) for e in pre_crash if e["outcome"] == "succeeded"}
    assert {("vm.spawn", vm) for vm in spawned} <= logged
    assert {("vm.destroy", vm) for vm in destroyed} <= logged
    requested = {(e["op"], e["vm"]) for e in pre_crash if e["outcome"] == "requested"}
    ended = {(e["op"], e["vm"]) for e in pre_crash if e["outcome"] in TERMINAL}
    in_doubt = requested - ended

    await trio.to_thread.run_sync(live_server.start)
    async with live_server.client() as client:
        listed = await settled_vms(client, token)
        ids = {vm["id"] for vm in listed}
        assert spawned <= ids, "a VM whose spawn was acknowledged is gone"
        assert not destroyed & ids, "a VM whose destroy was acknowledged is back"
        assert len(ids) == len(listed)
        assert (await usage(client, token))["allocated"] == allocation_of(listed)
        entries = await audit_entries(client, live_server)
    verified = await verify_audit(live_server)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # Every operation in doubt at the crash was resolved by the proxy itself, once.
    resolutions = [e for e in entries if e["seq"] > pre_head]
    assert {(e["op"], e["vm"]) for e in resolutions} == in_doubt
    assert len(resolutions) == len(in_doubt)
    for entry in resolutions:
        assert entry["source"] == SYSTEM_SOURCE, entry
        assert entry["outcome"] in TERMINAL, entry
    # And now every requested operation has exactly one outcome.
    outcomes = Counter((e["op"], e["vm"]) for e in entries if e["outcome"] in TERMINAL)
    assert all(outcomes[op] == 1 for op in requested), outcomes
    # The fleet holds exactly the VMs the proxy counts: nothing leaked, nothing lost.
    code = await trio.to_thread.run_sync(live_server.stop)
    assert code == 0
    assert fleet_vm_ids(live_server.data_dir) == ids


# -- SIGTERM with requests in flight ------------------------------------------------------


class RawRequest:
    """One HTTP/1.1 request on its own connection, driven by hand with h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        data = b"".join(self.conn.send(event) or b"" for event in events)
        await self.stream.send_all(data)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[int, bytes]:
        status = 0
        body = b""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the connection closed before the response ended")


async def listener_closed(host: str, port: int, attempts: int = 200) -> bool:
    """Whether new connections are refused (bounded polling of a real process)."""
    for _ in range(attempts):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return True
        await stream.aclose()
        await trio.sleep(0.05)
    return False


async def test_sigterm_finishes_requests_in_flight(
    live_server: LiveServer, provision: Provision
) -> None:
    parts = urlsplit(live_server.url)
    host, port = parts.hostname, parts.port
    assert host is not None and port is not None
    async with live_server.client() as client:
        token = (await provision(client, bearer(live_server.admin_token), "drain", BIG_QUOTA)).token

    # Requests whose headers the server has parsed (it answered "100 Continue") and
    # whose bodies are still on their way: in flight by any definition.
    answers: list[tuple[int, bytes]] = []
    async with AsyncExitStack() as stack:
        requests: list[tuple[RawRequest, bytes]] = []
        with trio.fail_after(30):
            for i in range(4):
                stream = await trio.open_tcp_stream(host, port)
                raw = RawRequest(await stack.enter_async_context(stream))
                body = json.dumps({**SPEC, "name": f"in-flight-{i}"}).encode()
                headers = [
                    ("Host", f"{host}:{port}"),
                    ("Authorization", f"Bearer {token}"),
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Expect", "100-continue"),
                    ("X-Request-Id", f"in-flight-{i}"),
                ]
                await raw.send(h11.Request(method="POST", target="/v1/vms", headers=headers))
                event = await raw.next_event()
                assert isinstance(event, h11.InformationalResponse) and event.status_code == 100
                await raw.send(h11.Data(data=body[:10]))
                requests.append((raw, body[10:]))

        assert live_server.proc is not None
        live_server.proc.send_signal(signal.SIGTERM)
        # Draining: no new connections, but the ones in flight are still served.
        assert await listener_closed(host, port), "still accepting connections after SIGTERM"
        with trio.fail_after(30):
            for raw, rest in requests:
                await raw.send(h11.Data(data=rest), h11.EndOfMessage())
                answers.append(await raw.response())
    assert [status for status, _ in answers] == [201] * 4, answers
    ids = {json.loads(body)["id"] for _, body in answers}
    code = await trio.to_thread.run_sync(live_server.proc.wait, 60)
    assert code == 0, "".join(live_server.log[-30:])

    # What was acknowledged while draining is there after the restart.
    await trio.to_thread.run_sync(live_server.start)
    async with live_server.client() as client:
        listed = await list_all(client, token)
        assert {vm["id"] for vm in listed} == ids
        entries = await audit_entries(client, live_server)
    succeeded = {e["vm"] for e in entries if e["op"] == "vm.spawn" and e["outcome"] == "succeeded"}
    assert succeeded == ids
    verified = await verify_audit(live_server)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("PUT", "/healthz", 405),
        ("POST", "/v1/vms", 401),
        # found by Schemathesis: answers that are not errors, sent without reading a body
        ("OPTIONS", "/v1/admin/tenants", 200),
        ("GET", "/healthz", 200),
    ],
    ids=["405", "401", "options-200", "bodyless-route-200"],
)
async def test_early_error_response_leaves_the_connection_usable(
    live_server: LiveServer, method: str, target: str, status: int
) -> None:
    """An answer sent before the request body arrived must not wedge the connection.

    A 405, a 401, an automatic OPTIONS answer or the answer of a route that takes no body
    can go out as soon as the headers are parsed. When the body then
    arrives, the server must either go on serving that keep-alive connection or close it
    (or have said ``Connection: close``): a client's next request must not hang.
    """
    parts = urlsplit(live_server.url)
    host, port = parts.hostname, parts.port
    assert host is not None and port is not None
    body = json.dumps(SPEC).encode()
    headers = [
        ("Host", f"{host}:{port}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    async with await trio.open_tcp_stream(host, port) as stream:
        raw = RawRequest(stream)
        with trio.fail_after(10):
            await raw.send(h11.Request(method=method, target=target, headers=headers))
            event = await raw.next_event()
            assert isinstance(event, h11.Response) and event.status_code == status
            closing = any(
                name.lower() == b"connection" and b"close" in value.lower()
                for name, value in event.headers
            )
            while not isinstance(await raw.next_event(), h11.EndOfMessage):
                pass
            await trio.sleep(0.2)  # a slow client: the body comes well after the answer
            await raw.send(h11.Data(data=body), h11.EndOfMessage())
        if closing:
            return
        raw.conn.start_next_cycle()
        await raw.send(h11.Request(method="GET", target="/healthz", headers=[("Host", host)]))
        with trio.move_on_after(3) as hung:
            event = await raw.next_event()
        assert not hung.cancelled_caught, f"keep-alive connection hangs after an early {status}"
        assert isinstance(event, h11.Response | h11.ConnectionClosed)


# -- the operator's client commands -------------------------------------------------------


async def test_tenant_and_token_commands(live_server: LiveServer) -> None:
    where = ("--url", live_server.url, "--data-dir", str(live_server.data_dir))
    created = await run_cli(
        live_server, "tenant", "create", "cli-tenant",
        "--vcpus", "4", "--memory-mib", "2048", "--vms", "3", *where,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token and "\n" not in token

    again = await run_cli(
        live_server, "tenant", "create", "cli-tenant",
        "--vcpus", "1", "--memory-mib", "1", "--vms", "1", *where,
    )  # fmt: skip
    assert again.returncode != 0
    assert "conflict" in again.stderr

    issued = await run_cli(live_server, "token", "issue", "cli-tenant", *where)
    assert issued.returncode == 0, issued.stderr
    second = issued.stdout.strip()
    match = re.search(r"\btok-[0-9a-f]+\b", issued.stderr)
    assert match, issued.stderr
    second_id = match.group(0)

    async with live_server.client() as client:
        used = await usage(client, token)
        assert used == {
            "tenant": "cli-tenant",
            "quota": {"vcpus": 4, "memory_mib": 2048, "vms": 3},
            "allocated": {"vcpus": 0, "memory_mib": 0, "vms": 0},
        }
        vm = await spawn_ok(client, second, name="via-second-token")
        assert vm["tenant"] == "cli-tenant"

        revoked = await run_cli(live_server, "token", "revoke", "cli-tenant", second_id, *where)
        assert revoked.returncode == 0, revoked.stderr
        await assert_unauthorized(client, second)
        assert (await usage(client, token))["allocated"]["vms"] == 1

        twice = await run_cli(live_server, "token", "revoke", "cli-tenant", second_id, *where)
        assert twice.returncode != 0
        assert "404" in twice.stderr

        wrong = await run_cli(
            live_server, "token", "issue", "cli-tenant",
            "--url", live_server.url, "--admin-token", "not-the-admin-token",
        )  # fmt: skip
        assert wrong.returncode != 0
        assert "unauthorized" in wrong.stderr

        entries = await audit_entries(client, live_server)
    admin_ops = [
        (e["op"], e["detail"].get("token_id"))
        for e in entries
        if e["op"] in {"tenant.create", "token.issue", "token.revoke"}
    ]
    assert [op for op, _ in admin_ops] == ["tenant.create", "token.issue", "token.revoke"]
    assert admin_ops[1][1] == admin_ops[2][1] == second_id
    for entry in entries:
        if entry["op"] in {"tenant.create", "token.issue", "token.revoke"}:
            assert entry["source"]["token_id"] == "admin"
            assert entry["outcome"] == "succeeded"
            assert token not in json.dumps(entry) and second not in json.dumps(entry)
