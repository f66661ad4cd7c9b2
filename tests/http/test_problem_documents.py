"""Problem documents as API.md v1.1 has them: ``Retry-After`` on every 503, ``dimension``
on every ``403 quota_exceeded`` (replays and restarts included), and an OpenAPI document
that says so.

Each 503 comes from a real cause: an fsync that fails with EIO (audit), a fleet address
where nothing listens (fleet), and ``/readyz`` while the audit log cannot be written.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from actors.journal.snapshot import snapshot_path
from actors.service import open_service
from conftest import Api, FlakyFsync, service_config
from server.app import create_app
from server.auth import Authority

SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
SMALL = {"vcpus": 2, "memory_mib": 1024, "vms": 1}


async def served_document(api: Api) -> dict[str, Any]:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = await response.get_json()
    return document


async def problem_schema(api: Api) -> jsonschema.Draft202012Validator:
    """The served document's Problem schema."""
    document = await served_document(api)
    return jsonschema.Draft202012Validator(document["components"]["schemas"]["Problem"])


async def problem(api: Api, response: Any, status: int, code: str) -> dict[str, Any]:
    body = await response.get_json()
    assert response.status_code == status, body
    assert response.mimetype == "application/problem+json"
    assert body["code"] == code
    (await problem_schema(api)).validate(body)
    return body


@asynccontextmanager
async def app_on(data_dir: Path, **config: Any) -> AsyncIterator[Api]:
    async with open_service(service_config(data_dir, **config)) as service:
        app = create_app(service, Authority.for_store(service.store))
        yield Api(app.test_client(), service, (data_dir / "admin.token").read_text().strip())


# -- Retry-After on every 503 ------------------------------------------------------------------


async def test_audit_unavailable_and_readyz_carry_retry_after(api: Api) -> None:
    token = (await api.provision("acme")).bearer
    failing = FlakyFsync()
    failing.failing = True
    api.service.audit._fsync = failing
    spawned = await api.spawn(token)
    await problem(api, spawned, 503, "audit_unavailable")
    assert spawned.headers["Retry-After"] == "1"

    ready = await api.client.get("/readyz")
    await problem(api, ready, 503, "audit_unavailable")
    assert ready.headers["Retry-After"] == "1"

    # a write that does not reach the fleet at all (a tenant operation) says the same
    created = await api.client.post(
        "/v1/admin/tenants", json={"id": "beta", "quota": SMALL}, headers=api.admin
    )
    await problem(api, created, 503, "audit_unavailable")
    assert created.headers["Retry-After"] == "1"


async def test_fleet_unavailable_carries_retry_after(data_dir: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with app_on(data_dir, fleet=f"http://127.0.0.1:{port}") as api:
        token = (await api.provision("acme")).bearer
        for _ in range(6):  # refused calls, then the open circuit: 503 both ways
            spawned = await api.spawn(token)
            await problem(api, spawned, 503, "fleet_unavailable")
            assert spawned.headers["Retry-After"] == "5"


# -- the quota dimension -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "dimension"),
    [
        ({"vcpus": 3}, "vcpus"),
        ({"memory_mib": 2048}, "memory_mib"),
        ({}, "vms"),  # the quota holds one VM, and one is already there
    ],
)
async def test_quota_exceeded_names_its_dimension_also_when_replayed(
    data_dir: Path, spec: dict[str, int], dimension: str
) -> None:
    key = {"Idempotency-Key": f"over-{dimension}"}
    async with app_on(data_dir) as api:
        token = (await api.provision("acme", SMALL)).bearer
        if dimension == "vms":
            assert (await api.spawn(token)).status_code == 201
        first = await api.client.post(
            "/v1/vms", json={**SPEC, **spec}, headers={"Authorization": token, **key}
        )
        body = await problem(api, first, 403, "quota_exceeded")
        assert body["dimension"] == dimension
        assert dimension in body["detail"]
        again = await api.client.post(
            "/v1/vms", json={**SPEC, **spec}, headers={"Authorization": token, **key}
        )
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await problem(api, again, 403, "quota_exceeded") == body

    # After a restart the answer comes from the snapshot, and with no snapshot from the
    # log itself: the same document every time.
    for drop_snapshot in (False, True):
        if drop_snapshot:
            shutil.rmtree(snapshot_path(data_dir).parent)
        async with app_on(data_dir) as api:
            replayed = await api.client.post(
                "/v1/vms", json={**SPEC, **spec}, headers={"Authorization": token, **key}
            )
            assert replayed.headers["Idempotent-Replayed"] == "true"
            assert await problem(api, replayed, 403, "quota_exceeded") == body


async def test_other_problems_have_no_dimension(api: Api) -> None:
    token = (await api.provision("acme")).bearer
    missing = await api.client.get("/v1/vms/vm-nope", headers={"Authorization": token})
    assert "dimension" not in await problem(api, missing, 404, "not_found")


# -- the OpenAPI document ----------------------------------------------------------------------


async def test_openapi_documents_retry_after_on_every_503_and_the_dimension(api: Api) -> None:
    document = await served_document(api)
    answers = [
        (path, method, status, response)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for status, response in operation["responses"].items()
    ]
    unavailable = [a for a in answers if a[2] == "503"]
    assert unavailable, "no operation documents a 503"
    for path, method, _, response in unavailable:
        assert "Retry-After" in response["headers"], (path, method)
    spawn = document["paths"]["/v1/vms"]["post"]["responses"]["403"]
    assert "quota_exceeded" in spawn["description"]

    validator = await problem_schema(api)
    base = {"type": "https://x.invalid/p", "title": "t", "status": 403, "detail": "d"}
    assert validator.is_valid({**base, "code": "quota_exceeded", "dimension": "vms"})
    assert not validator.is_valid({**base, "code": "quota_exceeded"})
    assert not validator.is_valid({**base, "code": "quota_exceeded", "dimension": "gpus"})
    assert not validator.is_valid({**base, "code": "forbidden", "dimension": "vms"})
