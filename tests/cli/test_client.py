"""``server.client``: the typed client, against a real ``vm-tenant serve`` on 127.0.0.1.

Answers no vm-tenant server gives (a proxy's HTML error page, a redirect, a body that is
not the API's) come from httpx's ``MockTransport``, the transport httpx provides for that.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys

import httpx
import pytest

from actors.journal.merkle import leaf_hash, verify_inclusion
from actors.journal.note import Verifier, open_checkpoint
from conftest import LiveServer
from server.client import (
    API,
    ApiError,
    AuditPage,
    Client,
    ClientError,
    CreatedTenant,
    Quota,
    ServerError,
    Tenant,
    Unreachable,
    Usage,
    Vm,
    segment,
)
from server.witness import stored_line

QUOTA = Quota(vcpus=8, memory_mib=4096, vms=4)
SPEC = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}


def test_usable_on_its_own_without_the_server_stack() -> None:
    code = (
        "import sys; from server.client import Client; "
        "print(sorted(m for m in ('quart', 'trio', 'hypercorn', 'actors') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


def test_every_operation_typed_against_a_live_server(live_server: LiveServer) -> None:
    with Client(live_server.url, live_server.admin_token) as admin:
        created = admin.create_tenant("acme", QUOTA, token_ttl=3600)
        assert isinstance(created, CreatedTenant)
        assert (created.id, created.quota, created.expires_at is not None) == ("acme", QUOTA, True)
        assert admin.get_tenant("acme") == Tenant(
            id="acme", quota=QUOTA, allocated=Quota(vcpus=0, memory_mib=0, vms=0)
        )
        bigger = Quota(vcpus=16, memory_mib=8192, vms=8)
        assert admin.update_tenant("acme", bigger).quota == bigger
        second = admin.issue_token("acme")
        assert second.token_id.startswith("tok-") and second.expires_at is None
        admin.create_tenant("beta", QUOTA)
        assert [t.id for t in admin.iter_tenants(limit=1)] == ["acme", "beta"]
        assert admin.list_tenants(limit=1).next is not None

    with Client(live_server.url, created.token) as acme:
        vms = [acme.spawn_vm(**SPEC, name=f"web-{i}") for i in range(3)]
        assert all(isinstance(vm, Vm) and vm.tenant == "acme" for vm in vms)
        assert [vm.name for vm in vms] == ["web-0", "web-1", "web-2"]
        assert sorted(vm.id for vm in acme.iter_vms(limit=1)) == sorted(vm.id for vm in vms)
        assert acme.get_vm(vms[0].id).id == vms[0].id
        assert acme.usage() == Usage(
            tenant="acme", quota=bigger, allocated=Quota(vcpus=3, memory_mib=768, vms=3)
        )
        destroyed = acme.destroy_vm(vms[0].id)
        assert (destroyed.id, destroyed.state) == (vms[0].id, "destroyed")

    with Client(live_server.url, live_server.admin_token) as admin:
        admin.revoke_token("acme", second.token_id)
        (old,) = admin.list_keys()
        new = admin.rotate_key()
        assert new.signing and {k.id for k in admin.list_keys()} == {old.id, new.id}
        admin.delete_tenant("beta")
        with pytest.raises(ApiError) as gone:
            admin.get_tenant("beta")
        assert gone.value.code == "not_found"
        page = admin.read_audit(after=0, limit=1000)
        assert isinstance(page, AuditPage)
        ops = [entry["op"] for entry in page.entries]
        assert ops.count("vm.spawn") == 6 and ops[-1] == "tenant.delete"
        assert page.head.seq == page.entries[-1]["seq"] == len(page.entries)
        assert list(admin.iter_audit(after=3, limit=2)) == page.entries[3:]
        admin.retire_key(old.id)

    with (
        Client(live_server.url, second.token) as revoked,
        pytest.raises(ApiError) as refused,
    ):
        revoked.usage()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")


def test_the_proof_methods_typed_against_a_live_server(live_server: LiveServer) -> None:
    with Client(live_server.url, live_server.admin_token) as admin:
        token = admin.create_tenant("acme", QUOTA).token
        admin.create_tenant("beta", QUOTA)
    with Client(live_server.url, token) as acme:
        spawned = acme.send(API.spawn_vm(**SPEC))
        assert spawned.audit_seqs == (3, 4)
        key = Verifier.parse(acme.log_key())
        tree, _ = open_checkpoint(acme.checkpoint(), key)
        assert tree.size == 4
        proof = acme.inclusion_proof(3, tree_size=4)
        assert (proof.seq, proof.leaf_index, proof.tree_size) == (3, 2, 4)
        trail = acme.audit_trail(limit=2)
        assert [e["seq"] for e in trail.entries] == [1, 3] and trail.next == 3
        assert [e["seq"] for e in acme.audit_trail(after=3).entries] == [4]
        leaf = leaf_hash(stored_line(trail.entries[1]))
        hashes = [base64.b64decode(h) for h in proof.hashes]
        assert verify_inclusion(leaf, 2, 4, hashes, tree.root)
        consistency = acme.consistency_proof(2)
        assert (consistency.first, consistency.to) == (2, 4)
        assert acme.consistency_proof(1, 1).hashes == []
        with pytest.raises(ApiError) as foreign:
            acme.inclusion_proof(2)  # beta's creation
        assert (foreign.value.status, foreign.value.code) == (404, "not_found")
    with Client(live_server.url, live_server.admin_token) as admin:
        head = admin.audit_head()
        assert head.seq == 4 and head.checkpoint is not None
        assert open_checkpoint(head.checkpoint, key)[0] == tree
        assert admin.inclusion_proof(2).tree_size == 4


def test_answers_carry_body_and_headers(live_server: LiveServer) -> None:
    with Client(live_server.url, live_server.admin_token) as admin:
        token = admin.create_tenant("acme", QUOTA).token
    with Client(live_server.url, token) as acme:
        operation = API.spawn_vm(**SPEC, idempotency_key="job-1")
        first = acme.send(operation)
        again = acme.send(operation)
    assert first.status == again.status == 201
    assert first.headers["Location"] == f"/v1/vms/{first.value.id}"
    assert not first.replayed and again.replayed
    assert again.value == first.value
    assert json.loads(first.body) == json.loads(again.body)


def test_a_refusal_is_an_api_error_with_its_problem(live_server: LiveServer) -> None:
    with Client(live_server.url, live_server.admin_token) as admin:
        token = admin.create_tenant("acme", Quota(vcpus=1, memory_mib=256, vms=1)).token
        with pytest.raises(ApiError) as missing:
            admin.get_tenant("nobody")
    error = missing.value
    assert not isinstance(error, Unreachable)
    assert (error.status, error.code) == (404, "not_found")
    assert error.problem is not None and error.problem["status"] == 404
    assert set(error.problem) >= {"type", "title", "status", "detail", "code"}
    assert error.detail == error.problem["detail"]
    assert error.request_id
    assert str(error) == f"404 not_found: {error.detail}"

    with Client(live_server.url, token) as acme:
        acme.spawn_vm(**SPEC)
        with pytest.raises(ApiError) as over:
            acme.spawn_vm(**SPEC)
    assert (over.value.status, over.value.code) == (403, "quota_exceeded")


def test_a_5xx_is_a_server_error_and_unreachable(live_server: LiveServer) -> None:
    with Client(live_server.url, live_server.admin_token) as admin:
        admin.create_tenant("acme", QUOTA)
        for path in (live_server.data_dir / "audit").glob("*.jsonl"):
            path.unlink()  # the journal is damaged now: writes answer 503
        with pytest.raises(Unreachable) as failed:
            admin.create_tenant("beta", QUOTA)
    error = failed.value
    assert isinstance(error, ServerError) and isinstance(error, ApiError)
    assert (error.status, error.code) == (503, "audit_unavailable")


def test_nothing_listening_or_a_silent_peer_is_unreachable() -> None:
    with Client("http://127.0.0.1:1", "t") as nowhere, pytest.raises(Unreachable) as refused:
        nowhere.usage()
    assert not isinstance(refused.value, ApiError)
    assert str(refused.value).startswith("cannot reach http://127.0.0.1:1: ")

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with Client(url, "t", timeout=0.2) as slow, pytest.raises(Unreachable) as late:
            slow.usage()
    assert str(late.value).startswith(f"no answer from {url} in time")


# -- answers of something that is not a vm-tenant server ----------------------------------------


def mocked(response: httpx.Response) -> Client:
    return Client("http://proxy.test", "t", transport=httpx.MockTransport(lambda _: response))


@pytest.mark.parametrize(
    ("response", "kind", "message"),
    [
        (
            httpx.Response(502, html="<html><body>Bad Gateway</body></html>"),
            ServerError,
            "502: <html><body>Bad Gateway</body></html>",
        ),
        (httpx.Response(404, text=""), ApiError, "404: Not Found"),
        (httpx.Response(400, json={"error": "nope"}), ApiError, '400: {"error":"nope"}'),
        (
            httpx.Response(302, headers={"Location": "https://login.test/"}),
            Unreachable,
            "http://proxy.test answered 302 (to https://login.test/); is the URL right?",
        ),
        (
            httpx.Response(200, text="<html>hello</html>"),
            Unreachable,
            "http://proxy.test answered GET /v1/usage with a body that is not the API's",
        ),
        (
            httpx.Response(200, json={"tenant": "acme"}),
            Unreachable,
            "Object missing required field `quota`",
        ),
    ],
)
def test_foreign_answers(response: httpx.Response, kind: type[ClientError], message: str) -> None:
    with mocked(response) as client, pytest.raises(ClientError) as failed:
        client.usage()
    assert type(failed.value) is kind
    assert message in str(failed.value)


def test_retry_after_and_audit_seq_are_read() -> None:
    problem = {
        "type": "x",
        "title": "t",
        "status": 429,
        "detail": "slow down",
        "code": "rate_limited",
    }
    headers = {"Retry-After": "7", "Audit-Seq": "12, 13"}
    answer = httpx.Response(429, json=problem, headers=headers)
    with mocked(answer) as client, pytest.raises(ApiError) as limited:
        client.usage()
    assert (limited.value.retry_after, limited.value.audit_seqs) == (7, (12, 13))
    assert str(limited.value) == "429 rate_limited: slow down"


def test_requests_as_sent() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    with Client("http://h.test/prefix/", "tok", transport=httpx.MockTransport(record)) as client:
        client.revoke_token("acme/../acme", "..")
        client.delete_tenant(".")
        client.retire_key("a?b#c%d")
    assert [request.url.raw_path for request in seen] == [
        b"/prefix/v1/admin/tenants/acme%2F..%2Facme/tokens/%2E%2E",
        b"/prefix/v1/admin/tenants/%2E",
        b"/prefix/v1/admin/keys/a%3Fb%23c%25d",
    ]
    assert {request.headers["Authorization"] for request in seen} == {"Bearer tok"}
    assert seen[0].headers["User-Agent"].startswith("vm-tenant/")


# -- what cannot be sent -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("vm-0123", "vm-0123"),
        ("acme/../acme", "acme%2F..%2Facme"),
        ("acme?x=1", "acme%3Fx%3D1"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("...", "..."),
        ("%2E%2E", "%252E%252E"),
        ("caf\u00e9 x", "caf%C3%A9%20x"),
    ],
)
def test_segment(value: str, expected: str) -> None:
    assert segment(value) == expected


@pytest.mark.parametrize(
    "build",
    [
        lambda: Client("localhost:8080"),
        lambda: Client("ftp://h.test"),
        lambda: Client("http://h.test", "has space"),
        lambda: Client("http://h.test", "caf\u00e9"),
        lambda: API.get_vm(""),
        lambda: API.spawn_vm(**SPEC, idempotency_key=" leading"),
        lambda: API.spawn_vm(**SPEC, idempotency_key="x" * 256),
        lambda: API.spawn_vm(**SPEC, idempotency_key="caf\u00e9"),
    ],
)
def test_what_cannot_be_sent_is_a_value_error(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]
