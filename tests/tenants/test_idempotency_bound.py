"""Idempotency records are bounded: refusals by count per tenant, everything by 24 hours.

Driven through the real actors and the real store (a spawn is a message to the tenant's
actor, its entry goes through the audit writer to disk), then through a restart, which
must rebuild exactly the records the running service kept: one fold.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from actors.errors import QuotaExceeded
from actors.journal import fold
from actors.service import Service, open_service
from actors.state import REFUSED, ProxyState, Quota, TenantState, VmSpec
from actors.tenants.protocol import Destroy, Replay, Source, Spawn
from conftest import UNLIMITED, LiveServer, Provision, audit_lines, bearer, service_config

ADMIN = Source("127.0.0.1", "admin")
USER = Source("127.0.0.1", "tok-user")
SPEC = VmSpec(1, 256, "debian-12", None)
HASH = "h" * 64


async def spawn(service: Service, key: str | None) -> Any:
    """The actor's answer to a spawn with ``key``: a VM, a Replay, or the error raised."""
    try:
        return await service.registry.call(
            "acme", lambda reply: Spawn(SPEC, key, HASH, USER, f"req-{key}", reply)
        )
    except QuotaExceeded as refused:
        return refused


def keyed_entries(data_dir: Path, key: str) -> list[str]:
    return [
        entry["outcome"]
        for entry in map(json.loads, audit_lines(data_dir))
        if entry["detail"].get("idempotency_key") == key
    ]


def records(service: Service) -> dict[str, Any]:
    tenant = service.file_store.state.tenants["acme"]  # type: ignore[union-attr]
    return dict(tenant.idempotency)


async def test_refusal_records_are_bounded_and_a_201_is_never_spawned_again(
    data_dir: Path,
) -> None:
    extra = 20
    config = service_config(data_dir)
    async with open_service(config) as service:
        await service.registry.create_tenant("acme", Quota(1, 256, 1), ADMIN, "r")
        first = await spawn(service, "the-vm")
        assert first.state in ("pending", "running")

        # A full tenant retrying with fresh keys: every refusal is kept, up to the bound.
        keys = [f"refused-{n:04}" for n in range(fold.MAX_REFUSALS + extra)]
        for start in range(0, len(keys), 200):  # within the mailbox of 256
            async with trio.open_nursery() as nursery:
                for key in keys[start : start + 200]:
                    nursery.start_soon(spawn, service, key)
        kept = records(service)
        refusals = [key for key, record in kept.items() if record.status == REFUSED]
        in_chain_order = [
            entry["detail"]["idempotency_key"]
            for entry in map(json.loads, audit_lines(data_dir))
            if entry["outcome"] == "rejected"
        ]
        assert sorted(in_chain_order) == keys
        assert refusals == in_chain_order[extra:], "the newest refusals, oldest first"
        keys = in_chain_order
        assert kept["the-vm"].status == 201, "a success is not evicted by refusals"

        # The 201 replays, however many refusals came after it: no second spawn.
        calls = service.fleet.driver.calls  # type: ignore[attr-defined]
        again = await spawn(service, "the-vm")
        assert isinstance(again, Replay) and again.status == 201
        assert again.body == msgspec.to_builtins(first)
        assert service.fleet.driver.calls == calls  # type: ignore[attr-defined]
        assert keyed_entries(data_dir, "the-vm") == ["requested", "succeeded"]

        # A recent refusal replays; an evicted one is decided afresh (refused again, audited).
        recent = await spawn(service, keys[-1])
        assert isinstance(recent, Replay) and recent.status == REFUSED
        assert keyed_entries(data_dir, keys[-1]) == ["rejected"]
        evicted = await spawn(service, keys[0])
        assert isinstance(evicted, QuotaExceeded)
        assert keyed_entries(data_dir, keys[0]) == ["rejected", "rejected"]

        # With capacity free again, an evicted refusal's key spawns (documented).
        await service.registry.call("acme", lambda reply: Destroy(first.id, USER, "r", reply))
        spawned = await spawn(service, keys[1])
        assert spawned.state in ("pending", "running")
        live = records(service)
        assert sum(r.status == REFUSED for r in live.values()) == fold.MAX_REFUSALS
    async with open_service(config) as service:
        assert records(service) == live, "a replay keeps exactly the same records"


T0 = "2026-11-27T10:00:00.000000Z"


def at(hours: float) -> str:
    moment = fold.dt.datetime.fromisoformat(T0) + fold.dt.timedelta(hours=hours)
    return fold._stamp(moment)


def entry(outcome: str, key: str, ts: str, vm: str | None = None) -> dict[str, Any]:
    detail: dict[str, Any] = {"idempotency_key": key, "request_hash": HASH}
    if outcome == "requested":
        detail |= {"spec": {"vcpus": 1, "memory_mib": 1, "image": "i", "name": None}}
        detail["created_at"] = ts
    elif outcome == "succeeded":
        detail = {"idempotency_key": key, "state": "pending"}
    elif outcome == "rejected":
        detail |= {"reason": "quota_exceeded", "problem": {"code": "quota_exceeded"}}
    return {"ts": ts, "op": "vm.spawn", "outcome": outcome, "tenant": "acme", "vm": vm,
            "source": USER.to_json(), "request_id": "r", "detail": detail}  # fmt: skip


@pytest.fixture
def state() -> ProxyState:
    state = ProxyState()
    state.add_tenant(TenantState("acme", Quota(100, 100_000, 100)), {"tok-user"})
    return state


def test_records_expire_24_hours_after_by_the_entries_own_time(state: ProxyState) -> None:
    for item in (
        entry("requested", "done", T0, "vm-1"),
        entry("succeeded", "done", at(0.1), "vm-1"),
        entry("rejected", "refused", T0),
        entry("requested", "in-doubt", T0, "vm-2"),  # its spawn never settles
    ):
        fold.apply(state, item)
    tenant = state.tenants["acme"]
    fold.apply(state, entry("rejected", "a", at(24.5)))
    assert list(tenant.idempotency) == ["done", "refused", "in-doubt", "a"], (
        "expired, but swept only once the oldest is an hour past its 24 hours"
    )
    fold.apply(state, entry("rejected", "b", at(25.1)))
    assert list(tenant.idempotency) == ["a", "b", "in-doubt"], (
        "the settled ones are gone; the spawn in flight is kept, behind the others"
    )
    fold.apply(state, entry("rejected", "c", at(25.2)))
    assert list(tenant.idempotency) == ["a", "b", "in-doubt", "c"], "no sweep on every entry"


# -- a real server ------------------------------------------------------------------------------


async def test_a_real_server_keeps_a_full_tenants_newest_refusals_only(
    tmp_path: Path, provision: Provision
) -> None:
    """A full tenant retrying with fresh keys: the oldest records go, also after a restart."""
    server = LiveServer(tmp_path / "data", env=UNLIMITED).start()
    body = {"vcpus": 1, "memory_mib": 64, "image": "debian-12"}
    try:
        async with server.client() as client:
            admin = bearer(server.admin_token)
            tenant = await provision(client, admin, "full", {"vcpus": 0, "memory_mib": 0, "vms": 0})
            keys = iter(f"key-{n:04}" for n in range(fold.MAX_REFUSALS + 10))

            async def refuse_all() -> None:
                for key in keys:
                    headers = {**tenant.auth, "Idempotency-Key": key}
                    refused = await client.post("/v1/vms", json=body, headers=headers)
                    assert refused.status_code == 403, refused.text

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(refuse_all)
            order = [
                entry["detail"]["idempotency_key"]
                for entry in map(json.loads, audit_lines(server.data_dir))
                if entry["outcome"] == "rejected"
            ]

            async def again(client: httpx.AsyncClient, key: str) -> tuple[bool, int]:
                """Whether the retry was a replay, and how many entries the key has now."""
                headers = {**tenant.auth, "Idempotency-Key": key}
                retry = await client.post("/v1/vms", json=body, headers=headers)
                assert retry.status_code == 403 and retry.json()["dimension"] == "vms"
                entries = keyed_entries(server.data_dir, key)
                return "Idempotent-Replayed" in retry.headers, len(entries)

            assert await again(client, order[-1]) == (True, 1), "the newest is replayed"
            assert await again(client, order[0]) == (False, 2), "the oldest is decided afresh"
        assert server.stop(signal.SIGTERM) == 0
        server.start()
        async with server.client() as client:
            assert await again(client, order[-2]) == (True, 1)
            assert await again(client, order[1]) == (False, 2)
    finally:
        server.kill()
