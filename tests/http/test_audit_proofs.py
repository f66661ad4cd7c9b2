"""The Merkle log over HTTP (API.md v1.1 "Proofs"): checkpoints, keys, proofs, trails, receipts.

Every test runs on both stores (the file store, and the PostgreSQL store with its tree in
the database). What the server says is checked against what is stored: the tree is
rebuilt from the stored lines (the segment files; the database's lines as the admin API
lists them) by pymerkle (an RFC 9162 implementation that shares no code with ours),
which also verifies every inclusion proof; a tenant learns nothing about another
tenant's entries (a foreign seq is the same 404 as a missing one, byte for byte); every
answer that appended entries names them in ``Audit-Seq``, exactly.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from pymerkle import InclusionProof, InmemoryTree

from actors.journal.merkle import leaf_hash, verify_consistency
from actors.journal.note import Checkpoint, Verifier, open_checkpoint
from actors.service import open_service
from conftest import Api, audit_lines, service_config
from server.app import create_app
from server.auth import Authority

SMALL = {"vcpus": 2, "memory_mib": 2048, "vms": 2}


@pytest.fixture(params=["file", "postgresql"])
async def api(request: pytest.FixtureRequest, data_dir: Path) -> AsyncIterator[Api]:
    """The service on either store (a PostgreSQL database of its own for each test)."""
    store = "file" if request.param == "file" else request.getfixturevalue("pg_db").dsn
    async with open_service(service_config(data_dir, store=store)) as service:
        app = create_app(service, Authority.for_store(service.store))
        yield Api(app.test_client(), service, (data_dir / "admin.token").read_text().strip())


async def stored_lines(api: Api, data_dir: Path) -> list[bytes]:
    """The log's lines as stored: the segment files, or the database's lines (the admin
    API lists each entry as stored; its canonical JSON is the line, byte for byte)."""
    if api.service.file_store is not None:
        return audit_lines(data_dir)
    return [
        json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        for e in await api.audit()
    ]


async def log_size(api: Api) -> int:
    """The number of acknowledged entries, from the admin API (either store)."""
    return len(await api.audit())


def seqs(response: Any) -> list[int]:
    header = response.headers.get("Audit-Seq")
    return [int(part) for part in header.split(", ")] if header else []


def pymerkle(lines: list[bytes]) -> InmemoryTree:
    tree = InmemoryTree(algorithm="sha256")
    for line in lines:
        tree.append_entry(line)
    return tree


async def log_key(api: Api, auth: dict[str, str]) -> Verifier:
    response = await api.client.get("/v1/audit/key", headers=auth)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return Verifier.parse(await response.get_data(as_text=True))


async def checkpoint(api: Api, auth: dict[str, str], key: Verifier) -> Checkpoint:
    response = await api.client.get("/v1/audit/checkpoint", headers=auth)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    return open_checkpoint(await response.get_data(as_text=True), key)[0]


async def trail(api: Api, auth: dict[str, str], limit: int = 3) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        response = await api.client.get(f"/v1/audit?after={after}&limit={limit}", headers=auth)
        assert response.status_code == 200, await response.get_data()
        page = await response.get_json()
        assert len(page["entries"]) <= limit
        entries += page["entries"]
        after = page["next"]
    return entries


async def busy_log(api: Api) -> tuple[Any, Any]:
    """Two tenants, spawns, a destroy, a quota refusal and a rejected destroy of a foreign VM."""
    acme = await api.provision("acme", SMALL)
    beta = await api.provision("beta", SMALL)
    vms = []
    for tenant in (acme, beta, acme):
        response = await api.spawn(tenant.bearer)
        assert response.status_code == 201
        vms.append(await response.get_json())
    assert (await api.spawn(acme.bearer, vcpus=2)).status_code == 403  # over its quota
    foreign = await api.client.delete(f"/v1/vms/{vms[1]['id']}", headers=acme.auth)
    assert foreign.status_code == 404
    own = await api.client.delete(f"/v1/vms/{vms[0]['id']}", headers=acme.auth)
    assert own.status_code == 200
    return acme, beta


async def test_every_entry_is_proven_in_the_signed_tree(api: Api, data_dir: Path) -> None:
    acme, _ = await busy_log(api)
    key = await log_key(api, acme.auth)
    assert key == await log_key(api, api.admin)
    if api.service.file_store is not None:
        assert str(key) == (data_dir / "keys" / "audit-note.vkey").read_text().strip()
    tree = await checkpoint(api, acme.auth, key)
    lines = await stored_lines(api, data_dir)
    reference = pymerkle(lines)
    # the checkpoint covers every acknowledged write, and its root is the stored lines'
    assert tree.size == len(lines) == await log_size(api)
    assert tree.root == reference.get_root(tree.size)
    assert tree.origin.startswith("vm-tenant/") and tree.origin == key.name

    mine = await trail(api, acme.auth)
    stored = [json.loads(line) for line in lines]
    assert mine == [e for e in stored if e["tenant"] == "acme"]
    assert {e["outcome"] for e in mine} >= {"rejected", "requested", "succeeded"}
    for entry in mine:
        seq = entry["seq"]
        response = await api.client.get(f"/v1/audit/proof?seq={seq}", headers=acme.auth)
        assert response.status_code == 200
        proof = await response.get_json()
        assert proof["seq"] == seq and proof["leaf_index"] == seq - 1
        assert proof["tree_size"] == tree.size
        path = [base64.b64decode(h) for h in proof["hashes"]]
        # verified by pymerkle, from the leaf recomputed out of the entry as listed
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        leaf = leaf_hash(line.encode())
        rule = reference.prove_inclusion(seq, tree.size).rule
        check = InclusionProof("sha256", True, tree.size, seq, rule, [leaf, *path])
        check.verify(leaf, tree.root, index=seq, size=tree.size)
    # the operator gets a proof for any entry, in any earlier tree too
    for seq in range(1, tree.size + 1):
        for size in {seq, tree.size}:
            url = f"/v1/audit/proof?seq={seq}&tree_size={size}"
            response = await api.client.get(url, headers=api.admin)
            path = [base64.b64decode(h) for h in (await response.get_json())["hashes"]]
            assert path == reference.prove_inclusion(seq, size).path[1:]


async def test_a_foreign_seq_is_the_same_404_as_a_missing_one(api: Api) -> None:
    acme, beta = await busy_log(api)
    size = await log_size(api)
    betas = [e["seq"] for e in await trail(api, beta.auth)]
    answers = []
    for query in (
        f"seq={betas[0]}",  # another tenant's entry
        f"seq={betas[-1]}&tree_size={size}",
        f"seq={size + 1}",  # beyond the tree
        f"seq={size}&tree_size=1",  # not in that tree
        "seq=999999999",
    ):
        response = await api.client.get(
            f"/v1/audit/proof?{query}", headers={**acme.auth, "X-Request-Id": "same"}
        )
        assert response.status_code == 404
        headers = {k: v for k, v in response.headers.items() if k != "Date"}
        answers.append((headers, await response.get_data()))
    assert all(answer == answers[0] for answer in answers)
    # beta's own entry is proven for beta, and for the operator
    for auth in (beta.auth, api.admin):
        response = await api.client.get(f"/v1/audit/proof?seq={betas[0]}", headers=auth)
        assert response.status_code == 200


async def test_consistency_between_every_pair_of_sizes(api: Api, data_dir: Path) -> None:
    acme, _ = await busy_log(api)
    lines = await stored_lines(api, data_dir)
    reference = pymerkle(lines)
    size = len(lines)
    for old in range(1, size + 1):
        for new in range(old, size + 1):
            url = f"/v1/audit/consistency?from={old}&to={new}"
            response = await api.client.get(url, headers=acme.auth)
            assert response.status_code == 200
            answer = await response.get_json()
            assert (answer["from"], answer["to"]) == (old, new)
            proof = [base64.b64decode(h) for h in answer["hashes"]]
            assert (proof == []) == (old == new)
            old_root, new_root = reference.get_root(old), reference.get_root(new)
            assert verify_consistency(old, new, old_root, new_root, proof)
    # `to` defaults to the current size
    response = await api.client.get("/v1/audit/consistency?from=2", headers=acme.auth)
    assert (await response.get_json())["to"] == size


async def test_bad_proof_parameters_are_400_and_change_nothing(api: Api) -> None:
    acme, _ = await busy_log(api)
    size = await log_size(api)
    for path in (
        "/v1/audit/proof", "/v1/audit/proof?seq=0", "/v1/audit/proof?seq=-1",
        "/v1/audit/proof?seq=1.0", "/v1/audit/proof?seq=abc", "/v1/audit/proof?seq=1&seq=1",
        "/v1/audit/proof?seq=1&tree_size=0", f"/v1/audit/proof?seq=1&tree_size={size + 1}",
        "/v1/audit/proof?seq=1&size=2", "/v1/audit/proof?seq=99999999999999999999999",
        "/v1/audit/consistency", "/v1/audit/consistency?from=0",
        "/v1/audit/consistency?from=3&to=2",
        f"/v1/audit/consistency?from=1&to={size + 1}", "/v1/audit/consistency?from=x",
        "/v1/audit/checkpoint?x=1", "/v1/audit/key?x=1", "/v1/audit?after=-1",
        "/v1/audit?limit=0", "/v1/audit?limit=1001", "/v1/audit?cursor=x",
    ):  # fmt: skip
        response = await api.client.get(path, headers=acme.auth)
        assert response.status_code == 400, path
        assert (await response.get_json())["code"] == "invalid_request"
    assert await log_size(api) == size


async def test_the_trail_is_the_tenants_own_and_starts_at_its_creation(api: Api) -> None:
    acme, _ = await busy_log(api)
    listed = await trail(api, acme.auth, limit=2)
    assert listed and {e["tenant"] for e in listed} == {"acme"}
    assert [e["seq"] for e in listed] == sorted(e["seq"] for e in listed)
    last = listed[-1]["seq"]
    response = await api.client.get(f"/v1/audit?after={last}", headers=acme.auth)
    assert await response.get_json() == {"entries": [], "next": None}
    # the trail is a tenant's: the operator is refused
    assert (await api.client.get("/v1/audit", headers=api.admin)).status_code == 403
    # a tenant provisioned again under a deleted id sees none of its predecessor's entries
    gone = await api.provision("gone")
    await api.client.post("/v1/admin/tenants/gone/tokens", headers=api.admin)
    assert (await api.client.delete("/v1/admin/tenants/gone", headers=api.admin)).status_code == 204
    again = await api.provision("gone")
    fresh = await trail(api, again.auth)
    assert [e["op"] for e in fresh] == ["tenant.create"]
    old_seq = (await api.audit())[-4]["seq"]  # the first creation of "gone"
    response = await api.client.get(f"/v1/audit/proof?seq={old_seq}", headers=again.auth)
    assert response.status_code == 404
    assert gone.token != again.token


async def test_every_answer_that_appended_entries_names_them(api: Api) -> None:
    fleet = api.fleet

    def by_request(entries: list[dict[str, Any]], request_id: str) -> list[int]:
        return [e["seq"] for e in entries if e["request_id"] == request_id]

    async def check(response: Any, request_id: str, count: int) -> None:
        entries = await api.audit()
        assert seqs(response) == by_request(entries, request_id), request_id
        assert len(seqs(response)) == count, request_id

    def rid(name: str) -> dict[str, str]:
        return {"X-Request-Id": name}

    created = await api.client.post(
        "/v1/admin/tenants", json={"id": "acme", "quota": SMALL}, headers={**api.admin, **rid("c")}
    )
    await check(created, "c", 1)
    token = {"Authorization": f"Bearer {(await created.get_json())['token']}"}
    body = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
    keyed = {**token, "Idempotency-Key": "k1"}
    spawned = await api.client.post("/v1/vms", json=body, headers={**keyed, **rid("s")})
    assert spawned.status_code == 201
    await check(spawned, "s", 2)
    replayed = await api.client.post("/v1/vms", json=body, headers={**keyed, **rid("r")})
    assert replayed.headers["Idempotent-Replayed"] == "true" and seqs(replayed) == []
    over = await api.client.post(
        "/v1/vms", json={**body, "vcpus": 2}, headers={**token, **rid("q")}
    )
    assert over.status_code == 403
    await check(over, "q", 1)
    foreign = await api.client.delete("/v1/vms/vm-nobody", headers={**token, **rid("f")})
    assert foreign.status_code == 404
    await check(foreign, "f", 1)
    fleet.knobs.fail_next = 1
    failed = await api.client.post("/v1/vms", json=body, headers={**token, **rid("e")})
    assert failed.status_code == 502
    await check(failed, "e", 2)
    vm = (await spawned.get_json())["id"]
    destroyed = await api.client.delete(f"/v1/vms/{vm}", headers={**token, **rid("d")})
    assert destroyed.status_code == 200
    await check(destroyed, "d", 2)
    listed = await api.client.get("/v1/vms", headers={**token, **rid("l")})
    assert listed.status_code == 200 and "Audit-Seq" not in listed.headers
    for method, path, name in (
        ("PATCH", "/v1/admin/tenants/acme", "u"),
        ("POST", "/v1/admin/tenants/acme/tokens", "i"),
    ):
        kwargs = {"json": {"quota": SMALL}} if method == "PATCH" else {}
        response = await api.client.open(
            path, method=method, headers={**api.admin, **rid(name)}, **kwargs
        )
        assert response.status_code in (200, 201)
        await check(response, name, 1)
    token_id = next(iter(api.service.store.directory.tokens("acme")))
    revoked = await api.client.delete(
        f"/v1/admin/tenants/acme/tokens/{token_id}", headers={**api.admin, **rid("v")}
    )
    await check(revoked, "v", 1)
    deleted = await api.client.delete("/v1/admin/tenants/acme", headers={**api.admin, **rid("x")})
    assert deleted.status_code == 204
    await check(deleted, "x", 1)


async def test_receipts_are_exact_when_a_caller_repeats_its_request_id(api: Api) -> None:
    """Two spawns in flight at once with the same token and the same X-Request-Id: each
    answer names its own two entries, no more."""
    acme = await api.provision("acme")
    api.fleet.knobs.latency = 0.05
    answers: list[Any] = []

    async def spawn() -> None:
        body = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
        headers = {**acme.auth, "X-Request-Id": "retry-1"}
        answers.append(await api.client.post("/v1/vms", json=body, headers=headers))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(spawn)
        nursery.start_soon(spawn)
    entries = {e["seq"]: e for e in await api.audit()}
    named = [seqs(answer) for answer in answers]
    assert all(len(s) == 2 for s in named)
    assert not set(named[0]) & set(named[1])
    for answer, pair in zip(answers, named, strict=True):
        vm = (await answer.get_json())["id"]
        assert {entries[seq]["vm"] for seq in pair} == {vm}
        assert [entries[seq]["outcome"] for seq in pair] == ["requested", "succeeded"]


async def test_each_acknowledged_write_is_in_the_next_checkpoint(api: Api) -> None:
    acme = await api.provision("acme")
    key = await log_key(api, acme.auth)
    seen = 0
    for _ in range(5):
        response = await api.spawn(acme.bearer)
        tree = await checkpoint(api, acme.auth, key)
        assert tree.size >= max(seqs(response)) > seen
        seen = tree.size


async def test_key_and_origin_are_made_once_and_kept(data_dir: Path) -> None:
    async with open_service(service_config(data_dir)) as service:
        first = service.store.log_key
    keys = data_dir / "keys"
    origin = keys / "audit-origin"
    assert origin.stat().st_mode & 0o777 == 0o600
    assert (keys / "audit-ed25519.key").stat().st_mode & 0o777 == 0o600
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in keys.iterdir()}
    async with open_service(service_config(data_dir)) as service:
        assert service.store.log_key == first
        head = await service.store.signed_head()
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in keys.iterdir()} == before
    assert first.name == origin.read_text().strip()
    assert open_checkpoint(head.note, first)[0].size == head.seq
