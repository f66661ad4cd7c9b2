"""Hostile and malformed requests: each one is refused with a 4xx problem and changes nothing.

A table of requests that a careless or malicious client could send: broken JSON, wrong
types, out-of-range values, bad headers, bad tokens, odd paths. For every one the server
must answer a problem document (never a 500), and neither the audit log, the tenant's
usage, its VMs, its quota nor the fleet may change. The only exception API.md makes is a
refused *authenticated write* naming a VM id the caller does not own: that is audited as
exactly one ``rejected`` entry, and still changes nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import QUOTA, Api

PROBLEM_MEMBERS = {"type", "title", "status", "detail", "code"}
SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
VALID_SPAWN = json.dumps(SPEC).encode()
LONG_ID = "v" * 8000


def spawn_body(**changes: Any) -> bytes:
    """A spawn body with some members replaced; a value of ``...`` drops the member."""
    body = {**SPEC, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def raw_spawn(vcpus: str) -> bytes:
    """A spawn body whose ``vcpus`` is the given JSON text, verbatim."""
    return b'{"vcpus": ' + vcpus.encode() + b', "memory_mib": 256, "image": "debian-12"}'


def tenant_body(tenant_id: Any = "newco", quota: Any = QUOTA, **extra: Any) -> bytes:
    return json.dumps({"id": tenant_id, "quota": quota, **extra}).encode()


def quota_body(**changes: Any) -> bytes:
    quota = {**QUOTA, **changes}
    return json.dumps({"quota": {k: v for k, v in quota.items() if v is not ...}}).encode()


@dataclass(frozen=True)
class Case:
    """One hostile request and the answer it must get.

    ``path`` may name ``{vm}`` (the tenant's VM); ``auth`` is ``tenant``, ``admin``,
    ``none`` or an ``Authorization`` value in which ``{token}`` and ``{admin}`` are
    replaced; ``audited_vm`` (which may name ``{vm}`` too) is set when the request is a
    refused authenticated write that API.md requires to be logged as ``rejected`` with
    that ``vm``.
    """

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    auth: str = "tenant"
    headers: tuple[tuple[str, str], ...] = ()
    status: int = 400
    code: str = "invalid_request"
    audited_vm: str | None = None


def spawn_case(body: bytes, **kwargs: Any) -> Case:
    return Case("POST", "/v1/vms", body, **kwargs)


def create_case(body: bytes, **kwargs: Any) -> Case:
    return Case("POST", "/v1/admin/tenants", body, auth="admin", **kwargs)


def patch_case(body: bytes) -> Case:
    return Case("PATCH", "/v1/admin/tenants/acme", body, auth="admin")


def get(path: str, **kwargs: Any) -> Case:
    return Case("GET", path, None, None, **kwargs)


def unauthorized(auth: str, method: str = "POST", path: str = "/v1/vms") -> Case:
    return Case(method, path, VALID_SPAWN, auth=auth, status=401, code="unauthorized")


CASES = [
    # -- bodies that are not JSON, or not the right JSON -------------------------------------
    pytest.param(spawn_case(b'{"vcpus": 1, "memory_mib": 256,'), id="truncated-json"),
    pytest.param(spawn_case(b'{"vcpus":1,"memory_mib":256,"image":"deb\xff\xfe"}'), id="bad-utf8"),
    pytest.param(
        spawn_case(b'{"vcpus":1,"memory_mib":256,"image":"\\ud800"}'), id="lone-surrogate"
    ),
    pytest.param(spawn_case(b"[" + VALID_SPAWN + b"]"), id="top-level-array"),
    pytest.param(spawn_case(b'"debian-12"'), id="top-level-string"),
    pytest.param(spawn_case(b""), id="empty-body"),
    pytest.param(spawn_case(VALID_SPAWN + b"xyz"), id="trailing-garbage"),
    pytest.param(spawn_case(b"[" * 20000 + b"]" * 20000), id="deep-nesting"),
    pytest.param(
        spawn_case(spawn_body(vcpus={"a": [1, {"b": None}], "c": "\u0000"})), id="nested-garbage"
    ),
    pytest.param(
        spawn_case(b'{"vcpus": 1, "memory_mib": 256, "image": "debian-12", "vcpus": 2}'),
        id="duplicate-member",
    ),
    # -- members: unknown, missing, wrong type, out of range ---------------------------------
    pytest.param(spawn_case(spawn_body(gpu=1)), id="unknown-field"),
    pytest.param(spawn_case(spawn_body(image=...)), id="missing-image"),
    pytest.param(spawn_case(raw_spawn("1.0")), id="vcpus-float"),
    pytest.param(spawn_case(raw_spawn('"1"')), id="vcpus-string"),
    pytest.param(spawn_case(raw_spawn("true")), id="vcpus-bool"),
    pytest.param(spawn_case(raw_spawn("-1")), id="vcpus-negative"),
    pytest.param(spawn_case(raw_spawn("0")), id="vcpus-zero"),
    pytest.param(spawn_case(raw_spawn(str(2**31))), id="vcpus-2^31"),
    pytest.param(spawn_case(spawn_body(image="")), id="image-empty"),
    pytest.param(spawn_case(spawn_body(image="i" * 257)), id="image-257"),
    pytest.param(spawn_case(spawn_body(image="deb\u0000ian")), id="image-nul"),
    pytest.param(spawn_case(spawn_body(name="n" * 64)), id="name-64"),
    pytest.param(spawn_case(spawn_body(name="")), id="name-empty"),
    pytest.param(spawn_case(spawn_body(name="web\n")), id="name-newline"),
    # -- headers ---------------------------------------------------------------------------------
    pytest.param(spawn_case(VALID_SPAWN, headers=(("Idempotency-Key", "k" * 256),)), id="key-256"),
    pytest.param(
        spawn_case(VALID_SPAWN, headers=(("Idempotency-Key", "cl\u00e9"),)), id="key-non-ascii"
    ),
    pytest.param(spawn_case(VALID_SPAWN, headers=(("Idempotency-Key", ""),)), id="key-empty"),
    pytest.param(
        spawn_case(
            VALID_SPAWN, content_type="text/plain", status=415, code="unsupported_media_type"
        ),
        id="content-type-text",
    ),
    pytest.param(
        spawn_case(VALID_SPAWN, content_type=None, status=415, code="unsupported_media_type"),
        id="content-type-missing",
    ),
    pytest.param(
        spawn_case(spawn_body(name="n" * (65 * 1024)), status=413, code="payload_too_large"),
        id="body-over-64k",
    ),
    pytest.param(
        create_case(tenant_body(padding="p" * (65 * 1024)), status=413, code="payload_too_large"),
        id="admin-body-over-64k",
    ),
    # -- query parameters -----------------------------------------------------------------------
    pytest.param(Case("POST", "/v1/vms?dry_run=1", VALID_SPAWN), id="spawn-unknown-param"),
    pytest.param(get("/v1/vms?limit=0"), id="limit-0"),
    pytest.param(get("/v1/vms?limit=1001"), id="limit-1001"),
    pytest.param(get("/v1/vms?limit=abc"), id="limit-abc"),
    pytest.param(get("/v1/vms?limit=-1"), id="limit-negative"),
    pytest.param(get("/v1/vms?limit=1&limit=2"), id="limit-twice"),
    pytest.param(get("/v1/vms?cursor=forged.cursor"), id="cursor-forged"),
    pytest.param(get("/v1/vms?sort=desc"), id="list-unknown-param"),
    pytest.param(get("/v1/admin/audit?after=-1", auth="admin"), id="audit-after-negative"),
    pytest.param(get("/v1/admin/audit?tenant=acme", auth="admin"), id="audit-unknown-param"),
    # -- admin bodies ----------------------------------------------------------------------------
    pytest.param(
        create_case(b'{"id": "new\xffco", "quota": {"vcpus": 1, "memory_mib": 1, "vms": 1}}'),
        id="admin-bad-utf8",
    ),
    pytest.param(create_case(tenant_body("Acme")), id="tenant-id-uppercase"),
    pytest.param(create_case(tenant_body("-acme")), id="tenant-id-leading-dash"),
    pytest.param(create_case(tenant_body("a" * 64)), id="tenant-id-64"),
    pytest.param(create_case(tenant_body("newco\n")), id="tenant-id-trailing-newline"),
    pytest.param(
        create_case(tenant_body(quota={"vcpus": 1, "memory_mib": 1})), id="quota-missing-dimension"
    ),
    pytest.param(create_case(tenant_body(quota={**QUOTA, "gpus": 1})), id="quota-extra-field"),
    pytest.param(create_case(tenant_body(quota={**QUOTA, "vms": -1})), id="quota-negative"),
    pytest.param(create_case(tenant_body(quota={**QUOTA, "vms": 2**31})), id="quota-2^31"),
    pytest.param(patch_case(quota_body(vms=...)), id="patch-missing-dimension"),
    pytest.param(patch_case(quota_body(gpus=2)), id="patch-extra-dimension"),
    pytest.param(
        patch_case(b'{"quota": {"vcpus": 1, "memory_mib": 1, "vms": 1, "vms": 1000}}'),
        id="patch-duplicate-nested-member",
    ),
    pytest.param(
        Case("POST", "/v1/admin/tenants/acme/tokens", b'{"ttl": 60}', auth="admin"),
        id="token-issue-unknown-field",
    ),
    # -- credentials ---------------------------------------------------------------------------
    pytest.param(unauthorized("none"), id="auth-missing"),
    pytest.param(unauthorized("Basic YWNtZTpzZWNyZXQ="), id="auth-basic"),
    pytest.param(unauthorized("{token}"), id="auth-no-scheme"),
    pytest.param(unauthorized("Bearer {token}x"), id="auth-tampered"),
    pytest.param(unauthorized("Bearer " + "A" * 8000), id="auth-very-long"),
    pytest.param(
        unauthorized("Bearer {admin}x", "GET", "/v1/admin/audit"), id="auth-admin-tampered"
    ),
    pytest.param(
        spawn_case(VALID_SPAWN, auth="admin", status=403, code="forbidden"), id="admin-spawns"
    ),
    pytest.param(
        Case("POST", "/v1/admin/tenants", tenant_body(), status=403, code="forbidden"),
        id="tenant-creates-tenant",
    ),
    pytest.param(
        Case("PATCH", "/v1/admin/tenants/acme", quota_body(vms=1000), status=403, code="forbidden"),
        id="tenant-raises-own-quota",
    ),
    # -- paths -----------------------------------------------------------------------------------
    pytest.param(get(f"/v1/vms/{LONG_ID}", status=404, code="not_found"), id="get-long-vm-id"),
    pytest.param(
        Case("DELETE", f"/v1/vms/{LONG_ID}", status=404, code="not_found", audited_vm=LONG_ID),
        id="delete-long-vm-id",
    ),
    pytest.param(
        get("/v1/vms/..%2F..%2Fv1%2Fadmin%2Faudit", status=404, code="not_found"),
        id="get-traversal",
    ),
    pytest.param(
        Case("DELETE", "/v1/vms/%2e%2e", status=404, code="not_found", audited_vm=".."),
        id="delete-dotdot",
    ),
    pytest.param(
        Case(
            "DELETE",
            "/v1/vms/x'%20OR%20'1'='1",
            status=404,
            code="not_found",
            audited_vm="x' OR '1'='1",
        ),
        id="delete-sql-injection",
    ),
    pytest.param(
        Case("DELETE", "/v1/vms/a%2Fb", status=404, code="not_found", audited_vm="a/b"),
        id="delete-encoded-slash",
    ),
    pytest.param(
        Case("DELETE", "/v1/vms/{vm}/x", status=404, code="not_found", audited_vm="{vm}/x"),
        id="delete-below-a-vm",
    ),
    pytest.param(get("/v1/vmz", status=404, code="not_found"), id="unknown-route"),
    # -- methods ---------------------------------------------------------------------------------
    pytest.param(
        Case("PUT", "/v1/vms", VALID_SPAWN, status=405, code="method_not_allowed"), id="put-vms"
    ),
    pytest.param(
        Case("POST", "/v1/vms/{vm}", VALID_SPAWN, status=405, code="method_not_allowed"),
        id="post-vm",
    ),
]


@dataclass(frozen=True)
class World:
    """A tenant ``acme`` with one running VM."""

    token: str
    token_id: str
    vm: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_world(api: Api) -> World:
    created = await api.client.post(
        "/v1/admin/tenants", json={"id": "acme", "quota": QUOTA}, headers=api.admin
    )
    assert created.status_code == 201
    body = await created.get_json()
    token = body["token"]
    spawned = await api.client.post(
        "/v1/vms", json=SPEC, headers={"Authorization": f"Bearer {token}"}
    )
    assert spawned.status_code == 201
    return World(token, body["token_id"], (await spawned.get_json())["id"])


async def observe(api: Api, world: World) -> dict[str, Any]:
    """Everything a hostile request must leave as it was."""
    usage = await api.client.get("/v1/usage", headers=world.auth)
    listing = await api.client.get("/v1/vms?limit=1000", headers=world.auth)
    tenant = await api.client.get("/v1/admin/tenants/acme", headers=api.admin)
    newco = await api.client.get("/v1/admin/tenants/newco", headers=api.admin)
    vm = await api.client.get(f"/v1/vms/{world.vm}", headers=world.auth)
    assert usage.status_code == listing.status_code == tenant.status_code == vm.status_code == 200
    return {
        "usage": await usage.get_json(),
        "vms": await listing.get_json(),
        "tenant": await tenant.get_json(),
        "newco": newco.status_code,
        "fleet": sorted(api.fleet.vm_ids()),
    }


def authorization(case: Case, world: World, api: Api) -> dict[str, str]:
    if case.auth == "none":
        return {}
    if case.auth == "tenant":
        return world.auth
    if case.auth == "admin":
        return api.admin
    return {"Authorization": case.auth.format(token=world.token, admin=api.admin_token)}


@pytest.mark.parametrize("case", CASES)
async def test_hostile_request_is_refused_and_changes_nothing(api: Api, case: Case) -> None:
    world = await make_world(api)
    before = await observe(api, world)
    seq, head = api.service.audit.seq, api.service.audit.head

    headers = {**authorization(case, world, api), **dict(case.headers)}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    path = case.path.replace("{vm}", world.vm)
    if case.body is None:
        response = await api.client.open(path, method=case.method, headers=headers)
    else:
        response = await api.client.open(path, method=case.method, headers=headers, data=case.body)

    raw = await response.get_data()
    assert response.status_code == case.status, raw[:500]
    assert 400 <= response.status_code < 500
    assert response.mimetype == "application/problem+json"
    assert response.headers.get("X-Request-Id")
    problem = json.loads(raw)
    assert set(problem) >= PROBLEM_MEMBERS, problem
    assert problem["status"] == case.status
    assert problem["code"] == case.code
    assert all(isinstance(problem[m], str) and problem[m] for m in ("type", "title", "detail"))
    if case.status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if case.status == 405:
        assert case.method not in response.headers["Allow"]

    assert await observe(api, world) == before
    entries = await api.audit(after=seq)
    if case.audited_vm is None:
        assert entries == []
        assert (api.service.audit.seq, api.service.audit.head) == (seq, head)
    else:
        assert len(entries) == 1, entries
        [entry] = entries
        # ids longer than 128 characters are logged cut, and marked so
        named = case.audited_vm.replace("{vm}", world.vm)
        logged = named[:128]
        assert (entry["op"], entry["outcome"], entry["tenant"], entry["vm"]) == (
            "vm.destroy",
            "rejected",
            "acme",
            logged,
        )
        assert entry["detail"].get("vm_id_truncated", False) == (logged != named)
        assert entry["source"]["token_id"] == world.token_id


def test_the_table_is_large_and_distinct() -> None:
    assert len(CASES) >= 25
    assert len({param.id for param in CASES}) == len(CASES)
