"""Every response the document describes is one the server gives, and validates against it.

One session drives every operation of ``/openapi.json`` into every status the document
lists for it (success and each problem status), through the real app over a real core.
Each answer must be documented for its operation, carry the documented headers, and
validate against the documented schema (``jsonschema``, Draft 2020-12, the schema's
``$ref``\\ s resolved in the document). At the end, every documented (operation, status)
must have been seen: a status the document lists that nothing here produces fails too.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio
import trio.testing

from actors.fleet.embedded import EmbeddedFleet
from actors.journal.tiles import TileLog
from actors.service import Service, open_service
from actors.tenants.protocol import Reopen, Retire
from conftest import service_config
from server.app import create_app

SPEC = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
QUOTA = {"vcpus": 4, "memory_mib": 4096, "vms": 2}


@dataclass
class Session:
    """The app's test client, recording what each documented operation answered."""

    client: Any
    service: Service
    doc: dict[str, Any]
    admin: dict[str, str]
    seen: set[tuple[str, str]] = field(default_factory=set)
    #: operations that answered with an Audit-Seq header
    receipts: set[str] = field(default_factory=set)

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
        for template, item in self.doc["paths"].items():
            pattern = re.sub(r"\{[^}]+\}", "[^/]+", template)
            if re.fullmatch(pattern, path) and method.lower() in item:
                return template, item[method.lower()]
        raise AssertionError(f"{method} {path} is not in the document")

    async def call(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await self.client.open(url, method=method, **kwargs)
        path = url.partition("?")[0]
        template, operation = self.operation(method, path)
        status = str(response.status_code)
        where = f"{method} {template} {status}"
        documented = operation["responses"].get(status)
        assert documented is not None, f"undocumented answer: {where}"
        for name, header in documented.get("headers", {}).items():
            if header.get("required"):
                assert name in response.headers, f"{where} lacks {name}"
        if "Audit-Seq" in response.headers:
            assert "Audit-Seq" in documented.get("headers", {}), f"{where}: Audit-Seq undocumented"
            self.receipts.add(operation["operationId"])
        data = await response.get_data()
        if "content" in documented:
            (media, content), *_ = documented["content"].items()
            assert response.mimetype == media, where
            schema = {**content["schema"], "components": self.doc["components"]}
            value = data.decode() if media == "text/plain" else json.loads(data)
            jsonschema.Draft202012Validator(schema).validate(value)
        else:
            assert data == b"", f"{where} has a body the document does not describe"
        self.seen.add((operation["operationId"], status))
        return response

    def documented(self) -> set[tuple[str, str]]:
        return {
            (operation["operationId"], status)
            for item in self.doc["paths"].values()
            for operation in item.values()
            for status in operation["responses"]
        }


@pytest.fixture
async def session(data_dir: Path) -> AsyncIterator[Session]:
    # A bucket that never refills in the session's (virtual) time: once its burst is
    # spent, every tenant request is over the limit.
    config = service_config(
        data_dir, inline_io=True, fleet_timeout=1.0, rate_limit=0.001, rate_burst=BURST,
        max_inflight_spawns=0,
    )  # fmt: skip
    async with open_service(config) as service:
        client = create_app(service).test_client()
        doc = await (await client.get("/openapi.json")).get_json()
        admin = {"Authorization": f"Bearer {(data_dir / 'admin.token').read_text().strip()}"}
        yield Session(client, service, doc, admin)


BURST = 500
#: one path per operation, with ``acme`` and placeholder ids
EVERY = [
    ("POST", "/v1/vms"), ("GET", "/v1/vms"), ("GET", "/v1/vms/vm-x"), ("DELETE", "/v1/vms/vm-x"),
    ("GET", "/v1/usage"), ("POST", "/v1/admin/tenants"), ("GET", "/v1/admin/tenants"),
    ("GET", "/v1/admin/tenants/acme"), ("PATCH", "/v1/admin/tenants/acme"),
    ("DELETE", "/v1/admin/tenants/acme"), ("POST", "/v1/admin/tenants/acme/tokens"),
    ("DELETE", "/v1/admin/tenants/acme/tokens/tok-x"), ("GET", "/v1/admin/keys"),
    ("POST", "/v1/admin/keys"), ("DELETE", "/v1/admin/keys/key-x"), ("GET", "/v1/admin/audit"),
    ("GET", "/v1/admin/audit/head"), ("GET", "/v1/audit"), ("GET", "/v1/audit/checkpoint"),
    ("GET", "/v1/audit/key"), ("GET", "/v1/audit/proof?seq=1"),
    ("GET", "/v1/audit/consistency?from=1"),
]  # fmt: skip
TENANT_PATHS = {"/v1/vms", "/v1/vms/vm-x", "/v1/usage", "/v1/audit"}
#: a tenant token or the admin token (the Merkle log's public reads)
EITHER_PATHS = {"/v1/audit/checkpoint", "/v1/audit/key", "/v1/audit/proof", "/v1/audit/consistency"}
BODY_TAKERS = [
    ("POST", "/v1/vms"), ("POST", "/v1/admin/tenants"), ("PATCH", "/v1/admin/tenants/acme"),
    ("POST", "/v1/admin/tenants/acme/tokens"), ("POST", "/v1/admin/keys"),
]  # fmt: skip


def no_space(tiles: TileLog, leaves: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fleet(session: Session) -> EmbeddedFleet:
    driver = session.service.fleet.driver
    assert isinstance(driver, EmbeddedFleet)
    return driver


async def keys(s: Session) -> list[dict[str, Any]]:
    listed = await (await s.client.get("/v1/admin/keys", headers=s.admin)).get_json()
    keys: list[dict[str, Any]] = listed["keys"]
    return keys


async def test_every_documented_response_is_given_and_validates(
    autojump_clock: trio.testing.MockClock,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    s, admin = session, session.admin

    await s.call("GET", "/v1/admin/audit/head", headers=admin)  # 404: nothing to sign yet

    # 2xx: provisioning, the tenant's happy path, tokens, keys, the audit log, operations
    body = {"id": "acme", "quota": QUOTA}
    created = await (await s.call("POST", "/v1/admin/tenants", json=body, headers=admin)).get_json()
    await s.client.post("/v1/admin/tenants", json={**body, "id": "gamma"}, headers=admin)
    user = {"Authorization": f"Bearer {created['token']}"}
    vm = await (await s.call("POST", "/v1/vms", json=SPEC, headers=user)).get_json()
    await s.call("GET", "/v1/vms?limit=1", headers=user)
    await s.call("GET", f"/v1/vms/{vm['id']}", headers=user)
    await s.call("GET", "/v1/usage", headers=user)
    await s.call("GET", "/v1/admin/tenants", headers=admin)
    await s.call("GET", "/v1/admin/tenants/acme", headers=admin)
    await s.call("PATCH", "/v1/admin/tenants/acme", json={"quota": QUOTA}, headers=admin)
    issued = await s.call("POST", "/v1/admin/tenants/acme/tokens", headers=admin)
    token_id = (await issued.get_json())["token_id"]
    await s.call("DELETE", f"/v1/admin/tenants/acme/tokens/{token_id}", headers=admin)
    await s.call("GET", "/v1/admin/keys", headers=admin)
    rotated = await (await s.call("POST", "/v1/admin/keys", headers=admin)).get_json()
    await s.client.post("/v1/admin/keys", headers=admin)  # (the first key signed `user`)
    await s.call("DELETE", f"/v1/admin/keys/{rotated['id']}", headers=admin)
    await s.call("GET", "/v1/admin/audit?limit=5", headers=admin)
    await s.call("GET", "/v1/admin/audit/head", headers=admin)
    # the Merkle log: anyone's reads, and the tenant's own trail
    await s.call("GET", "/v1/audit/checkpoint", headers=user)
    await s.call("GET", "/v1/audit/key", headers=admin)
    await s.call("GET", "/v1/audit/proof?seq=1", headers=user)  # acme's own creation
    await s.call("GET", "/v1/audit/consistency?from=1&to=3", headers=admin)
    await s.call("GET", "/v1/audit?limit=2", headers=user)
    await s.call("GET", "/healthz")
    await s.call("GET", "/readyz")
    # 503: the tree fell behind the log (a tile could not be written) ...
    with monkeypatch.context() as patched:
        patched.setattr(TileLog, "append", no_space)
        await s.client.patch("/v1/admin/tenants/acme", json={"quota": QUOTA}, headers=admin)
        for path in ("/v1/audit/checkpoint", "/v1/audit/proof?seq=1", "/v1/admin/audit/head",
                     "/v1/audit/consistency?from=1"):  # fmt: skip
            await s.call("GET", path, headers=admin)
    # ... and the tenants' trail index is not rebuilt yet after a start
    assert s.service.file_store is not None
    s.service.file_store.trails.ready = False
    await s.call("GET", "/v1/audit", headers=user)
    s.service.file_store.trails.ready = True
    await s.client.post("/v1/admin/tenants", json={**body, "id": "delta"}, headers=admin)
    await s.call("DELETE", "/v1/admin/tenants/delta", headers=admin)

    # 400 (an unknown query parameter), 401 (no token), 403 (the other kind of token)
    for method, path in EVERY:
        own, other = (user, admin) if path in TENANT_PATHS else (admin, user)
        joiner = "&" if "?" in path else "?"
        await s.call(method, f"{path}{joiner}unknown=1", headers=own)
        await s.call(method, path)
        await s.call(method, path, headers=other)
    # 413 and 415 where a body is taken
    for method, path in BODY_TAKERS:
        own = user if path in TENANT_PATHS else admin
        json_type = {**own, "Content-Type": "application/json"}
        await s.call(method, path, data=b"{" * (65 * 1024), headers=json_type)
        await s.call(method, path, data=b"{}", headers={**own, "Content-Type": "text/plain"})

    # 404
    await s.call("GET", "/v1/audit/proof?seq=2", headers=user)  # gamma's creation
    await s.call("GET", "/v1/vms/vm-none", headers=user)
    await s.call("DELETE", "/v1/vms/vm-none", headers=user)
    await s.call("GET", "/v1/admin/tenants/nobody", headers=admin)
    await s.call("PATCH", "/v1/admin/tenants/nobody", json={"quota": QUOTA}, headers=admin)
    await s.call("DELETE", "/v1/admin/tenants/nobody", headers=admin)
    await s.call("POST", "/v1/admin/tenants/nobody/tokens", headers=admin)
    await s.call("DELETE", "/v1/admin/tenants/acme/tokens/tok-none", headers=admin)
    await s.call("DELETE", "/v1/admin/keys/key-none", headers=admin)

    # 409
    await s.call("POST", "/v1/admin/tenants", json=body, headers=admin)  # the id is taken
    keyed = {**user, "Idempotency-Key": "k"}
    await s.call("POST", "/v1/vms", json=SPEC, headers=keyed)
    await s.call("POST", "/v1/vms", json={**SPEC, "vcpus": 2}, headers=keyed)  # another body
    await s.call("DELETE", "/v1/admin/tenants/acme", headers=admin)  # it still has VMs
    signing = (await keys(s))[-1]
    await s.call("DELETE", f"/v1/admin/keys/{signing['id']}", headers=admin)  # rotate first
    await s.service.registry.call("gamma", Retire)  # a deletion under way ...
    await s.call("PATCH", "/v1/admin/tenants/gamma", json={"quota": QUOTA}, headers=admin)
    s.service.registry.actor("gamma").inbox.send_nowait(Reopen())  # ... taken back

    # 403 quota_exceeded (two VMs of two), then room, and the fleet's 502 and 503
    await s.call("POST", "/v1/vms", json=SPEC, headers=user)
    roomy = {"quota": {**QUOTA, "vms": 8}}
    await s.client.patch("/v1/admin/tenants/acme", json=roomy, headers=admin)
    fleet(s).knobs.fail_next = 1
    await s.call("POST", "/v1/vms", json=SPEC, headers=user)
    spare = await (await s.call("POST", "/v1/vms", json=SPEC, headers=user)).get_json()
    fleet(s).knobs.fail_next = 1
    await s.call("DELETE", f"/v1/vms/{spare['id']}", headers=user)
    await s.call("DELETE", f"/v1/vms/{spare['id']}", headers=user)
    fleet(s).knobs.hang = True
    await s.call("POST", "/v1/vms", json=SPEC, headers=user)  # the fleet's answer is lost
    await s.call("DELETE", f"/v1/vms/{vm['id']}", headers=user)  # ... this one's too
    fleet(s).knobs.hang = False
    await s.call("DELETE", f"/v1/vms/{vm['id']}", headers=user)  # 409: being reconciled

    # 429: the tenant's own rate (its bucket does not refill here) ...
    while (await s.client.get("/v1/usage", headers=user)).status_code != 429:
        pass
    for method, path in EVERY:
        if path in TENANT_PATHS or path.partition("?")[0] in EITHER_PATHS:
            await s.call(method, path, headers=user)
    # ... and a tenant actor that cannot take a message now (a core whose mailboxes hold
    # none: a message finds the tenant's fresh actor not yet waiting)
    config = service_config(tmp_path / "busy", inline_io=True, mailbox_size=0)
    async with open_service(config) as busy:
        main_client, s.client = s.client, create_app(busy).test_client()
        token = (tmp_path / "busy" / "admin.token").read_text().strip()
        busy_admin = {"Authorization": f"Bearer {token}"}
        for tenant in ("t1", "t2"):
            await s.client.post(
                "/v1/admin/tenants", json={**body, "id": tenant}, headers=busy_admin
            )
        await s.call("PATCH", "/v1/admin/tenants/t1", json={"quota": QUOTA}, headers=busy_admin)
        await s.call("DELETE", "/v1/admin/tenants/t2", headers=busy_admin)
        s.client = main_client

    # 500: the keyring cannot be written
    def broken(keys: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(s.service.store.token_keys, "save", broken)
    await s.call("POST", "/v1/admin/keys", headers=admin)
    older = next(k for k in await keys(s) if k["state"] == "active" and not k["signing"])
    await s.call("DELETE", f"/v1/admin/keys/{older['id']}", headers=admin)

    # 503: the journal refuses writes; every write says so, and so does /readyz
    s.service.audit.mark_damaged("test")
    await s.call("GET", "/readyz")
    await s.call("POST", "/v1/admin/tenants", json={**body, "id": "beta"}, headers=admin)
    await s.call("PATCH", "/v1/admin/tenants/gamma", json={"quota": QUOTA}, headers=admin)
    await s.call("POST", "/v1/admin/tenants/gamma/tokens", headers=admin)
    gamma_token = next(iter(s.service.store.directory.tokens("gamma")))
    await s.call("DELETE", f"/v1/admin/tenants/gamma/tokens/{gamma_token}", headers=admin)
    await s.call("DELETE", "/v1/admin/tenants/gamma", headers=admin)

    missing = sorted(s.documented() - s.seen)
    assert not missing, f"documented but never given: {missing}"
    # every operation that appends entries named them at least once
    writes = {"spawnVm", "destroyVm", "createTenant", "updateTenant", "deleteTenant",
              "issueToken", "revokeToken"}  # fmt: skip
    assert s.receipts == writes


async def test_every_operation_has_a_unique_id_and_a_tag(session: Session) -> None:
    operations = [op for item in session.doc["paths"].values() for op in item.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)) == len(operations)
    declared = {tag["name"] for tag in session.doc["tags"]}
    for op in operations:
        assert op["tags"] and set(op["tags"]) <= declared, op["operationId"]
