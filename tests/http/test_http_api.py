"""The HTTP API of API.md, endpoint by endpoint and error code by error code.

Everything goes through the in-process Quart test client over a real core (real audit
log, real tenant actors, the embedded fleet). Tests that need the fleet to be slow or
to hang run under Trio's ``MockClock`` (virtual time that only moves when the test jumps
it), so they neither sleep nor depend on how fast the machine is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from quart import Response

from actors.journal.checkpoint import load_public_key, public_key_path, signature_valid
from actors.journal.merkle import MemoryTree, leaf_hash
from actors.journal.note import Verifier, open_checkpoint
from actors.service import open_service
from conftest import QUOTA, Api, LiveServer, Tenant, audit_lines, service_config
from server.app import create_app
from server.auth import Authority

PROBLEM_MEMBERS = {"type", "title", "status", "detail", "code"}
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
VM_STATES = {"spawning", "pending", "running", "destroying", "unknown", "error"}
SPEC = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
AUDIT_OPS = {
    "tenant.create",
    "tenant.update",
    "tenant.delete",
    "token.issue",
    "token.revoke",
    "vm.spawn",
    "vm.destroy",
}
AUDIT_OUTCOMES = {"requested", "succeeded", "failed", "rejected"}


# -- helpers ------------------------------------------------------------------------------------


async def spawn(
    api: Api, tenant: Tenant, headers: dict[str, str] | None = None, **spec: Any
) -> Response:
    return await api.client.post(
        "/v1/vms", json={**SPEC, **spec}, headers={**tenant.auth, **(headers or {})}
    )


async def spawned(api: Api, tenant: Tenant, **spec: Any) -> dict[str, Any]:
    response = await spawn(api, tenant, **spec)
    assert response.status_code == 201, await response.get_data()
    body: dict[str, Any] = await response.get_json()
    return body


async def usage(api: Api, tenant: Tenant) -> dict[str, Any]:
    response = await api.client.get("/v1/usage", headers=tenant.auth)
    assert response.status_code == 200, await response.get_data()
    body: dict[str, Any] = await response.get_json()
    return body


async def vm_ids(api: Api, tenant: Tenant) -> list[str]:
    response = await api.client.get("/v1/vms?limit=1000", headers=tenant.auth)
    assert response.status_code == 200
    return [vm["id"] for vm in (await response.get_json())["vms"]]


async def destroy(api: Api, tenant: Tenant, vm_id: str) -> Response:
    return await api.client.delete(f"/v1/vms/{vm_id}", headers=tenant.auth)


async def send(api: Api, method: str, path: str, body: Any, headers: dict[str, str]) -> Response:
    """A request with a JSON body, or with none at all when ``body`` is None."""
    if body is None:
        return await api.client.open(path, method=method, headers=headers)
    return await api.client.open(path, method=method, json=body, headers=headers)


async def assert_problem(response: Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem document with the given status and code."""
    raw = await response.get_data()
    assert response.status_code == status, raw
    assert response.mimetype == "application/problem+json", response.headers
    assert REQUEST_ID_RE.fullmatch(response.headers.get("X-Request-Id", ""))
    body: dict[str, Any] = json.loads(raw)
    assert set(body) >= PROBLEM_MEMBERS, body
    assert body["status"] == status
    assert body["code"] == code
    for member in ("type", "title", "detail"):
        assert isinstance(body[member], str) and body[member], body
    return body


def allocation(vcpus: int = 0, memory_mib: int = 0, vms: int = 0) -> dict[str, int]:
    return {"vcpus": vcpus, "memory_mib": memory_mib, "vms": vms}


def assert_vm(vm: dict[str, Any], tenant: str, **spec: Any) -> None:
    expected = {**SPEC, "name": None, **spec}
    assert set(vm) == {"id", "tenant", "state", "vcpus", "memory_mib", "image", "name"} | {
        "created_at"
    }
    assert isinstance(vm["id"], str) and vm["id"]
    assert vm["tenant"] == tenant
    assert vm["state"] in VM_STATES
    for key, value in expected.items():
        assert vm[key] == value, (key, vm)
    created = dt.datetime.fromisoformat(vm["created_at"])
    assert created.tzinfo is not None


def entries_for(entries: list[dict[str, Any]], vm_id: str) -> list[tuple[str, str]]:
    return [(e["op"], e["outcome"]) for e in entries if e["vm"] == vm_id]


async def until(predicate: Callable[[], bool]) -> None:
    """Let every other task run until ``predicate`` holds (no sleeping, no clock jumps)."""
    for _ in range(20_000):
        if predicate():
            return
        await trio.testing.wait_all_tasks_blocked(0.001)
    raise AssertionError("the condition never became true")


async def collect(into: list[Response], request: Callable[[], Awaitable[Response]]) -> None:
    into.append(await request())


# -- a core under a virtual clock with a short fleet deadline -------------------------------------


@dataclass
class Clocked:
    """The core under virtual time. pytest-trio runs a test under a clock only when the
    test function itself asks for that clock fixture, so each test takes ``mock_clock``
    too."""

    api: Api
    clock: trio.testing.MockClock


@pytest.fixture
async def clocked(tmp_path: Path, mock_clock: trio.testing.MockClock) -> AsyncIterator[Clocked]:
    """Like ``api``, but time only moves when the test jumps the clock; fleet deadline 0.5s."""
    data_dir = tmp_path / "clocked"
    async with open_service(service_config(data_dir, fleet_timeout=0.5)) as service:
        app = create_app(service, Authority.for_store(service.store))
        token = (data_dir / "admin.token").read_text().strip()
        api = Api(app.test_client(), service, token)
        try:
            yield Clocked(api, mock_clock)
        finally:
            # Whatever the test left in flight must be able to finish during shutdown.
            api.fleet.knobs.hang = False
            api.fleet.knobs.latency = 0.0
            mock_clock.autojump_threshold = 0.0


# -- operations ----------------------------------------------------------------------------------


async def test_healthz_and_readyz_answer_without_auth(api: Api) -> None:
    health = await api.client.get("/healthz")
    assert health.status_code == 200
    assert health.mimetype == "application/json"
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.headers["X-Request-Id"]


#: (path with {} for parameters, method) -> the statuses API.md lets that operation answer
CONTRACT_ERRORS: dict[tuple[str, str], set[int]] = {
    ("/v1/vms", "post"): {400, 401, 403, 409, 413, 415, 429, 502, 503},
    ("/v1/vms", "get"): {400, 401, 403, 429},
    ("/v1/vms/{}", "get"): {401, 403, 404, 429},
    ("/v1/vms/{}", "delete"): {401, 403, 404, 409, 429, 502, 503},
    ("/v1/usage", "get"): {401, 403, 429},
    ("/v1/admin/tenants", "post"): {400, 401, 403, 409, 413, 415},
    ("/v1/admin/tenants/{}", "get"): {401, 403, 404},
    ("/v1/admin/tenants/{}", "patch"): {400, 401, 403, 404, 413, 415},
    ("/v1/admin/tenants/{}", "delete"): {401, 403, 404, 409},
    ("/v1/admin/tenants/{}/tokens", "post"): {401, 403, 404},
    ("/v1/admin/tenants/{}/tokens/{}", "delete"): {401, 403, 404},
    ("/v1/admin/audit", "get"): {400, 401, 403},
    ("/v1/admin/audit/head", "get"): {401, 403},
    ("/healthz", "get"): set(),
    ("/readyz", "get"): {503},
}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        assert schema["$ref"].startswith("#/"), schema
        target: Any = doc
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        schema = target
    return schema


async def test_openapi_document_describes_every_path_and_its_errors(api: Api) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    doc = await response.get_json()
    assert str(doc["openapi"]).startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    for ref in _refs(doc):
        _resolve(doc, {"$ref": ref})  # every reference resolves
    paths = {re.sub(r"\{[^}]+\}", "{}", path): item for path, item in doc["paths"].items()}
    undocumented: list[str] = []
    for (path, method), statuses in CONTRACT_ERRORS.items():
        assert path in paths, f"{path} is not described"
        operation = paths[path].get(method)
        assert operation is not None, f"{method.upper()} {path} is not described"
        responses = operation["responses"]
        assert any(code.startswith("2") for code in responses), (path, method)
        for code in sorted(statuses):
            if str(code) not in responses:
                undocumented.append(f"{method.upper()} {path} {code}")
                continue
            content = responses[str(code)]["content"]
            problem = _resolve(doc, content["application/problem+json"]["schema"])
            assert set(problem["required"]) >= PROBLEM_MEMBERS, (path, method, code)
    assert not undocumented, f"error responses missing from the document: {undocumented}"


async def test_openapi_document_states_the_limits_the_server_enforces(api: Api) -> None:
    """Constraints Schemathesis found missing: the document must refuse what the server does."""
    doc = await (await api.client.get("/openapi.json")).get_json()
    body = _resolve(doc, {"$ref": "#/components/schemas/SpawnBody"})
    image = re.compile(body["properties"]["image"]["pattern"])
    assert image.search("debian-12") and not image.search("deb\x1bian")
    acme = await api.provision("acme")
    refused = await spawn(api, acme, image="deb\x1bian")
    assert refused.status_code == 400
    audit = doc["paths"]["/v1/admin/audit"]["get"]["parameters"]
    after = next(p for p in audit if p["name"] == "after")["schema"]
    too_far = await api.client.get(
        f"/v1/admin/audit?after={after['maximum'] + 1}", headers=api.admin
    )
    assert too_far.status_code == 400
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                assert "X-Request-Id" in response.get("headers", {}), (path, method, status)


# -- tenant endpoints ----------------------------------------------------------------------------


async def test_spawn_get_usage_and_audit_of_a_vm(api: Api) -> None:
    acme = await api.provision("acme")
    response = await spawn(api, acme, {"X-Request-Id": "spawn-1"}, name="web-1")
    assert response.status_code == 201
    assert response.headers["X-Request-Id"] == "spawn-1"
    vm = await response.get_json()
    assert_vm(vm, "acme", name="web-1")
    assert response.headers["Location"] == f"/v1/vms/{vm['id']}"

    one = await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth)
    assert one.status_code == 200
    live = await one.get_json()
    assert_vm(live, "acme", name="web-1")
    assert live["id"] == vm["id"]
    assert live["state"] in {"pending", "running"}  # live from the fleet, boot time 0

    assert await usage(api, acme) == {
        "tenant": "acme",
        "quota": QUOTA,
        "allocated": allocation(1, 256, 1),
    }
    assert vm["id"] in api.fleet.vm_ids()

    spawns = [e for e in await api.audit() if e["op"] == "vm.spawn"]
    assert [e["outcome"] for e in spawns] == ["requested", "succeeded"]
    for entry in spawns:
        assert entry["tenant"] == "acme"
        assert entry["vm"] == vm["id"]
        assert entry["source"]["token_id"] == acme.token_id
        assert "ip" in entry["source"]
        assert entry["request_id"] == "spawn-1"
    assert spawns[0]["detail"]["spec"] == {**SPEC, "name": "web-1"}


async def test_spawn_accepts_the_optional_forms_of_a_valid_body(api: Api) -> None:
    acme = await api.provision("acme")
    explicit_null = await spawned(api, acme, name=None)
    assert explicit_null["name"] is None
    longest = await spawned(api, acme, name="n" * 63, image="i" * 256)
    assert (longest["name"], longest["image"]) == ("n" * 63, "i" * 256)
    charset = await api.client.post(
        "/v1/vms",
        data=json.dumps(SPEC).encode(),
        headers={**acme.auth, "Content-Type": "application/json; charset=utf-8"},
    )
    assert charset.status_code == 201, await charset.get_data()
    ids = {explicit_null["id"], longest["id"], (await charset.get_json())["id"]}
    assert len(ids) == 3  # ids are unique
    assert set(await vm_ids(api, acme)) == ids


async def test_list_pages_through_only_the_callers_vms(api: Api) -> None:
    acme = await api.provision("acme")
    other = await api.provision("other")
    mine = {(await spawned(api, acme))["id"] for _ in range(4)}
    theirs = (await spawned(api, other))["id"]

    everything = await api.client.get("/v1/vms", headers=acme.auth)
    assert everything.status_code == 200
    body = await everything.get_json()
    assert body["next"] is None
    assert {vm["id"] for vm in body["vms"]} == mine
    for vm in body["vms"]:
        assert_vm(vm, "acme")

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await api.client.get(f"/v1/vms?{query}", headers=acme.auth)
        assert page.status_code == 200, await page.get_data()
        data = await page.get_json()
        assert len(data["vms"]) <= 3
        seen.extend(vm["id"] for vm in data["vms"])
        pages += 1
        cursor = data["next"]
        if cursor is None:
            break
        assert isinstance(cursor, str) and cursor
    assert pages == 2
    assert sorted(seen) == sorted(mine)
    assert len(seen) == len(set(seen))
    assert theirs not in seen

    single = await (await api.client.get("/v1/vms?limit=1", headers=acme.auth)).get_json()
    assert len(single["vms"]) == 1 and single["next"]


async def test_cursors_from_another_tenant_or_forged_are_rejected(api: Api) -> None:
    acme = await api.provision("acme")
    other = await api.provision("other")
    for _ in range(2):
        await spawned(api, acme)
        await spawned(api, other)
    page = await (await api.client.get("/v1/vms?limit=1", headers=other.auth)).get_json()
    foreign = page["next"]
    assert foreign
    reused = await api.client.get(f"/v1/vms?limit=1&cursor={foreign}", headers=acme.auth)
    await assert_problem(reused, 400, "invalid_request")

    own = await (await api.client.get("/v1/vms?limit=1", headers=acme.auth)).get_json()
    tampered = own["next"][:-2] + ("AA" if not own["next"].endswith("AA") else "BB")
    forged_elsewhere = Authority("another-signing-key", "adm-x").cursor("acme", "vm-0")
    for cursor in (tampered, forged_elsewhere, "not-a-cursor", "vm-0"):
        response = await api.client.get(
            "/v1/vms", query_string={"cursor": cursor}, headers=acme.auth
        )
        await assert_problem(response, 400, "invalid_request")


async def test_destroy_answers_destroyed_and_releases_capacity(api: Api) -> None:
    acme = await api.provision("acme")
    keep = await spawned(api, acme, vcpus=2)
    vm = await spawned(api, acme, vcpus=3, memory_mib=1024)
    response = await destroy(api, acme, vm["id"])
    assert response.status_code == 200
    assert await response.get_json() == {"id": vm["id"], "state": "destroyed"}

    await assert_problem(
        await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth), 404, "not_found"
    )
    assert await vm_ids(api, acme) == [keep["id"]]
    assert (await usage(api, acme))["allocated"] == allocation(2, 256, 1)
    assert vm["id"] not in api.fleet.vm_ids()
    entries = await api.audit()
    assert entries_for(entries, vm["id"]) == [
        ("vm.spawn", "requested"),
        ("vm.spawn", "succeeded"),
        ("vm.destroy", "requested"),
        ("vm.destroy", "succeeded"),
    ]
    for entry in entries:
        if entry["op"] == "vm.destroy":
            assert entry["source"]["token_id"] == acme.token_id
            assert entry["tenant"] == "acme"

    again = await destroy(api, acme, vm["id"])
    await assert_problem(again, 404, "not_found")


async def test_unknown_and_foreign_vms_are_indistinguishable(api: Api) -> None:
    acme = await api.provision("acme")
    mallory = await api.provision("mallory")
    target = await spawned(api, acme)
    own = await spawned(api, mallory)
    unknown = "vm-" + "0" * 32
    assert unknown != target["id"]
    before = api.service.audit.seq

    foreign_get = await api.client.get(f"/v1/vms/{target['id']}", headers=mallory.auth)
    unknown_get = await api.client.get(f"/v1/vms/{unknown}", headers=mallory.auth)
    foreign_delete = await destroy(api, mallory, target["id"])
    unknown_delete = await destroy(api, mallory, unknown)
    bodies = set()
    for response in (foreign_get, unknown_get, foreign_delete, unknown_delete):
        await assert_problem(response, 404, "not_found")
        bodies.add(await response.get_data())
    assert len(bodies) == 1, bodies

    # The target is untouched, and still counts for its owner only.
    alive = await api.client.get(f"/v1/vms/{target['id']}", headers=acme.auth)
    assert alive.status_code == 200
    assert (await usage(api, acme))["allocated"]["vms"] == 1
    assert await vm_ids(api, mallory) == [own["id"]]
    assert target["id"] in api.fleet.vm_ids()

    # Both refused destroys are logged alike, under the caller's tenant.
    rejected = await api.audit(after=before)
    assert [(e["op"], e["outcome"], e["tenant"], e["vm"]) for e in rejected] == [
        ("vm.destroy", "rejected", "mallory", target["id"]),
        ("vm.destroy", "rejected", "mallory", unknown),
    ]
    for entry in rejected:
        assert entry["source"]["token_id"] == mallory.token_id
        assert entry["detail"], "a rejection carries its reason"
    assert rejected[0]["detail"] == rejected[1]["detail"]


@pytest.mark.parametrize(
    ("dimension", "first", "second"),
    [
        ("vcpus", {"vcpus": 3}, {"vcpus": 2}),
        ("memory_mib", {"memory_mib": 1000}, {"memory_mib": 100}),
        ("vms", {}, {}),
    ],
)
async def test_quota_exceeded_names_the_dimension(
    api: Api, dimension: str, first: dict[str, int], second: dict[str, int]
) -> None:
    quota = {"vcpus": 4, "memory_mib": 1024, "vms": 1 if dimension == "vms" else 4}
    acme = await api.provision("acme", quota)
    vm = await spawned(api, acme, **first)
    before_usage = await usage(api, acme)
    before_seq = api.service.audit.seq
    fleet_before = api.fleet.vm_ids()

    response = await spawn(api, acme, **second)
    body = await assert_problem(response, 403, "quota_exceeded")
    assert dimension in body["detail"]
    for other in {"vcpus", "memory_mib", "vms"} - {dimension}:
        assert other not in body["detail"], body["detail"]

    assert await usage(api, acme) == before_usage
    assert await vm_ids(api, acme) == [vm["id"]]
    assert api.fleet.vm_ids() == fleet_before
    entries = await api.audit(after=before_seq)
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["op"], entry["outcome"], entry["tenant"], entry["vm"]) == (
        "vm.spawn",
        "rejected",
        "acme",
        None,
    )
    assert entry["source"]["token_id"] == acme.token_id
    assert dimension in json.dumps(entry["detail"])


async def test_spawning_exactly_up_to_the_quota_is_allowed(api: Api) -> None:
    acme = await api.provision("acme", {"vcpus": 3, "memory_mib": 768, "vms": 2})
    await spawned(api, acme, vcpus=2, memory_mib=512)
    await spawned(api, acme, vcpus=1, memory_mib=256)
    assert (await usage(api, acme))["allocated"] == allocation(3, 768, 2)


# -- idempotency ---------------------------------------------------------------------------------


async def test_idempotency_key_replays_the_first_answer(api: Api) -> None:
    acme = await api.provision("acme")
    key = {"Idempotency-Key": "create web-1 #1"}
    first = await spawn(api, acme, key, name="web-1")
    assert first.status_code == 201
    first_body = await first.get_data()
    charged = await usage(api, acme)
    fleet_calls = api.fleet.calls

    replay = await spawn(api, acme, key, name="web-1")
    assert replay.status_code == 201
    assert await replay.get_data() == first_body
    assert replay.headers["Location"] == first.headers["Location"]
    assert await usage(api, acme) == charged
    assert len(await vm_ids(api, acme)) == 1
    assert len(api.fleet.vm_ids()) == 1
    assert api.fleet.calls == fleet_calls
    requested = [e for e in await api.audit() if e["op"] == "vm.spawn"]
    assert [e["outcome"] for e in requested] == ["requested", "succeeded"]


async def test_idempotency_key_with_another_body_conflicts(api: Api) -> None:
    acme = await api.provision("acme")
    key = {"Idempotency-Key": "k-1"}
    await spawned_with_key(api, acme, key)
    charged = await usage(api, acme)
    response = await spawn(api, acme, key, vcpus=2)
    await assert_problem(response, 409, "idempotency_conflict")
    assert await usage(api, acme) == charged
    assert len(api.fleet.vm_ids()) == 1


async def spawned_with_key(api: Api, tenant: Tenant, key: dict[str, str]) -> dict[str, Any]:
    response = await spawn(api, tenant, key)
    assert response.status_code == 201, await response.get_data()
    body: dict[str, Any] = await response.get_json()
    return body


async def test_idempotent_replay_works_at_the_quota_ceiling(api: Api) -> None:
    acme = await api.provision("acme", {"vcpus": 1, "memory_mib": 256, "vms": 1})
    key = {"Idempotency-Key": "only-one"}
    first = await spawned_with_key(api, acme, key)
    replay = await spawn(api, acme, key)
    assert replay.status_code == 201, await replay.get_data()
    assert await replay.get_json() == first
    fresh = await spawn(api, acme, {"Idempotency-Key": "another"})
    await assert_problem(fresh, 403, "quota_exceeded")
    assert (await usage(api, acme))["allocated"] == allocation(1, 256, 1)


async def test_idempotency_keys_are_scoped_to_the_tenant(api: Api) -> None:
    acme = await api.provision("acme")
    other = await api.provision("other")
    key = {"Idempotency-Key": "shared-key"}
    mine = await spawned_with_key(api, acme, key)
    theirs = await spawned_with_key(api, other, key)
    assert theirs["id"] != mine["id"]
    assert theirs["tenant"] == "other"
    assert (await usage(api, other))["allocated"]["vms"] == 1
    assert (await usage(api, acme))["allocated"]["vms"] == 1


async def test_idempotent_replay_of_a_refused_spawn_replays_the_refusal(api: Api) -> None:
    acme = await api.provision("acme", {"vcpus": 1, "memory_mib": 256, "vms": 1})
    key = {"Idempotency-Key": "too-big"}
    first = await spawn(api, acme, key, vcpus=2)
    first_body = await assert_problem(first, 403, "quota_exceeded")
    raised = await api.client.patch(
        "/v1/admin/tenants/acme",
        json={"quota": {"vcpus": 8, "memory_mib": 8192, "vms": 4}},
        headers=api.admin,
    )
    assert raised.status_code == 200
    replay = await spawn(api, acme, key, vcpus=2)
    assert await assert_problem(replay, 403, "quota_exceeded") == first_body
    assert (await usage(api, acme))["allocated"] == allocation()


# -- admin endpoints -----------------------------------------------------------------------------


async def test_create_tenant_and_duplicate_conflict(api: Api, data_dir: Path) -> None:
    response = await api.client.post(
        "/v1/admin/tenants", json={"id": "acme", "quota": QUOTA}, headers=api.admin
    )
    assert response.status_code == 201
    body = await response.get_json()
    assert set(body) == {"id", "quota", "token", "token_id", "expires_at"}
    assert (body["id"], body["quota"]) == ("acme", QUOTA)
    assert body["token"] and body["token_id"]

    view = await api.client.get("/v1/admin/tenants/acme", headers=api.admin)
    assert view.status_code == 200
    assert await view.get_json() == {"id": "acme", "quota": QUOTA, "allocated": allocation()}

    seq = api.service.audit.seq
    other_quota = {"vcpus": 1, "memory_mib": 1, "vms": 1}
    dup = await api.client.post(
        "/v1/admin/tenants", json={"id": "acme", "quota": other_quota}, headers=api.admin
    )
    await assert_problem(dup, 409, "conflict")
    assert api.service.audit.seq == seq
    assert (await api.client.get("/v1/usage", headers=tenant_auth(body))).status_code == 200
    assert (await (await api.client.get("/v1/admin/tenants/acme", headers=api.admin)).get_json())[
        "quota"
    ] == QUOTA

    [entry] = await api.audit()
    assert (entry["op"], entry["outcome"], entry["tenant"], entry["vm"]) == (
        "tenant.create",
        "succeeded",
        "acme",
        None,
    )
    assert entry["source"]["token_id"] == "admin"
    assert body["token"] not in b"\n".join(audit_lines(data_dir)).decode()


def tenant_auth(body: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {body['token']}"}


async def test_admin_routes_naming_an_unknown_tenant_answer_404(api: Api) -> None:
    acme = await api.provision("acme")
    seq = api.service.audit.seq
    quota = {"quota": QUOTA}
    requests = [
        api.client.get("/v1/admin/tenants/ghost", headers=api.admin),
        api.client.patch("/v1/admin/tenants/ghost", json=quota, headers=api.admin),
        api.client.delete("/v1/admin/tenants/ghost", headers=api.admin),
        api.client.post("/v1/admin/tenants/ghost/tokens", headers=api.admin),
        api.client.delete(f"/v1/admin/tenants/ghost/tokens/{acme.token_id}", headers=api.admin),
        # a token id the (existing) tenant never had
        api.client.delete("/v1/admin/tenants/acme/tokens/tok-0000000000000000", headers=api.admin),
    ]
    for request in requests:
        await assert_problem(await request, 404, "not_found")
    assert api.service.audit.seq == seq
    assert (await usage(api, acme))["tenant"] == "acme"


async def test_patch_quota_and_lowering_it_below_the_allocation(api: Api) -> None:
    acme = await api.provision("acme")
    first = await spawned(api, acme, vcpus=2)
    second = await spawned(api, acme, vcpus=2)
    seq = api.service.audit.seq
    lower = {"vcpus": 1, "memory_mib": 8192, "vms": 1}
    response = await api.client.patch(
        "/v1/admin/tenants/acme", json={"quota": lower}, headers=api.admin
    )
    assert response.status_code == 200, await response.get_data()
    assert await response.get_json() == {
        "id": "acme",
        "quota": lower,
        "allocated": allocation(4, 512, 2),
    }
    [entry] = await api.audit(after=seq)
    assert (entry["op"], entry["outcome"], entry["tenant"]) == (
        "tenant.update",
        "succeeded",
        "acme",
    )
    assert entry["source"]["token_id"] == "admin"
    assert lower in entry["detail"].values()

    # Nothing already allocated is taken away ...
    assert sorted(await vm_ids(api, acme)) == sorted([first["id"], second["id"]])
    assert (await usage(api, acme)) == {
        "tenant": "acme",
        "quota": lower,
        "allocated": allocation(4, 512, 2),
    }
    # ... but no further spawn passes, even after one VM is gone.
    await assert_problem(await spawn(api, acme), 403, "quota_exceeded")
    assert (await destroy(api, acme, first["id"])).status_code == 200
    await assert_problem(await spawn(api, acme), 403, "quota_exceeded")
    assert (await destroy(api, acme, second["id"])).status_code == 200
    await spawned(api, acme)
    assert (await usage(api, acme))["allocated"] == allocation(1, 256, 1)


async def test_delete_tenant_refused_while_it_has_vms_then_tokens_die(api: Api) -> None:
    acme = await api.provision("acme")
    vm = await spawned(api, acme)
    seq = api.service.audit.seq
    refused = await api.client.delete("/v1/admin/tenants/acme", headers=api.admin)
    await assert_problem(refused, 409, "conflict")
    assert api.service.audit.seq == seq
    # the refused deletion left the tenant fully working
    await spawned(api, acme)
    for vm_id in await vm_ids(api, acme):
        assert (await destroy(api, acme, vm_id)).status_code == 200
    assert vm["id"] not in api.fleet.vm_ids()

    seq = api.service.audit.seq
    deleted = await api.client.delete("/v1/admin/tenants/acme", headers=api.admin)
    assert deleted.status_code == 204
    assert await deleted.get_data() == b""
    [entry] = await api.audit(after=seq)
    assert (entry["op"], entry["outcome"], entry["tenant"]) == (
        "tenant.delete",
        "succeeded",
        "acme",
    )
    assert entry["source"]["token_id"] == "admin"

    await assert_problem(
        await api.client.get("/v1/admin/tenants/acme", headers=api.admin), 404, "not_found"
    )
    await assert_problem(await api.client.get("/v1/usage", headers=acme.auth), 401, "unauthorized")
    await assert_problem(await spawn(api, acme), 401, "unauthorized")

    # A new tenant of the same name does not revive the old tokens.
    reborn = await api.provision("acme")
    await assert_problem(await api.client.get("/v1/usage", headers=acme.auth), 401, "unauthorized")
    assert (await usage(api, reborn))["allocated"] == allocation()
    assert await vm_ids(api, reborn) == []


async def test_issue_and_revoke_tokens(api: Api, data_dir: Path) -> None:
    acme = await api.provision("acme")
    seq = api.service.audit.seq
    issued = await api.client.post("/v1/admin/tenants/acme/tokens", headers=api.admin)
    assert issued.status_code == 201
    body = await issued.get_json()
    assert set(body) == {"token", "token_id", "expires_at"}
    assert body["token_id"] != acme.token_id
    second = Tenant("acme", body["token"], body["token_id"], body)
    vm = await spawned(api, second)
    assert vm["tenant"] == "acme"
    assert await vm_ids(api, acme) == [vm["id"]]  # both tokens act for the same tenant

    revoked = await api.client.delete(
        f"/v1/admin/tenants/acme/tokens/{acme.token_id}", headers=api.admin
    )
    assert revoked.status_code == 204
    await assert_problem(await api.client.get("/v1/usage", headers=acme.auth), 401, "unauthorized")
    assert (await usage(api, second))["allocated"]["vms"] == 1
    again = await api.client.delete(
        f"/v1/admin/tenants/acme/tokens/{acme.token_id}", headers=api.admin
    )
    await assert_problem(again, 404, "not_found")

    tokens = [e for e in await api.audit(after=seq) if e["op"].startswith("token.")]
    assert [(e["op"], e["outcome"], e["tenant"]) for e in tokens] == [
        ("token.issue", "succeeded", "acme"),
        ("token.revoke", "succeeded", "acme"),
    ]
    assert tokens[0]["detail"]["token_id"] == second.token_id
    assert tokens[1]["detail"]["token_id"] == acme.token_id
    assert all(e["source"]["token_id"] == "admin" for e in tokens)
    stored = b"\n".join(audit_lines(data_dir)).decode()
    for secret in (acme.token, second.token, api.admin_token):
        assert secret not in stored


async def test_answers_without_content_describe_no_content(live_server: LiveServer) -> None:
    """A 204 (and an automatic OPTIONS) has no body, so no media type: not text/html.

    Over the wire: Quart's test client would add its own default Content-Type.
    """
    admin = {"Authorization": f"Bearer {live_server.admin_token}"}
    async with live_server.client() as client:
        created = await client.post(
            "/v1/admin/tenants", json={"id": "acme", "quota": QUOTA}, headers=admin
        )
        assert created.status_code == 201
        token_id = created.json()["token_id"]
        revoked = await client.delete(f"/v1/admin/tenants/acme/tokens/{token_id}", headers=admin)
        deleted = await client.delete("/v1/admin/tenants/acme", headers=admin)
        options = await client.options("/v1/vms")
    for response in (revoked, deleted):
        assert response.status_code == 204
        assert "Content-Type" not in response.headers
        assert "Content-Length" not in response.headers
        assert response.headers["X-Request-Id"] and response.headers["Audit-Seq"]
        assert response.content == b""
    assert options.status_code == 200 and options.content == b""
    assert "Content-Type" not in options.headers
    assert "POST" in options.headers["Allow"]


# -- the audit endpoints -------------------------------------------------------------------------


async def test_audit_listing_returns_the_stored_lines(api: Api, data_dir: Path) -> None:
    acme = await api.provision("acme")
    vm = await spawned(api, acme)
    await destroy(api, acme, vm["id"])
    await destroy(api, acme, "vm-nope")
    await api.client.post("/v1/admin/tenants/acme/tokens", headers=api.admin)

    lines = audit_lines(data_dir)
    stored = [json.loads(line) for line in lines]
    assert len(stored) == api.service.audit.seq == 7

    response = await api.client.get("/v1/admin/audit", headers=api.admin)
    assert response.status_code == 200
    raw = await response.get_data()
    page = json.loads(raw)
    assert page["entries"] == stored
    for line in lines:
        assert line in raw  # byte for byte as stored
    assert page["head"] == {"seq": 7, "hash": stored[-1]["hash"]}

    window = await api.client.get("/v1/admin/audit?after=2&limit=3", headers=api.admin)
    assert (await window.get_json())["entries"] == stored[2:5]
    tail = await api.client.get("/v1/admin/audit?after=5", headers=api.admin)
    assert (await tail.get_json())["entries"] == stored[5:]
    beyond = await api.client.get("/v1/admin/audit?after=7", headers=api.admin)
    assert (await beyond.get_json())["entries"] == []

    # The chain the endpoint serves is the one API.md defines.
    prev = "0" * 64
    for seq, entry in enumerate(stored, start=1):
        assert entry["seq"] == seq
        assert entry["prev"] == prev
        assert dt.datetime.fromisoformat(entry["ts"]).tzinfo is not None
        assert entry["op"] in AUDIT_OPS and entry["outcome"] in AUDIT_OUTCOMES
        unhashed = {k: v for k, v in entry.items() if k != "hash"}
        canonical = json.dumps(unhashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert entry["hash"] == hashlib.sha256(canonical.encode()).hexdigest()
        prev = entry["hash"]


async def test_audit_head_is_the_current_head_signed_on_demand(api: Api, data_dir: Path) -> None:
    key = load_public_key(public_key_path(data_dir))
    log_key = Verifier.parse((data_dir / "keys" / "audit-note.vkey").read_text().strip())
    # an empty log has a head too: size 0, the empty tree's root
    empty = await (await api.client.get("/v1/admin/audit/head", headers=api.admin)).get_json()
    assert (empty["seq"], empty["hash"]) == (0, "0" * 64)
    tree, _ = open_checkpoint(empty["checkpoint"], log_key)
    assert (tree.size, tree.root) == (0, hashlib.sha256(b"").digest())

    acme = await api.provision("acme")
    await spawned(api, acme)
    response = await api.client.get("/v1/admin/audit/head", headers=api.admin)
    assert response.status_code == 200
    head = await response.get_json()
    assert set(head) == {"seq", "hash", "ts", "signature", "checkpoint"}
    assert head["seq"] == api.service.audit.seq == 3
    assert head["hash"] == json.loads(audit_lines(data_dir)[-1])["hash"]
    assert signature_valid(key, head)
    assert not signature_valid(key, {**head, "seq": head["seq"] - 1})
    # the same head as a C2SP checkpoint of the tree over the stored lines
    tree, _ = open_checkpoint(head["checkpoint"], log_key)
    assert tree.origin == log_key.name and tree.size == 3
    assert tree.root == MemoryTree(leaf_hash(line) for line in audit_lines(data_dir)).root()
    assert (
        await (await api.client.get("/v1/audit/checkpoint", headers=acme.auth)).get_data(
            as_text=True
        )
        == head["checkpoint"]
    )

    # no checkpoint is written in between: the head moves with every acknowledged write
    await spawned(api, acme)
    newer = await (await api.client.get("/v1/admin/audit/head", headers=api.admin)).get_json()
    assert newer["seq"] == 5
    assert newer["hash"] == json.loads(audit_lines(data_dir)[-1])["hash"]
    assert signature_valid(key, newer)
    assert open_checkpoint(newer["checkpoint"], log_key)[0].size == 5
    assert api.service.latest_checkpoint() is None  # signed on demand, not stored


# -- authentication and authorisation ------------------------------------------------------------


async def test_every_bad_token_gets_the_same_401(api: Api) -> None:
    acme = await api.provision("acme")
    gone = await api.provision("gone")
    assert (await api.client.delete("/v1/admin/tenants/gone", headers=api.admin)).status_code == 204
    spare = await (
        await api.client.post("/v1/admin/tenants/acme/tokens", headers=api.admin)
    ).get_json()
    revoke = f"/v1/admin/tenants/acme/tokens/{spare['token_id']}"
    assert (await api.client.delete(revoke, headers=api.admin)).status_code == 204
    forged = Authority("not-the-servers-key", "adm-x").issue("acme", acme.token_id)
    tampered = acme.token[:-3] + ("xyz" if not acme.token.endswith("xyz") else "abc")

    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic YWNtZTpzZWNyZXQ="},
        {"Authorization": acme.token},
        {"Authorization": f"Bearer {acme.token} extra"},
        {"Authorization": f"Bearer {forged}"},
        {"Authorization": f"Bearer {tampered}"},
        {"Authorization": f"Bearer {spare['token']}"},  # revoked
        {"Authorization": f"Bearer {gone.token}"},  # deleted tenant
        {"Authorization": f"Bearer {api.admin_token}x"},
    ]
    seq = api.service.audit.seq
    bodies: set[bytes] = set()
    for headers in bad_headers:
        for method, path in (("POST", "/v1/vms"), ("GET", "/v1/usage"), ("GET", "/v1/admin/audit")):
            body = SPEC if method == "POST" else None
            response = await send(api, method, path, body, headers)
            await assert_problem(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), headers
            bodies.add(await response.get_data())
    assert len(bodies) == 1, bodies
    assert api.service.audit.seq == seq
    assert (await usage(api, acme))["allocated"] == allocation()


async def test_tokens_are_confined_to_their_kind_of_endpoint(api: Api) -> None:
    acme = await api.provision("acme")
    vm = await spawned(api, acme)
    seq = api.service.audit.seq
    admin_calls: list[tuple[str, str, Any]] = [
        ("POST", "/v1/admin/tenants", {"id": "evil", "quota": QUOTA}),
        ("GET", "/v1/admin/tenants/acme", None),
        ("PATCH", "/v1/admin/tenants/acme", {"quota": {"vcpus": 99, "memory_mib": 99, "vms": 99}}),
        ("DELETE", "/v1/admin/tenants/acme", None),
        ("POST", "/v1/admin/tenants/acme/tokens", None),
        ("DELETE", f"/v1/admin/tenants/acme/tokens/{acme.token_id}", None),
        ("GET", "/v1/admin/audit", None),
        ("GET", "/v1/admin/audit/head", None),
    ]
    for method, path, body in admin_calls:
        response = await send(api, method, path, body, acme.auth)
        await assert_problem(response, 403, "forbidden")
    tenant_calls: list[tuple[str, str, Any]] = [
        ("POST", "/v1/vms", SPEC),
        ("GET", "/v1/vms", None),
        ("GET", f"/v1/vms/{vm['id']}", None),
        ("DELETE", f"/v1/vms/{vm['id']}", None),
        ("GET", "/v1/usage", None),
    ]
    for method, path, body in tenant_calls:
        response = await send(api, method, path, body, api.admin)
        await assert_problem(response, 403, "forbidden")
    assert api.service.audit.seq == seq
    assert await usage(api, acme) == {
        "tenant": "acme",
        "quota": QUOTA,
        "allocated": allocation(1, 256, 1),
    }
    assert await vm_ids(api, acme) == [vm["id"]]
    await assert_problem(
        await api.client.get("/v1/admin/tenants/evil", headers=api.admin), 404, "not_found"
    )


# -- protocol-level errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/vms", {"GET", "POST"}),
        ("DELETE", "/v1/vms", {"GET", "POST"}),
        ("PATCH", "/v1/vms/vm-1", {"GET", "DELETE"}),
        ("POST", "/v1/usage", {"GET"}),
        ("PUT", "/v1/admin/tenants/acme", {"GET", "PATCH", "DELETE"}),
        ("PUT", "/v1/admin/tenants", {"GET", "POST"}),
        ("POST", "/healthz", {"GET"}),
    ],
)
async def test_method_not_allowed_carries_allow(
    api: Api, method: str, path: str, allowed: set[str]
) -> None:
    acme = await api.provision("acme")
    seq = api.service.audit.seq
    response = await api.client.open(path, method=method, headers=acme.auth)
    await assert_problem(response, 405, "method_not_allowed")
    allow = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= allow
    assert method not in allow
    assert api.service.audit.seq == seq


async def test_body_size_and_media_type_are_enforced(api: Api) -> None:
    acme = await api.provision("acme")
    json_headers = {**acme.auth, "Content-Type": "application/json"}
    valid = json.dumps(SPEC).encode()
    limit = 64 * 1024
    too_large = await api.client.post(
        "/v1/vms", data=valid + b" " * (limit + 1 - len(valid)), headers=json_headers
    )
    await assert_problem(too_large, 413, "payload_too_large")
    assert (await usage(api, acme))["allocated"] == allocation()
    # exactly 64 KiB is not "over 64 KiB" (trailing whitespace is valid JSON)
    at_limit = await api.client.post(
        "/v1/vms", data=valid + b" " * (limit - len(valid)), headers=json_headers
    )
    assert at_limit.status_code == 201, await at_limit.get_data()
    vm = await at_limit.get_json()
    assert (await destroy(api, acme, vm["id"])).status_code == 200
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = await api.client.post(
            "/v1/vms",
            data=json.dumps(SPEC).encode(),
            headers={**acme.auth, "Content-Type": content_type},
        )
        await assert_problem(response, 415, "unsupported_media_type")
    malformed = await api.client.post("/v1/vms", data=b'{"vcpus": 1', headers=json_headers)
    await assert_problem(malformed, 400, "invalid_request")
    unknown_field = await spawn(api, acme, gpu=1)
    await assert_problem(unknown_field, 400, "invalid_request")
    assert (await usage(api, acme))["allocated"] == allocation()
    assert api.fleet.vm_ids() == set()
    assert [e["op"] for e in await api.audit() if e["op"].startswith("vm.")] == [
        "vm.spawn",
        "vm.spawn",
        "vm.destroy",
        "vm.destroy",
    ]  # only the one valid spawn (and its destroy) got as far as the audit log


async def test_unknown_route_is_a_404_problem(api: Api) -> None:
    response = await api.client.get("/v2/vms", headers=api.admin)
    await assert_problem(response, 404, "not_found")


@pytest.mark.parametrize(
    "given", ["abc", "A.b_c-9", "x" * 128, "0"], ids=["word", "punct", "128", "digit"]
)
async def test_sane_request_ids_are_echoed(api: Api, given: str) -> None:
    for path in ("/healthz", "/v1/usage"):  # on success and on error alike
        response = await api.client.get(path, headers={"X-Request-Id": given})
        assert response.headers["X-Request-Id"] == given


@pytest.mark.parametrize(
    "given",
    ["x" * 129, "has space", "semi;colon", "slash/ed", "caf\u00e9", ""],
    ids=["129", "space", "semicolon", "slash", "latin1", "empty"],
)
async def test_insane_request_ids_are_replaced(api: Api, given: str) -> None:
    acme = await api.provision("acme")
    seq = api.service.audit.seq
    response = await spawn(api, acme, {"X-Request-Id": given})
    assert response.status_code == 201
    echoed = response.headers["X-Request-Id"]
    assert echoed != given
    assert REQUEST_ID_RE.fullmatch(echoed)
    entries = await api.audit(after=seq)
    assert entries and all(e["request_id"] == echoed for e in entries)
    failing = await api.client.get("/v1/usage", headers={"X-Request-Id": given})
    assert failing.status_code == 401
    assert REQUEST_ID_RE.fullmatch(failing.headers["X-Request-Id"])
    assert failing.headers["X-Request-Id"] != given


# -- the fleet misbehaving ------------------------------------------------------------------------


async def test_fleet_error_on_spawn_releases_the_capacity(api: Api) -> None:
    acme = await api.provision("acme")
    seq = api.service.audit.seq
    api.fleet.knobs.fail_next = 1
    response = await spawn(api, acme, vcpus=4)
    await assert_problem(response, 502, "fleet_error")
    assert (await usage(api, acme))["allocated"] == allocation()
    assert await vm_ids(api, acme) == []
    assert api.fleet.vm_ids() == set()
    entries = await api.audit(after=seq)
    assert [(e["op"], e["outcome"]) for e in entries] == [
        ("vm.spawn", "requested"),
        ("vm.spawn", "failed"),
    ]
    assert entries[0]["vm"] == entries[1]["vm"] is not None
    assert entries[1]["source"]["token_id"] == acme.token_id
    # the full quota is usable again
    await spawned(api, acme, vcpus=8)


async def test_fleet_error_on_destroy_keeps_the_vm(api: Api) -> None:
    acme = await api.provision("acme")
    vm = await spawned(api, acme)
    seq = api.service.audit.seq
    api.fleet.knobs.fail_next = 1
    await assert_problem(await destroy(api, acme, vm["id"]), 502, "fleet_error")
    again = await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth)
    assert again.status_code == 200
    assert (await again.get_json())["state"] in {"pending", "running"}
    assert (await usage(api, acme))["allocated"] == allocation(1, 256, 1)
    assert vm["id"] in api.fleet.vm_ids()
    assert entries_for(await api.audit(after=seq), vm["id"]) == [
        ("vm.destroy", "requested"),
        ("vm.destroy", "failed"),
    ]
    assert (await destroy(api, acme, vm["id"])).status_code == 200


@pytest.fixture
async def tiny_mailbox(data_dir: Path) -> AsyncIterator[Api]:
    """A core whose tenant mailboxes hold nothing: a request that finds the actor not yet
    waiting for its next message is over the per-tenant limit."""
    async with open_service(service_config(data_dir, mailbox_size=0)) as service:
        app = create_app(service, Authority.for_store(service.store))
        token = (data_dir / "admin.token").read_text().strip()
        yield Api(app.test_client(), service, token)


async def test_per_tenant_limit_answers_429_with_retry_after(tiny_mailbox: Api) -> None:
    api = tiny_mailbox
    acme = await api.provision("acme")
    seq = api.service.audit.seq
    # The tenant's actor starts on first use, so the first request finds nobody waiting.
    response = await spawn(api, acme)
    await assert_problem(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "1"
    assert api.service.audit.seq == seq
    await trio.testing.wait_all_tasks_blocked()
    assert await usage(api, acme) == {"tenant": "acme", "quota": QUOTA, "allocated": allocation()}
    assert api.fleet.vm_ids() == set()


# -- concurrency and the fleet's deadline, under virtual time -----------------------------------


async def test_destroy_while_destroying_conflicts(
    clocked: Clocked, mock_clock: trio.testing.MockClock
) -> None:
    api, clock = clocked.api, mock_clock
    assert clocked.clock is mock_clock  # the test itself must ask for it to be used
    acme = await api.provision("acme")
    vm = await spawned(api, acme)
    api.fleet.knobs.latency = 0.25
    calls = api.fleet.calls
    first: list[Response] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, first, lambda: destroy(api, acme, vm["id"]))
        await until(lambda: api.fleet.calls > calls)  # the destroy is at the fleet now
        await assert_problem(await destroy(api, acme, vm["id"]), 409, "conflict")
        during = await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth)
        assert (await during.get_json())["state"] == "destroying"
        assert (await usage(api, acme))["allocated"] == allocation(1, 256, 1)
        clock.jump(0.25)
    assert first[0].status_code == 200
    assert await first[0].get_json() == {"id": vm["id"], "state": "destroyed"}
    assert (await usage(api, acme))["allocated"] == allocation()
    assert entries_for(await api.audit(), vm["id"])[2:] == [
        ("vm.destroy", "requested"),
        ("vm.destroy", "succeeded"),
    ]


async def test_destroy_while_spawning_conflicts(
    clocked: Clocked, mock_clock: trio.testing.MockClock
) -> None:
    api, clock = clocked.api, mock_clock
    assert clocked.clock is mock_clock  # the test itself must ask for it to be used
    acme = await api.provision("acme")
    api.fleet.knobs.latency = 0.25
    first: list[Response] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, first, lambda: spawn(api, acme))
        await until(lambda: api.fleet.calls > 0)
        listing = await (await api.client.get("/v1/vms", headers=acme.auth)).get_json()
        [pending] = listing["vms"]
        assert pending["state"] == "spawning"
        assert (await usage(api, acme))["allocated"] == allocation(1, 256, 1)
        await assert_problem(await destroy(api, acme, pending["id"]), 409, "conflict")
        clock.jump(0.25)
    assert first[0].status_code == 201
    assert (await first[0].get_json())["id"] == pending["id"]
    assert api.fleet.vm_ids() == {pending["id"]}


async def test_concurrent_duplicate_idempotency_key_never_spawns_twice(
    clocked: Clocked, mock_clock: trio.testing.MockClock
) -> None:
    api, clock = clocked.api, mock_clock
    assert clocked.clock is mock_clock  # the test itself must ask for it to be used
    acme = await api.provision("acme")
    api.fleet.knobs.latency = 0.25
    key = {"Idempotency-Key": "once"}
    first: list[Response] = []
    second: list[Response] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, first, lambda: spawn(api, acme, key))
        await until(lambda: api.fleet.calls > 0)
        nursery.start_soon(collect, second, lambda: spawn(api, acme, key))
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(0.25)
    assert first[0].status_code == 201
    if second[0].status_code == 201:
        assert await second[0].get_data() == await first[0].get_data()
    else:
        await assert_problem(second[0], 409, "conflict")
    assert len(api.fleet.vm_ids()) == 1
    assert (await usage(api, acme))["allocated"] == allocation(1, 256, 1)


async def heal_fleet(api: Api, clock: trio.testing.MockClock) -> None:
    """Stop the fleet hanging, and move time on until the reconciler has its answer.

    The reconciler's pending call still hangs until the fleet client's deadline; then it
    backs off and asks again, and this time the fleet answers.
    """
    api.fleet.knobs.hang = False
    calls = api.fleet.calls
    for _ in range(20):
        await trio.testing.wait_all_tasks_blocked()
        if api.fleet.calls > calls:
            return
        clock.jump(0.5)
    raise AssertionError("the reconciler never asked the fleet again")


async def test_fleet_timeout_on_spawn_keeps_the_vm_counted_until_reconciled(
    clocked: Clocked, mock_clock: trio.testing.MockClock
) -> None:
    api, clock = clocked.api, mock_clock
    assert clocked.clock is mock_clock  # the test itself must ask for it to be used
    acme = await api.provision("acme", {"vcpus": 8, "memory_mib": 8192, "vms": 1})
    api.fleet.knobs.hang = True
    seq = api.service.audit.seq
    answer: list[Response] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, answer, lambda: spawn(api, acme, vcpus=2))
        await until(lambda: api.fleet.calls == 1)  # the spawn is hanging at the fleet
        clock.jump(0.5)  # the fleet client's deadline
    await assert_problem(answer[0], 503, "fleet_unavailable")

    [vm] = (await (await api.client.get("/v1/vms", headers=acme.auth)).get_json())["vms"]
    assert vm["state"] == "unknown"
    one = await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth)
    assert (await one.get_json())["state"] == "unknown"
    assert (await usage(api, acme))["allocated"] == allocation(2, 256, 1)
    await assert_problem(await spawn(api, acme), 403, "quota_exceeded")  # still counted
    await assert_problem(await destroy(api, acme, vm["id"]), 409, "conflict")
    assert entries_for(await api.audit(after=seq), vm["id"]) == [("vm.spawn", "requested")]

    settled = api.service.audit.seq + 1
    await heal_fleet(api, clock)
    await until(lambda: api.service.audit.seq >= settled)
    assert api.service.audit.seq == settled

    # The reconciler repeated the spawn (idempotent by id) and the fleet carried it out:
    # the VM exists, still counts, and the resolution is audited by the system.
    assert (await usage(api, acme))["allocated"] == allocation(2, 256, 1)
    now = await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth)
    assert (await now.get_json())["state"] in ("pending", "running")
    assert api.fleet.vm_ids() == {vm["id"]}
    last = (await api.audit(after=settled - 1))[0]
    assert (last["op"], last["outcome"], last["vm"], last["tenant"]) == (
        "vm.spawn",
        "succeeded",
        vm["id"],
        "acme",
    )
    assert last["source"] == {"ip": None, "token_id": "system"}
    await assert_problem(await spawn(api, acme), 403, "quota_exceeded")


async def test_fleet_timeout_on_destroy_is_reconciled_against_the_fleet(
    clocked: Clocked, mock_clock: trio.testing.MockClock
) -> None:
    api, clock = clocked.api, mock_clock
    assert clocked.clock is mock_clock  # the test itself must ask for it to be used
    acme = await api.provision("acme")
    vm = await spawned(api, acme)
    api.fleet.knobs.hang = True
    calls = api.fleet.calls
    answer: list[Response] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, answer, lambda: destroy(api, acme, vm["id"]))
        await until(lambda: api.fleet.calls == calls + 1)
        clock.jump(0.5)
    await assert_problem(answer[0], 503, "fleet_unavailable")
    assert (await usage(api, acme))["allocated"] == allocation(1, 256, 1)
    assert [
        v["state"]
        for v in (await (await api.client.get("/v1/vms", headers=acme.auth)).get_json())["vms"]
    ] == ["unknown"]

    settled = api.service.audit.seq + 1
    await heal_fleet(api, clock)
    await until(lambda: api.service.audit.seq >= settled)
    assert api.service.audit.seq == settled
    # The reconciler repeated the destroy (idempotent by id) and the fleet carried it
    # out: the VM is gone and its capacity released.
    listing = await (await api.client.get("/v1/vms", headers=acme.auth)).get_json()
    assert listing["vms"] == []
    assert (await usage(api, acme))["allocated"] == allocation()
    assert api.fleet.vm_ids() == set()
    assert entries_for(await api.audit(), vm["id"])[-2:] == [
        ("vm.destroy", "requested"),
        ("vm.destroy", "succeeded"),
    ]
    await assert_problem(await destroy(api, acme, vm["id"]), 404, "not_found")
