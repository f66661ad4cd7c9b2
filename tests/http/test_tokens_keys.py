"""Token lifetimes, signing-key rotation, tenant listing and deprovisioning, in-process.

The app runs over the real core and a real data dir through the Quart test client; the
token clock is injected (wall-clock seconds), so expiry needs no sleep. Restarts open the
service again on the same data dir.
"""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from quart import Response

from actors.service import open_service
from actors.store.file import KEYRING_FILE, LEGACY_KEY_FILE
from conftest import QUOTA, Api, service_config
from server.app import create_app
from server.auth import Authority
from server.keyring import rfc3339

START = 1_900_000_000.0
SPEC = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}


class FakeClock:
    """Wall-clock seconds that move only when a test moves them."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@asynccontextmanager
async def running(data_dir: Path, clock: FakeClock) -> AsyncIterator[Api]:
    """The service and app on ``data_dir``; leaving the block is a clean shutdown."""
    async with open_service(service_config(data_dir)) as service:
        app = create_app(service, Authority.for_store(service.store, clock=clock))
        admin = (data_dir / "admin.token").read_text().strip()
        yield Api(app.test_client(), service, admin)


@pytest.fixture
async def api(data_dir: Path, clock: FakeClock) -> AsyncIterator[Api]:
    async with running(data_dir, clock) as api:
        yield api


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def problem(response: Response, status: int, code: str) -> dict[str, Any]:
    raw = await response.get_data()
    assert response.status_code == status, raw
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = json.loads(raw)
    assert body["code"] == code and body["status"] == status
    return body


async def issue(api: Api, tenant: str, body: Any = None) -> dict[str, Any]:
    path = f"/v1/admin/tenants/{tenant}/tokens"
    if body is None:  # no body at all, as before lifetimes existed
        response = await api.client.post(path, headers=api.admin)
    else:
        response = await api.client.post(path, json=body, headers=api.admin)
    assert response.status_code == 201, await response.get_data()
    return await response.get_json()


async def usage_status(client: Any, token: str) -> int:
    return (await client.get("/v1/usage", headers=auth(token))).status_code


async def unauthorized_body(api: Api, token: str) -> bytes:
    response = await api.client.get("/v1/usage", headers=auth(token))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    return await response.get_data()


# -- token lifetimes ------------------------------------------------------------------------


async def test_tokens_expire_by_the_injected_wall_clock(api: Api, clock: FakeClock) -> None:
    first = (await api.provision("acme", token_ttl_seconds=60)).body
    assert first["expires_at"] == rfc3339(START + 60) == "2030-03-17T17:47:40Z"
    later = await issue(api, "acme", {"ttl_seconds": 120})
    assert later["expires_at"] == rfc3339(START + 120)
    forever = await issue(api, "acme")
    assert forever["expires_at"] is None

    for token in (first["token"], later["token"], forever["token"]):
        assert await usage_status(api.client, token) == 200
    forged = Authority("not-the-servers-key", "adm-x").issue("acme", first["token_id"])
    bad = await unauthorized_body(api, forged)

    clock.now = START + 59.999
    assert await usage_status(api.client, first["token"]) == 200
    clock.now = START + 60
    # An expired token reads exactly like any other bad token.
    assert await unauthorized_body(api, first["token"]) == bad
    assert await usage_status(api.client, later["token"]) == 200
    clock.now = START + 10 * 365 * 86400
    assert await unauthorized_body(api, later["token"]) == bad
    assert await usage_status(api.client, forever["token"]) == 200


async def test_expiry_is_recorded_in_the_audit_log_never_the_token(api: Api) -> None:
    first = (await api.provision("acme", token_ttl_seconds=300)).body
    plain = await issue(api, "acme")
    timed = await issue(api, "acme", {"ttl_seconds": 5})
    entries = await api.audit()
    by_op = {(e["op"], e["detail"].get("token_id")): e for e in entries}
    created = by_op[("tenant.create", first["token_id"])]
    assert created["detail"]["expires_at"] == first["expires_at"]
    # No lifetime: the entry is exactly as it always was.
    assert by_op[("token.issue", plain["token_id"])]["detail"] == {"token_id": plain["token_id"]}
    assert by_op[("token.issue", timed["token_id"])]["detail"] == {
        "token_id": timed["token_id"],
        "expires_at": timed["expires_at"],
    }
    raw = json.dumps(entries)
    for token in (first["token"], plain["token"], timed["token"]):
        assert token not in raw


@pytest.mark.parametrize("body", [None, {}, {"ttl_seconds": None}])
async def test_no_lifetime_keeps_the_token_issue_as_it_was(api: Api, body: Any) -> None:
    await api.provision("acme")
    token = await issue(api, "acme", body)
    assert token["expires_at"] is None
    assert await usage_status(api.client, token["token"]) == 200


BAD_TTLS = [0, -1, 2**31, 1.5, "60", True, [60], {"s": 1}]


@pytest.mark.parametrize("ttl", BAD_TTLS)
async def test_bad_lifetimes_are_400_and_change_nothing(api: Api, ttl: Any) -> None:
    await api.provision("acme")
    seq = api.service.audit.seq
    response = await api.client.post(
        "/v1/admin/tenants/acme/tokens", json={"ttl_seconds": ttl}, headers=api.admin
    )
    await problem(response, 400, "invalid_request")
    response = await api.client.post(
        "/v1/admin/tenants",
        json={"id": "other", "quota": QUOTA, "token_ttl_seconds": ttl},
        headers=api.admin,
    )
    await problem(response, 400, "invalid_request")
    assert api.service.audit.seq == seq


async def test_unknown_members_next_to_a_lifetime_are_400(api: Api) -> None:
    await api.provision("acme")
    seq = api.service.audit.seq
    for path, body in [
        ("/v1/admin/tenants/acme/tokens", {"ttl": 60}),
        ("/v1/admin/tenants/acme/tokens", {"ttl_seconds": 60, "extra": 1}),
        ("/v1/admin/tenants", {"id": "b", "quota": QUOTA, "ttl_seconds": 60}),
    ]:
        response = await api.client.post(path, json=body, headers=api.admin)
        await problem(response, 400, "invalid_request")
    assert api.service.audit.seq == seq


async def test_expiry_survives_a_restart(data_dir: Path, clock: FakeClock) -> None:
    async with running(data_dir, clock) as api:
        timed = (await api.provision("acme", token_ttl_seconds=100)).body
    async with running(data_dir, clock) as api:
        assert await usage_status(api.client, timed["token"]) == 200
        clock.now = START + 100
        assert await usage_status(api.client, timed["token"]) == 401


# -- signing keys ---------------------------------------------------------------------------


async def keys(api: Api) -> list[dict[str, Any]]:
    response = await api.client.get("/v1/admin/keys", headers=api.admin)
    assert response.status_code == 200
    return (await response.get_json())["keys"]


async def vm_cursor(api: Api, token: str) -> str:
    for _ in range(2):
        response = await api.client.post("/v1/vms", json=SPEC, headers=auth(token))
        assert response.status_code == 201
    page = await (await api.client.get("/v1/vms?limit=1", headers=auth(token))).get_json()
    assert page["next"] is not None
    return str(page["next"])


async def test_rotate_keeps_old_tokens_and_retire_refuses_them(
    data_dir: Path, clock: FakeClock
) -> None:
    keyring_path = data_dir / "keys" / KEYRING_FILE
    async with running(data_dir, clock) as api:
        (first_key,) = await keys(api)
        assert first_key["signing"] and first_key["state"] == "active"
        assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600
        old_secret = json.loads(keyring_path.read_text())["keys"][0]["secret"]
        old = (await api.provision("acme")).body
        cursor = await vm_cursor(api, old["token"])
        bad = await unauthorized_body(api, "not-a-token")

        clock.now += 5
        response = await api.client.post("/v1/admin/keys", headers=api.admin)
        assert response.status_code == 201
        new_key = await response.get_json()
        assert new_key["signing"] and new_key["id"] != first_key["id"]
        assert new_key["created_at"] == rfc3339(START + 5)
        listed = await keys(api)
        assert [k["id"] for k in listed] == [first_key["id"], new_key["id"]]
        assert [k["signing"] for k in listed] == [False, True]
        assert old_secret not in json.dumps(listed)

        # Rotation breaks nothing issued before it.
        assert await usage_status(api.client, old["token"]) == 200
        after_rotation = await api.client.get(
            f"/v1/vms?cursor={cursor}", headers=auth(old["token"])
        )
        assert after_rotation.status_code == 200
        new = await issue(api, "acme")
        assert await usage_status(api.client, new["token"]) == 200

        retire_current = await api.client.delete(
            f"/v1/admin/keys/{new_key['id']}", headers=api.admin
        )
        assert "rotate first" in (await problem(retire_current, 409, "conflict"))["detail"]
        unknown = await api.client.delete("/v1/admin/keys/key-nope", headers=api.admin)
        await problem(unknown, 404, "not_found")

        retired = await api.client.delete(f"/v1/admin/keys/{first_key['id']}", headers=api.admin)
        assert retired.status_code == 204
        assert await unauthorized_body(api, old["token"]) == bad
        stale = await api.client.get(f"/v1/vms?cursor={cursor}", headers=auth(new["token"]))
        await problem(stale, 400, "invalid_request")
        assert await usage_status(api.client, new["token"]) == 200
        again = await api.client.delete(f"/v1/admin/keys/{first_key['id']}", headers=api.admin)
        assert again.status_code == 204
        states = {k["id"]: k["state"] for k in await keys(api)}
        assert states == {first_key["id"]: "retired", new_key["id"]: "active"}
        # The retired secret is gone from the disk, not just unused.
        assert old_secret not in keyring_path.read_text()
        assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600

    async with running(data_dir, clock) as api:
        assert await usage_status(api.client, old["token"]) == 401
        assert await usage_status(api.client, new["token"]) == 200
        assert [k["state"] for k in await keys(api)] == ["retired", "active"]


async def test_key_endpoints_are_for_the_operator_only(api: Api) -> None:
    tenant = (await api.provision("acme")).body
    for method, path in [
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys"),
        ("DELETE", "/v1/admin/keys/key-x"),
    ]:
        response = await api.client.open(path, method=method, headers=auth(tenant["token"]))
        await problem(response, 403, "forbidden")
        response = await api.client.open(path, method=method)
        await problem(response, 401, "unauthorized")
    bad_body = await api.client.post("/v1/admin/keys", json={"id": "mine"}, headers=api.admin)
    await problem(bad_body, 400, "invalid_request")
    assert len(await keys(api)) == 1


async def test_a_legacy_single_key_becomes_the_first_key(data_dir: Path, clock: FakeClock) -> None:
    legacy_secret = "legacy-signing-secret-" + "x" * 40
    keys_dir = data_dir / "keys"
    keys_dir.mkdir(parents=True)
    (keys_dir / LEGACY_KEY_FILE).write_text(legacy_secret + "\n")
    legacy = Authority(legacy_secret, "adm-x")
    async with running(data_dir, clock) as api:
        assert not (keys_dir / LEGACY_KEY_FILE).exists()
        created = (await api.provision("acme")).body
        # What the server signed before the keyring existed still works.
        before = legacy.issue("acme", created["token_id"])
        assert await usage_status(api.client, before) == 200
        assert legacy.issue("acme", created["token_id"]) == created["token"]
        (key,) = await keys(api)
        await api.client.post("/v1/admin/keys", headers=api.admin)
        response = await api.client.delete(f"/v1/admin/keys/{key['id']}", headers=api.admin)
        assert response.status_code == 204
        assert await usage_status(api.client, before) == 401
    assert legacy_secret not in (keys_dir / KEYRING_FILE).read_text()


# -- tenant listing -------------------------------------------------------------------------


async def list_page(api: Api, query: str = "") -> Response:
    return await api.client.get(f"/v1/admin/tenants{query}", headers=api.admin)


async def test_tenants_are_listed_by_id_in_signed_pages(api: Api) -> None:
    tokens = {}
    for tenant in ["delta", "alpha", "echo", "bravo", "charlie"]:
        tokens[tenant] = ((await api.provision(tenant)).body)["token"]
    response = await api.client.post("/v1/vms", json=SPEC, headers=auth(tokens["charlie"]))
    assert response.status_code == 201

    seen: list[str] = []
    pages = 0
    query = "?limit=2"
    while True:
        response = await list_page(api, query)
        assert response.status_code == 200
        body = await response.get_json()
        assert set(body) == {"tenants", "next"}
        seen += [tenant["id"] for tenant in body["tenants"]]
        pages += 1
        if body["next"] is None:
            break
        query = f"?limit=2&cursor={body['next']}"
    assert seen == ["alpha", "bravo", "charlie", "delta", "echo"]
    assert pages == 3

    everything = await (await list_page(api)).get_json()
    assert everything["next"] is None
    charlie = next(t for t in everything["tenants"] if t["id"] == "charlie")
    assert charlie == {
        "id": "charlie",
        "quota": QUOTA,
        "allocated": {"vcpus": 1, "memory_mib": 256, "vms": 1},
    }


async def test_a_cursor_continues_after_a_deleted_tenant(api: Api) -> None:
    for tenant in ["a", "b", "c"]:
        await api.provision(tenant)
    first = await (await list_page(api, "?limit=2")).get_json()
    assert [t["id"] for t in first["tenants"]] == ["a", "b"]
    assert (await api.client.delete("/v1/admin/tenants/b", headers=api.admin)).status_code == 204
    rest = await (await list_page(api, f"?cursor={first['next']}")).get_json()
    assert [t["id"] for t in rest["tenants"]] == ["c"]


async def test_bad_tenant_list_queries_are_400(api: Api) -> None:
    acme = (await api.provision("acme")).body
    vm_list_cursor = await vm_cursor(api, acme["token"])
    foreign = Authority("another-key", "adm-x").cursor(":tenants", "acme")
    for query in [
        "?limit=0",
        "?limit=1001",
        "?limit=x",
        "?limit=1&limit=2",
        "?cursor=garbage",
        f"?cursor={vm_list_cursor}",
        f"?cursor={foreign}",
        "?after=acme",
    ]:
        await problem(await list_page(api, query), 400, "invalid_request")
    # ...and a tenant-list cursor does not page VMs either.
    await api.provision("beta")
    tenant_cursor = (await (await list_page(api, "?limit=1")).get_json())["next"]
    response = await api.client.get(f"/v1/vms?cursor={tenant_cursor}", headers=auth(acme["token"]))
    await problem(response, 400, "invalid_request")
    forbidden = await api.client.get("/v1/admin/tenants", headers=auth(acme["token"]))
    await problem(forbidden, 403, "forbidden")


# -- deprovisioning -------------------------------------------------------------------------


async def test_deleting_a_tenant_revokes_its_tokens_for_good(
    data_dir: Path, clock: FakeClock
) -> None:
    async with running(data_dir, clock) as api:
        first = (await api.provision("acme")).body
        second = await issue(api, "acme", {"ttl_seconds": 3600})
        revoked = await issue(api, "acme")
        response = await api.client.delete(
            f"/v1/admin/tenants/acme/tokens/{revoked['token_id']}", headers=api.admin
        )
        assert response.status_code == 204
        response = await api.client.delete("/v1/admin/tenants/acme", headers=api.admin)
        assert response.status_code == 204
        entry = (await api.audit())[-1]
        assert (entry["op"], entry["outcome"], entry["tenant"]) == (
            "tenant.delete",
            "succeeded",
            "acme",
        )
        assert entry["detail"] == {
            "revoked_token_ids": sorted([first["token_id"], second["token_id"]])
        }
        old_tokens = [first["token"], second["token"], revoked["token"]]
        for token in old_tokens:
            assert await usage_status(api.client, token) == 401

        again = (await api.provision("acme")).body
        for token in old_tokens:
            assert await usage_status(api.client, token) == 401
        assert await usage_status(api.client, again["token"]) == 200

    async with running(data_dir, clock) as api:
        for token in old_tokens:
            assert await usage_status(api.client, token) == 401
        assert await usage_status(api.client, again["token"]) == 200


# -- the document ---------------------------------------------------------------------------


async def test_openapi_describes_the_new_endpoints_and_members(api: Api) -> None:
    doc = await (await api.client.get("/openapi.json")).get_json()
    paths = doc["paths"]
    assert set(paths["/v1/admin/tenants"]["get"]["responses"]) >= {"200", "400", "401", "403"}
    assert set(paths["/v1/admin/keys"]["get"]["responses"]) >= {"200", "401", "403"}
    assert set(paths["/v1/admin/keys"]["post"]["responses"]) >= {"201", "400", "401", "403"}
    retire = paths["/v1/admin/keys/{key_id}"]["delete"]["responses"]
    assert set(retire) >= {"204", "401", "403", "404", "409"}
    issue_op = paths["/v1/admin/tenants/{id}/tokens"]["post"]
    assert issue_op["requestBody"]["required"] is False
    assert set(issue_op["responses"]) >= {"201", "400", "404", "413", "415", "503"}
    schemas = doc["components"]["schemas"]
    assert "ttl_seconds" in schemas["IssueTokenBody"]["properties"]
    assert "token_ttl_seconds" in schemas["CreateTenantBody"]["properties"]
    assert "expires_at" in schemas["Token"]["properties"]
    assert "expires_at" in schemas["CreatedTenant"]["properties"]
