"""The service on the PostgreSQL store, in-process: every endpoint through the Quart test
client, against a real database (one replica; the replica tests run several)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
from pymerkle import InmemoryTree

from actors.journal.chain import ChainVerifier
from actors.journal.merkle import MemoryTree, consistency_proof, leaf_hash
from actors.service import open_service
from actors.store.postgres.bridge import DatabaseSettings, open_database
from actors.store.postgres.store import PostgresStore
from actors.store.postgres.verify import verify_database
from conftest import Api, service_config
from pgcluster import PgDatabase
from server.app import create_app
from server.auth import Authority


@pytest.fixture
async def pg_api(data_dir: Path, pg_db: PgDatabase) -> AsyncIterator[Api]:
    async with open_service(service_config(data_dir, store=pg_db.dsn)) as service:
        app = create_app(service, Authority.for_store(service.store))
        token = (data_dir / "admin.token").read_text().strip()
        yield Api(app.test_client(), service, token)


async def test_the_whole_api_on_postgresql(pg_api: Api, pg_db: PgDatabase) -> None:
    api = pg_api
    assert (await api.client.get("/readyz")).status_code == 200
    acme = await api.provision("acme", {"vcpus": 4, "memory_mib": 4096, "vms": 2})
    first = await api.spawn(acme.bearer, name="web-1")
    assert first.status_code == 201, await first.get_json()
    vm = await first.get_json()
    second = await api.spawn(acme.bearer, vcpus=4)
    assert second.status_code == 403
    assert (await second.get_json())["dimension"] == "vcpus"
    listed = await api.client.get("/v1/vms", headers=acme.auth)
    assert [v["id"] for v in (await listed.get_json())["vms"]] == [vm["id"]]
    usage = await (await api.client.get("/v1/usage", headers=acme.auth)).get_json()
    assert usage["allocated"] == {"vcpus": 1, "memory_mib": 256, "vms": 1}
    got = await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth)
    assert got.status_code == 200

    # idempotency: the same key replays, another body conflicts
    keyed = {"Authorization": acme.bearer, "Idempotency-Key": "k1"}
    body = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
    once = await api.client.post("/v1/vms", json=body, headers=keyed)
    again = await api.client.post("/v1/vms", json=body, headers=keyed)
    assert once.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await once.get_json())["id"] == (await again.get_json())["id"]
    other = await api.client.post("/v1/vms", json={**body, "vcpus": 2}, headers=keyed)
    assert other.status_code == 409

    gone = await api.client.delete(f"/v1/vms/{vm['id']}", headers=acme.auth)
    assert gone.status_code == 200, await gone.get_json()
    assert (await api.client.get(f"/v1/vms/{vm['id']}", headers=acme.auth)).status_code == 404
    missing = await api.client.delete("/v1/vms/vm-nope", headers=acme.auth)
    assert missing.status_code == 404

    # tokens: issue, revoke (401 at once on this replica)
    issued = await (
        await api.client.post("/v1/admin/tenants/acme/tokens", headers=api.admin)
    ).get_json()
    mine = {"Authorization": f"Bearer {issued['token']}"}
    assert (await api.client.get("/v1/usage", headers=mine)).status_code == 200
    revoked = await api.client.delete(
        f"/v1/admin/tenants/acme/tokens/{issued['token_id']}", headers=api.admin
    )
    assert revoked.status_code == 204
    assert (await api.client.get("/v1/usage", headers=mine)).status_code == 401

    # quota change, tenant list, delete refused while it has VMs
    patched = await api.client.patch(
        "/v1/admin/tenants/acme",
        json={"quota": {"vcpus": 8, "memory_mib": 8192, "vms": 3}},
        headers=api.admin,
    )
    assert (await patched.get_json())["quota"]["vms"] == 3
    await api.provision("beta")
    page = await (await api.client.get("/v1/admin/tenants?limit=1", headers=api.admin)).get_json()
    assert [t["id"] for t in page["tenants"]] == ["acme"] and page["next"]
    assert (await api.client.delete("/v1/admin/tenants/acme", headers=api.admin)).status_code == 409
    assert (await api.client.delete("/v1/admin/tenants/beta", headers=api.admin)).status_code == 204

    # the audit log: one verified chain, a checkpoint signed on demand
    entries = await api.audit()
    verifier = ChainVerifier()
    for e in entries:
        verifier.check(api_line(e))
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    head = await (await api.client.get("/v1/admin/audit/head", headers=api.admin)).get_json()
    assert head["seq"] == entries[-1]["seq"]
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        report = await verify_database(db)
    assert report.verdict == "ok" and report.head_seq == len(entries)


def api_line(entry: dict[str, object]) -> bytes:
    import json

    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def test_the_merkle_tree_in_the_database_is_rfc_9162s(pg_api: Api) -> None:
    """Every complete subtree written with the lines that complete it: roots and proofs
    from the database equal those of an independent RFC 9162 tree over the stored lines."""
    api = pg_api
    acme = await api.provision("acme", {"vcpus": 64, "memory_mib": 65536, "vms": 64})
    for n in range(11):
        assert (await api.spawn(acme.bearer, name=f"vm-{n}")).status_code == 201
    lines = [api_line(e) for e in await api.audit()]
    reference = InmemoryTree(algorithm="sha256")
    for line in lines:
        reference.append_entry(line)
    store = api.service.store
    assert isinstance(store, PostgresStore)
    ours = MemoryTree(leaf_hash(line) for line in lines)
    head = await store.signed_head()
    assert head.seq == len(lines)
    assert base64.b64decode(head.root) == reference.get_root(len(lines))
    for size in range(1, len(lines) + 1):
        for index in range(size):
            proof = await store.inclusion_proof(index + 1, size)
            assert proof.tree_size == size
            assert proof.hashes == reference.prove_inclusion(index + 1, size).path[1:]
        for old in range(1, size + 1):
            proof = await store.consistency_proof(old, size)
            assert proof.hashes == consistency_proof(ours, old, size)


async def test_a_read_only_database_is_not_ready_and_refuses_writes(
    data_dir: Path, pg_own: PgDatabase
) -> None:
    """A database that answers reads but takes no writes (a standby after a failover):
    ``/readyz`` follows a write that commits, so it turns 503 with no request failing
    first; writes answer 503 ``audit_unavailable``; both recover once writes commit
    again, without a restart. (The whole cluster turns read-only on a reload, so the
    replica's connections stay up: nothing else tells it.)"""

    def read_only(on: bool) -> None:
        setting = "SET default_transaction_read_only = on" if on else "RESET ALL"
        pg_own.cluster.psql(f"ALTER SYSTEM {setting}")
        pg_own.cluster.psql("SELECT pg_reload_conf()")

    async with open_service(service_config(data_dir, store=pg_own.dsn)) as service:
        app = create_app(service, Authority.for_store(service.store))
        api = Api(app.test_client(), service, (data_dir / "admin.token").read_text().strip())
        acme = await api.provision("acme", {"vcpus": 4, "memory_mib": 4096, "vms": 4})
        assert (await api.client.get("/readyz")).status_code == 200

        read_only(True)
        with trio.fail_after(10):  # a hang guard: the probe runs every second
            while (await api.client.get("/readyz")).status_code != 503:
                await trio.sleep(0.1)
        refused = await api.spawn(acme.bearer)
        assert refused.status_code == 503
        assert (await refused.get_json())["code"] == "audit_unavailable"
        listed = await api.client.get("/v1/vms", headers={"Authorization": acme.bearer})
        assert listed.status_code == 200  # reads still answer

        read_only(False)
        with trio.fail_after(10):
            while (await api.client.get("/readyz")).status_code != 200:
                await trio.sleep(0.1)
        assert (await api.spawn(acme.bearer)).status_code == 201


async def test_the_fleets_word_reaches_the_vm_rows(data_dir: Path, pg_db: PgDatabase) -> None:
    """The fleet state sweep and a VM's live status on the PostgreSQL store: settled VM
    rows take the fleet's state (every replica reads the rows); a VM with an operation in
    flight keeps its own; list requests never call the fleet."""
    config = service_config(
        data_dir, store=pg_db.dsn, embedded_boot_seconds=3600.0, fleet_sync_interval=0.2
    )
    async with open_service(config) as service:
        app = create_app(service, Authority.for_store(service.store))
        api = Api(app.test_client(), service, (data_dir / "admin.token").read_text().strip())
        acme = await api.provision("acme", {"vcpus": 8, "memory_mib": 8192, "vms": 8})
        auth = {"Authorization": acme.bearer}
        made = [await (await api.spawn(acme.bearer)).get_json() for _ in range(3)]

        async def states() -> dict[str, str]:
            page = await (await api.client.get("/v1/vms", headers=auth)).get_json()
            return {vm["id"]: vm["state"] for vm in page["vms"]}

        assert set((await states()).values()) == {"pending"}
        api.fleet.boot_seconds = 0.0  # the fleet now reports them running
        # a VM's own page asks the fleet and keeps its answer
        page = await api.client.get(f"/v1/vms/{made[0]['id']}", headers=auth)
        assert (await page.get_json())["state"] == "running"
        with trio.fail_after(10):  # a hang guard: the sweep runs every 0.2 s
            while await states() != {vm["id"]: "running" for vm in made}:
                await trio.sleep(0.05)
        stored = await service.store.record_fleet_states("acme", {made[1]["id"]: "error"})
        assert stored == 1
        assert (await states())[made[1]["id"]] == "error"
        # a VM whose destroy is in flight keeps its state, whatever the fleet says
        api.fleet.knobs.hang = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(api.client.delete, headers=auth), f"/v1/vms/{made[2]['id']}")
            with trio.fail_after(10):
                while (await states())[made[2]["id"]] != "destroying":
                    await trio.sleep(0.05)
            assert await service.store.record_fleet_states("acme", {made[2]["id"]: "running"}) == 0
            assert (await states())[made[2]["id"]] == "destroying"
            api.fleet.knobs.hang = False
            nursery.cancel_scope.cancel()


async def test_the_sequencing_replica_stores_a_last_checkpoint_at_shutdown(
    data_dir: Path, pg_db: PgDatabase
) -> None:
    """As the file store does: the head at shutdown is signed and kept (with its root and
    note), so ``audit verify --store`` checks the newest entries against a signature."""
    async with open_service(service_config(data_dir, store=pg_db.dsn)) as service:
        app = create_app(service, Authority.for_store(service.store))
        api = Api(app.test_client(), service, (data_dir / "admin.token").read_text().strip())
        acme = await api.provision("acme", {"vcpus": 4, "memory_mib": 4096, "vms": 4})
        assert (await api.spawn(acme.bearer)).status_code == 201
        head = len(await api.audit())
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        last = await db.fetchrow("SELECT seq, root, note FROM checkpoints ORDER BY id DESC")
        assert last is not None and last["seq"] == head
        assert last["root"] and last["note"]
        assert (await verify_database(db)).verdict == "ok"
