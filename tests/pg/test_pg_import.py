"""A single node's data dir, made by the real file-store service, moved into PostgreSQL;
and the chain in the database verified with the file store's report."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from actors.journal import snapshot
from actors.journal.checkpoint import read_checkpoints, read_origin
from actors.journal.merkle import MemoryTree, leaf_hash
from actors.journal.merkle import root as merkle_root
from actors.journal.note import Checkpoint, Signer, sign_checkpoint
from actors.journal.verify import verify_data_dir
from actors.service import open_service
from actors.store.postgres.bridge import Database, DatabaseSettings, open_database
from actors.store.postgres.importer import ImportRefused, import_data_dir
from actors.store.postgres.schema import migrate
from actors.store.postgres.tree import restore_frontier
from actors.store.postgres.verify import verify_database
from conftest import Api, audit_lines, service_config
from pgcluster import PgDatabase
from server.app import create_app
from server.auth import Authority


async def make_history(data_dir: Path) -> None:
    """Two service lifetimes of tenants, tokens, spawns, a refusal, destroys, key rotation."""
    for lifetime in range(2):
        async with open_service(service_config(data_dir)) as service:
            app = create_app(service, Authority.for_store(service.store))
            api = Api(app.test_client(), service, (data_dir / "admin.token").read_text().strip())
            if lifetime == 0:
                acme = (await api.provision("acme")).bearer
                await api.provision("gone")
                spawned = []
                for n in range(3):
                    response = await api.spawn(acme, name=f"vm-{n}", image="débian-12")
                    spawned.append((await response.get_json())["id"])
                keyed = await api.client.post(
                    "/v1/vms",
                    json={"vcpus": 1, "memory_mib": 256, "image": "x"},
                    headers={"Authorization": acme, "Idempotency-Key": "once"},
                )
                assert keyed.status_code == 201
                assert (await api.spawn(acme, vcpus=64)).status_code == 403  # rejected
                await api.client.delete(f"/v1/vms/{spawned[0]}", headers={"Authorization": acme})
                issued = await api.client.post("/v1/admin/tenants/acme/tokens", headers=api.admin)
                token_id = (await issued.get_json())["token_id"]
                await api.client.delete(
                    f"/v1/admin/tenants/acme/tokens/{token_id}", headers=api.admin
                )
                await api.client.delete("/v1/admin/tenants/gone", headers=api.admin)
                await api.client.post("/v1/admin/keys", headers=api.admin)
            else:
                await api.client.patch(
                    "/v1/admin/tenants/acme",
                    json={"quota": {"vcpus": 9, "memory_mib": 9000, "vms": 9}},
                    headers=api.admin,
                )
                await api.provision("later")


async def database_state(db: Database) -> dict[str, Any]:
    tenants = {
        r["id"]: r
        for r in await db.fetch(
            "SELECT id, quota_vcpus, quota_memory_mib, quota_vms, allocated_vcpus, "
            "allocated_memory_mib, allocated_vms FROM tenants"
        )
    }
    return {
        "tenants": {
            t: ((r["quota_vcpus"], r["quota_memory_mib"], r["quota_vms"]),
                (r["allocated_vcpus"], r["allocated_memory_mib"], r["allocated_vms"]))
            for t, r in tenants.items()
        },
        "tokens": {(r["tenant"], r["token_id"]) for r in await db.fetch("SELECT * FROM tokens")},
        "vms": {
            r["id"]: (r["tenant"], r["vcpus"], r["memory_mib"], r["image"], r["name"],
                      r["created_at"], r["state"], r["settled_state"], r["idempotency_key"])
            for r in await db.fetch("SELECT * FROM vms")
        },
        "idempotency": {
            (r["tenant"], r["key"]): (r["request_hash"], r["status"],
                                      None if r["body"] is None else json.loads(r["body"]),
                                      r["created"])
            for r in await db.fetch("SELECT * FROM idempotency")
        },
    }  # fmt: skip


def folded_state(data_dir: Path) -> dict[str, Any]:
    state = snapshot.replay(data_dir).state
    tenants = state.tenants.values()
    return {
        "tenants": {
            t.id: ((t.quota.vcpus, t.quota.memory_mib, t.quota.vms),
                   (t.allocated_vcpus, t.allocated_memory, len(t.vms)))
            for t in tenants
        },
        "tokens": {(t.id, token) for t in tenants for token in state.directory.tokens(t.id)},
        "vms": {
            vm.id: (t.id, vm.vcpus, vm.memory_mib, vm.image, vm.name, vm.created_at, vm.state,
                    vm.settled_state, vm.idempotency_key)
            for t in tenants for vm in t.vms.values()
        },
        "idempotency": {
            (t.id, key): (r.request_hash, r.status, r.body, r.created)
            for t in tenants for key, r in t.idempotency.items()
        },
    }  # fmt: skip


async def row_counts(db: Database) -> dict[str, int]:
    tables = ["log_meta", "signing_keys", "tenants", "tokens", "vms", "idempotency",
              "audit_log", "audit_queue", "merkle_nodes", "checkpoints"]  # fmt: skip
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


async def test_import_moves_chain_state_and_keys(
    data_dir: Path, pg_db: PgDatabase, pg_cluster: object
) -> None:
    await make_history(data_dir)
    file_lines = audit_lines(data_dir)
    file_report = verify_data_dir(data_dir)
    assert file_report.verdict == "ok" and file_report.entries == len(file_lines) > 15

    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        report = await import_data_dir(db, data_dir)
        assert (report.entries, report.head_seq, report.head_hash) == (
            file_report.entries, file_report.head_seq, file_report.head_hash,
        )  # fmt: skip
        rows = await db.fetch("SELECT seq, line, hash FROM audit_log ORDER BY seq")
        assert [bytes(r["line"]) for r in rows] == file_lines
        assert [r["seq"] for r in rows] == list(range(1, len(file_lines) + 1))
        head = await db.fetchrow("SELECT seq, hash FROM audit_head")
        assert head is not None and (head["seq"], head["hash"]) == (
            report.head_seq,
            report.head_hash,
        )

        # the Merkle tree: every complete subtree, as the sequencer would have written it
        reference = MemoryTree(leaf_hash(line) for line in file_lines)
        n = len(file_lines)
        nodes = await db.fetchval("SELECT count(*) FROM merkle_nodes")
        assert nodes == sum(n >> level for level in range(n.bit_length()))
        async with db.connection() as con:
            frontier = await restore_frontier(con, n)
        assert frontier.root() == merkle_root(reference, n)

        # the state is what the node itself would serve after a restart
        assert await database_state(db) == folded_state(data_dir)
        state = await database_state(db)
        assert "gone" not in state["tenants"] and "later" in state["tenants"]
        assert state["tenants"]["acme"][0] == (9, 9000, 9)
        assert state["idempotency"][("acme", "once")][1] == 201

        # keys, admin token, origin, checkpoints
        admin = (data_dir / "admin.token").read_text().strip()
        meta = await db.fetchrow("SELECT origin, admin_token_sha256 FROM log_meta")
        assert meta is not None
        assert meta["origin"] == read_origin(data_dir)  # the log keeps its name
        assert meta["admin_token_sha256"] == hashlib.sha256(admin.encode()).hexdigest()
        keyring = json.loads((data_dir / "keys" / "token-signing.keyring.json").read_bytes())
        token_keys = await db.fetch(
            "SELECT id, state, secret FROM signing_keys WHERE purpose = 'token' ORDER BY id"
        )
        assert sorted((k["id"], k["state"], k["secret"]) for k in keyring["keys"]) == [
            tuple(r) for r in token_keys
        ]
        assert len(token_keys) == 2  # the rotation moved along
        audit_pem = await db.fetchval("SELECT secret FROM signing_keys WHERE purpose = 'audit'")
        assert audit_pem == (data_dir / "keys" / "audit-ed25519.key").read_text()
        stored = [c for c in read_checkpoints(data_dir) if c is not None]
        assert report.checkpoints == len(stored) >= 2

        # the database's own verification gives the data dir's report
        assert await verify_database(db) == file_report
        assert await verify_database(db, expect_head=(3, rows[2]["hash"])) == file_report


async def test_import_refuses_a_database_that_is_not_empty(data_dir: Path,
                                                           pg_db: PgDatabase) -> None:  # fmt: skip
    await make_history(data_dir)
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        await import_data_dir(db, data_dir)
        before = await row_counts(db)
        with pytest.raises(ImportRefused, match="not empty"):
            await import_data_dir(db, data_dir)
        assert await row_counts(db) == before


async def test_import_refuses_even_one_foreign_row(data_dir: Path, pg_db: PgDatabase) -> None:
    await make_history(data_dir)
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        await migrate(db)
        await db.execute("INSERT INTO tenants (id, quota_vcpus, quota_memory_mib, quota_vms) "
                         "VALUES ('other', 1, 1, 1)")  # fmt: skip
        with pytest.raises(ImportRefused, match="not empty"):
            await import_data_dir(db, data_dir)
        counts = await row_counts(db)
        assert counts.pop("tenants") == 1 and set(counts.values()) == {0}


async def test_import_refuses_a_damaged_data_dir(data_dir: Path, pg_db: PgDatabase) -> None:
    await make_history(data_dir)
    segment = sorted((data_dir / "audit").glob("*.jsonl"))[0]
    segment.write_bytes(segment.read_bytes().replace(b'"acme"', b'"acmf"', 1))
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        with pytest.raises(ImportRefused, match="tampered"):
            await import_data_dir(db, data_dir)
        assert await db.fetchval("SELECT to_regclass('tenants') IS NULL")


async def test_import_leaves_a_torn_last_line_behind(data_dir: Path, pg_db: PgDatabase) -> None:
    await make_history(data_dir)
    complete = audit_lines(data_dir)
    segment = sorted((data_dir / "audit").glob("*.jsonl"))[-1]
    with segment.open("ab") as f:
        f.write(b'{"seq": 99999, "half')
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        report = await import_data_dir(db, data_dir)
        assert report.entries == len(complete)
        assert await db.fetchval("SELECT count(*) FROM audit_log") == len(complete)
        assert (await verify_database(db)).verdict == "ok"


async def test_verify_finds_damage_in_the_database(data_dir: Path, pg_db: PgDatabase) -> None:
    await make_history(data_dir)
    async with open_database(DatabaseSettings(pg_db.dsn)) as db:
        await import_data_dir(db, data_dir)
        good = await verify_database(db)
        assert good.verdict == "ok"

        # an edited entry
        await db.execute(
            "UPDATE audit_log SET line = convert_to(replace(convert_from(line, 'UTF8'), "
            "'\"acme\"', '\"acmf\"'), 'UTF8') WHERE seq = 5"
        )
        bad = await verify_database(db)
        assert (bad.verdict, bad.bad_seq) == ("tampered", 5)
        await import_fresh(db, data_dir)

        # the newest entries deleted: the checkpoints and the recorded head still name them
        await db.execute("DELETE FROM audit_log WHERE seq > $1", good.head_seq - 3)
        cut = await verify_database(db)
        assert (cut.verdict, cut.bad_seq) == ("truncated", good.head_seq - 2)
        await import_fresh(db, data_dir)

        # a checkpoint signed by another key
        await db.execute(
            "UPDATE checkpoints SET signature = $1 WHERE id = (SELECT min(id) FROM checkpoints)",
            "AAAA",
        )
        forged = await verify_database(db)
        assert forged.verdict == "tampered" and "checkpoint 1" in forged.reason
        await import_fresh(db, data_dir)

        # a checkpoint's root that is not the lines' (its note re-signed with the real key)
        row = await db.fetchrow("SELECT id, seq, note FROM checkpoints ORDER BY id LIMIT 1")
        assert row is not None and row["note"] is not None
        signer = Signer(read_origin(data_dir), load_audit_key(data_dir))
        forged_root = sign_checkpoint(Checkpoint(signer.name, row["seq"], bytes(32)), signer)
        await db.execute(
            "UPDATE checkpoints SET note = $2, root = $3 WHERE id = $1",
            row["id"], forged_root, base64.b64encode(bytes(32)).decode(),
        )  # fmt: skip
        wrong = await verify_database(db)
        assert (wrong.verdict, wrong.bad_seq) == ("tampered", row["seq"])
        assert "Merkle root" in wrong.reason
        await import_fresh(db, data_dir)

        # a node of the stored tree (what the proofs are made of) that is not the lines'
        await db.execute("UPDATE merkle_nodes SET hash = $1 WHERE level = 0 AND idx = 0", bytes(32))
        tree = await verify_database(db)
        assert tree.verdict == "tampered" and "merkle_nodes" in tree.reason
        await import_fresh(db, data_dir)

        # an expected head the log does not reach
        beyond = await verify_database(db, expect_head=(good.head_seq + 5, "0" * 64))
        assert beyond.verdict == "truncated"


def load_audit_key(data_dir: Path) -> Ed25519PrivateKey:
    pem = (data_dir / "keys" / "audit-ed25519.key").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


async def import_fresh(db: Database, data_dir: Path) -> None:
    """Empty the database (keeping the schema) and import again."""
    await db.execute(
        "TRUNCATE log_meta, signing_keys, tenants, tokens, vms, idempotency, audit_queue, "
        "audit_log, merkle_nodes, checkpoints CASCADE; "
        "UPDATE audit_head SET seq = 0, hash = repeat('0', 64), ts = NULL"
    )
    await import_data_dir(db, data_dir)
    await trio.lowlevel.checkpoint()
