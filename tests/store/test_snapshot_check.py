"""Snapshots are checked against the log: a seal at start, a fold from the genesis after.

In-process over a real data dir first (the snapshot as a compaction and as a fold from
the genesis give the same bytes; an edited, a re-sealed, a legacy snapshot), then a real
``vm-tenant serve`` whose ``snapshot/state.json`` was edited between two runs: a revoked
token made valid again, two VMs dropped so that the tenant could exceed its quota.
"""

from __future__ import annotations

import base64
import json
import re
import signal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from actors.errors import AuditUnavailable, QuotaExceeded
from actors.journal import snapshot
from actors.journal.checkpoint import CheckpointSigner
from actors.journal.refold import check_snapshot
from actors.service import Service, open_service
from actors.state import Quota, VmSpec
from actors.tenants.protocol import Destroy, Source, Spawn
from conftest import LiveServer, Provision, bearer, service_config, vm_tenant

ADMIN = Source("127.0.0.1", "admin")
USER = Source("127.0.0.1", "tok-user")
SPEC = VmSpec(1, 256, "debian-12", None)


async def spawn(service: Service, tenant: str, key: str | None = None) -> Any:
    return await service.registry.call(
        tenant, lambda reply: Spawn(SPEC, key, "h" * 64 if key else None, USER, "r", reply)
    )


async def history(service: Service) -> None:
    """Every kind of entry, with compactions in between."""
    registry = service.registry
    await registry.create_tenant("acme", Quota(3, 3 * 256, 3), ADMIN, "r")
    await registry.create_tenant("gone", Quota(1, 256, 1), ADMIN, "r")
    token = await registry.issue_token("acme", ADMIN, "r")
    vms = [await spawn(service, "acme", key=f"k{n}") for n in range(3)]
    await service.write_snapshot()
    with pytest.raises(QuotaExceeded):
        await spawn(service, "acme", key="refused")
    await registry.revoke_token("acme", token, ADMIN, "r")
    await registry.call("acme", lambda reply: Destroy(vms[0].id, USER, "r", reply))
    await service.write_snapshot()
    await registry.delete_tenant("gone", ADMIN, "r")
    await registry.create_tenant("gone", Quota(2, 512, 2), ADMIN, "r")
    await spawn(service, "gone")
    await spawn(service, "acme", key="k1")  # a replay: no entry


def body_of(data: bytes) -> bytes:
    return data[: data.rfind(b',"seal":')] + b"}"


async def test_a_snapshot_is_the_fold_of_the_log_from_the_genesis(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await history(service)
    sealed = snapshot.snapshot_path(data_dir).read_bytes()
    anchor = msgspec.json.decode(sealed, type=snapshot._Snapshot).anchor
    seal = json.loads(sealed)["seal"]
    # Compacted three times over, yet byte for byte the fold of the log from the genesis.
    genesis = snapshot.replay(data_dir, key=None)
    assert genesis.head == anchor
    assert snapshot.encode(genesis.state, anchor) == body_of(sealed)
    assert seal["digest"] == snapshot.digest_of(body_of(sealed))
    assert check_snapshot(data_dir, anchor, seal["digest"]).verdict == "ok"
    result = vm_tenant("audit", "verify", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout


def edit(data_dir: Path, change: Any) -> None:
    """Change the snapshot's JSON as an editor would (its seal kept as it was)."""
    path = snapshot.snapshot_path(data_dir)
    snap = json.loads(path.read_bytes())
    change(snap)
    path.write_text(json.dumps(snap))


def reseal(data_dir: Path, change: Any) -> None:
    """Change the snapshot and seal it again with the log's own key: someone holding it."""
    path = snapshot.snapshot_path(data_dir)
    snap = json.loads(path.read_bytes())
    del snap["seal"]
    change(snap)
    body = msgspec.json.encode(snap)
    digest = snapshot.digest_of(body)
    signature = CheckpointSigner(data_dir).sign_bytes(snapshot.SEAL_CONTEXT + digest.encode())
    seal = {"digest": digest, "signature": base64.b64encode(signature).decode()}
    path.write_bytes(body[:-1] + b',"seal":' + json.dumps(seal).encode() + b"}")


def acme(snap: dict[str, Any]) -> dict[str, Any]:
    tenant: dict[str, Any] = next(t for t in snap["tenants"] if t["id"] == "acme")
    return tenant


async def test_an_edited_snapshot_is_never_served_from(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await service.registry.create_tenant("acme", Quota(2, 512, 2), ADMIN, "r")
        revoked = await service.registry.issue_token("acme", ADMIN, "r")
        await service.registry.revoke_token("acme", revoked, ADMIN, "r")
        ids = sorted([(await spawn(service, "acme")).id, (await spawn(service, "acme")).id])

    def lie(snap: dict[str, Any]) -> None:
        acme(snap)["tokens"].append(revoked)
        acme(snap)["vms"] = []

    edit(data_dir, lie)
    async with open_service(config) as service:
        # Damage from the first moment: the seal is checked before anything is served.
        assert not service.ready
        assert not service.store.directory.token_valid("acme", revoked)
        page, _ = await service.reads.vms("acme", None, 10)
        assert [vm.id for vm in page] == ids, "the state is the fold of the log"
        with pytest.raises(AuditUnavailable):
            await spawn(service, "acme")
    result = vm_tenant("audit", "verify", "--data-dir", str(data_dir))
    assert result.returncode == 1 and "tampered" in result.stdout, result.stdout
    assert "snapshot/state.json" in result.stdout


async def test_a_resealed_snapshot_is_found_by_the_fold_from_the_genesis(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await service.registry.create_tenant("acme", Quota(2, 512, 2), ADMIN, "r")
        await spawn(service, "acme")
    reseal(data_dir, lambda snap: acme(snap).update(vms=[]))
    async with open_service(config) as service:
        # The seal verifies (the key was used): only the check against the log can tell.
        with trio.fail_after(30):
            while service.ready:
                await trio.sleep(0.01)
        with pytest.raises(AuditUnavailable):
            await spawn(service, "acme")
    result = vm_tenant("audit", "verify", "--data-dir", str(data_dir))
    assert result.returncode == 1, result.stdout
    assert "is not the fold of the log" in result.stdout


async def test_a_snapshot_from_before_seals_is_replayed_over_not_damage(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await service.registry.create_tenant("acme", Quota(2, 512, 2), ADMIN, "r")
        vm = await spawn(service, "acme")

    def legacy(snap: dict[str, Any]) -> None:
        del snap["seal"]
        snap["version"] = snapshot.LEGACY_VERSION
        acme(snap)["vms"] = []  # what it says is not used at all

    edit(data_dir, legacy)
    assert vm_tenant("audit", "verify", "--data-dir", str(data_dir)).returncode == 0
    async with open_service(config) as service:
        assert service.ready
        page, _ = await service.reads.vms("acme", None, 10)
        assert [v.id for v in page] == [vm.id]
        await spawn(service, "acme")
    # the next compaction (here the one at shutdown) sealed a new one
    assert json.loads(snapshot.snapshot_path(data_dir).read_bytes())["version"] == 2
    assert vm_tenant("audit", "verify", "--data-dir", str(data_dir)).returncode == 0


# -- a real server ------------------------------------------------------------------------------


QUOTA = {"vcpus": 2, "memory_mib": 512, "vms": 2}
BODY = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}


@pytest.mark.parametrize("forge", [edit, reseal], ids=["edited", "resealed"])
async def test_a_server_on_a_changed_snapshot_refuses_writes(
    tmp_path: Path, provision: Provision, forge: Any
) -> None:
    data = tmp_path / "data"
    server = LiveServer(data, args=["--log-format", "json"]).start()
    try:
        async with server.client() as client:
            admin = bearer(server.admin_token)
            tenant = await provision(client, admin, "acme", QUOTA)
            issued = await client.post("/v1/admin/tenants/acme/tokens", json={}, headers=admin)
            revoked = issued.json()
            gone = await client.delete(
                f"/v1/admin/tenants/acme/tokens/{revoked['token_id']}", headers=admin
            )
            assert gone.status_code == 204
            ids = set()
            for _ in range(2):
                spawned = await client.post("/v1/vms", json=BODY, headers=tenant.auth)
                assert spawned.status_code == 201
                ids.add(spawned.json()["id"])
        assert server.stop(signal.SIGTERM) == 0  # the last snapshot covers all of it
    finally:
        server.kill()

    def lie(snap: dict[str, Any]) -> None:
        acme(snap)["tokens"].append(revoked["token_id"])
        acme(snap)["vms"] = []

    forge(data, lie)
    server = LiveServer(data, args=["--log-format", "json"]).start()
    try:
        async with server.client() as client:
            with trio.fail_after(60):  # at once when edited; once the check ran if resealed
                while (await client.get("/readyz")).status_code == 200:
                    await trio.sleep(0.05)
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.headers["Retry-After"] == "1"
            spawn = await client.post("/v1/vms", json=BODY, headers=tenant.auth)
            assert (spawn.status_code, spawn.json()["code"]) == (503, "audit_unavailable")
            if forge is edit:
                # never served from: the revoked token stays revoked, the VMs are there
                again = await client.get("/v1/vms", headers=bearer(revoked["token"]))
                assert again.status_code == 401
                listed = await client.get("/v1/vms", headers=tenant.auth)
                assert {vm["id"] for vm in listed.json()["vms"]} == ids
        fleet = (data / "fleet" / "vms.jsonl").read_bytes().splitlines()
        assert len(fleet) == 2, "nothing more reached the fleet"
        damaged = [line for line in server.log if re.search("damaged.*snapshot/state.json", line)]
        assert len(damaged) == 1, server.log
        assert json.loads(damaged[0])["level"] == "error"
    finally:
        server.kill()
    result = vm_tenant("audit", "verify", "--data-dir", str(data))
    assert result.returncode == 1 and "tampered" in result.stdout, result.stdout
