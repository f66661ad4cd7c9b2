"""Provisioning the proxy for a run through its admin API, and the data files for wrk.

Tenants get the largest quota the API accepts (2^31-1 in every dimension), so no
scenario ever meets ``quota_exceeded``. Each tenant gets pre-created VMs for the status
GETs. The data files hold one ``tenant token vm_id`` line per VM (see
``bench/common.lua``); the floor is driven from the same files (it ignores tokens).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

BIG = 2**31 - 1
QUOTA = {"vcpus": BIG, "memory_mib": BIG, "vms": BIG}
SPAWN = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
#: requests in flight while provisioning (group commit makes this much faster than 1)
PARALLEL = 16


@dataclass(frozen=True, slots=True)
class Entry:
    tenant: str
    token: str
    vm: str


def _check(response: httpx.Response, expected: int) -> dict[str, str]:
    if response.status_code != expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:300]}"
        )
    body: dict[str, str] = response.json()
    return body


def _tenant_with_vms(client: httpx.Client, admin: str, tenant: str, vms: int) -> list[Entry]:
    created = client.post(
        "/v1/admin/tenants",
        json={"id": tenant, "quota": QUOTA},
        headers={"Authorization": f"Bearer {admin}"},
    )
    token = _check(created, 201)["token"]
    auth = {"Authorization": f"Bearer {token}"}
    entries = []
    for _ in range(vms):
        vm = _check(client.post("/v1/vms", json=SPAWN, headers=auth), 201)["id"]
        entries.append(Entry(tenant, token, vm))
    return entries


def provision(url: str, admin_token: str, tenants: list[str], vms_each: int) -> list[Entry]:
    """Create ``tenants`` with ``vms_each`` VMs each; returns one entry per VM."""
    limits = httpx.Limits(max_connections=PARALLEL)
    with (
        httpx.Client(base_url=url, timeout=30.0, limits=limits) as client,
        ThreadPoolExecutor(PARALLEL) as pool,
    ):
        batches = pool.map(lambda t: _tenant_with_vms(client, admin_token, t, vms_each), tenants)
        return [entry for batch in batches for entry in batch]


def write_data_file(path: Path, entries: list[Entry]) -> Path:
    path.write_text("".join(f"{e.tenant} {e.token} {e.vm}\n" for e in entries))
    return path
