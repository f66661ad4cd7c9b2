"""Every client command of ``vm-tenant`` against a real ``vm-tenant serve`` on 127.0.0.1.

The commands run in-process through click's ``CliRunner`` (real HTTP to the server
subprocess) and, where the process itself matters (exit status, the installed entry
point, options after arguments), as the installed ``vm-tenant`` script. Each answer is
compared with what the HTTP API itself says, or with the stored audit lines.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from conftest import VM_TENANT, LiveServer, audit_lines, bearer, vm_tenant
from server.cli.main import cli

QUOTA = ["--vcpus", "8", "--memory-mib", "16384", "--vms", "4"]
SPEC = ["--vcpus", "1", "--memory-mib", "256", "--image", "debian-12"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VM_TENANT_"):
            monkeypatch.delenv(name)


def admin(server: LiveServer, *args: str) -> Result:
    """An admin command, the connection options after its arguments."""
    where = ["--url", server.url, "--data-dir", str(server.data_dir)]
    return CliRunner().invoke(cli, [*args, *where], prog_name="vm-tenant")


def tenant(server: LiveServer, token: str, *args: str) -> Result:
    """A tenant command with its token from ``VM_TENANT_TOKEN``."""
    env = {"VM_TENANT_TOKEN": token, "VM_TENANT_URL": server.url}
    return CliRunner().invoke(cli, list(args), env=env, prog_name="vm-tenant")


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result


def document(result: Result) -> Any:
    """The one JSON document on stdout (``json.loads`` refuses anything after it)."""
    return json.loads(ok(result).stdout)


def refused(result: Result, status: int, code: str, output: str = "text") -> str:
    """Exit 1, one line naming the problem on stderr; its detail. On stdout nothing, or
    with ``-o json`` the problem document the server answered."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    if output == "json":
        problem = json.loads(result.stdout)
        assert (problem["status"], problem["code"]) == (status, code), problem
    else:
        assert result.stdout == ""
    prefix = f"vm-tenant: {status} {code}: "
    assert result.stderr.startswith(prefix) and result.stderr.count("\n") == 1, result.stderr
    return result.stderr.removeprefix(prefix).strip()


def api(server: LiveServer, path: str, token: str | None = None) -> Any:
    """What the HTTP API itself answers to ``GET path``."""
    response = httpx.get(server.url + path, headers=bearer(token or server.admin_token))
    assert response.status_code == 200, response.text
    return response.json()


# -- the operator's commands -------------------------------------------------------------------


def test_tenant_commands_in_text_and_json(live_server: LiveServer) -> None:
    created = ok(admin(live_server, "tenant", "create", "acme", *QUOTA))
    token = created.stdout.strip()
    assert created.stdout == token + "\n"
    assert created.stderr.startswith("created tenant acme (token id tok-")
    assert api(live_server, "/v1/usage", token)["tenant"] == "acme"

    beta = document(admin(live_server, "tenant", "create", "beta", *QUOTA, "-o", "json"))
    assert set(beta) == {"id", "quota", "token", "token_id", "expires_at"}
    assert beta["quota"] == {"vcpus": 8, "memory_mib": 16384, "vms": 4}

    shown = ok(admin(live_server, "tenant", "get", "acme")).stdout
    assert shown.splitlines() == [
        "ID\tQUOTA vcpus/memory_mib/vms\tALLOCATED vcpus/memory_mib/vms",
        "acme\t8/16384/4\t0/0/0",
    ]
    assert document(admin(live_server, "tenant", "get", "acme", "-o", "json")) == api(
        live_server, "/v1/admin/tenants/acme"
    )

    update = ["tenant", "update", "acme", "--vcpus", "16", "--memory-mib", "1", "--vms", "2"]
    updated = document(admin(live_server, *update, "-o", "json"))
    assert updated["quota"] == {"vcpus": 16, "memory_mib": 1, "vms": 2}
    assert api(live_server, "/v1/admin/tenants/acme") == updated
    assert ok(admin(live_server, *update)).stdout.splitlines()[1] == "acme\t16/1/2\t0/0/0"

    ok(admin(live_server, "tenant", "create", "gamma", *QUOTA))
    listed = ok(admin(live_server, "tenant", "list", "--limit", "1")).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed[1:]] == ["acme", "beta", "gamma"]
    joined = document(admin(live_server, "tenant", "list", "--limit", "2", "-o", "json"))
    everything = api(live_server, "/v1/admin/tenants?limit=1000")
    assert joined == {"tenants": everything["tenants"], "next": None}

    assert ok(admin(live_server, "tenant", "delete", "gamma", "-o", "json")).stdout == "{}\n"
    deleted = ok(admin(live_server, "tenant", "delete", "beta")).stdout
    assert deleted == "deleted tenant beta\n"
    refused(admin(live_server, "tenant", "get", "beta"), 404, "not_found")
    listed = ok(admin(live_server, "tenant", "list")).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed[1:]] == ["acme"]


def test_token_and_key_commands(live_server: LiveServer) -> None:
    first = ok(admin(live_server, "tenant", "create", "acme", *QUOTA)).stdout.strip()
    issued = ok(admin(live_server, "token", "issue", "acme", "--ttl", "600"))
    second = issued.stdout.strip()
    assert issued.stderr.startswith("issued token id tok-") and "expires" in issued.stderr
    third = document(admin(live_server, "token", "issue", "acme", "-o", "json"))
    assert set(third) == {"token", "token_id", "expires_at"} and third["expires_at"] is None
    for token in (first, second, third["token"]):
        assert api(live_server, "/v1/usage", token)["tenant"] == "acme"

    revoked = admin(live_server, "token", "revoke", "acme", third["token_id"], "-o", "json")
    assert ok(revoked).stdout == "{}\n"
    response = httpx.get(live_server.url + "/v1/usage", headers=bearer(third["token"]))
    assert response.status_code == 401
    refused(admin(live_server, "token", "revoke", "acme", third["token_id"]), 404, "not_found")

    keys = document(admin(live_server, "keys", "list", "-o", "json"))
    assert keys == api(live_server, "/v1/admin/keys")
    (old,) = keys["keys"]
    new = ok(admin(live_server, "keys", "rotate")).stdout.strip()
    table = ok(admin(live_server, "keys", "list")).stdout.splitlines()
    assert table[0].split("\t") == ["ID", "CREATED", "STATE"]
    states = {line.split("\t")[0]: line.split("\t")[2] for line in table[1:]}
    assert states == {old["id"]: "active", new: "signing"}
    detail = refused(admin(live_server, "keys", "retire", new), 409, "conflict")
    assert "rotate first" in detail
    assert ok(admin(live_server, "keys", "retire", old["id"], "-o", "json")).stdout == "{}\n"
    assert httpx.get(live_server.url + "/v1/usage", headers=bearer(first)).status_code == 401


def test_audit_list_and_head(live_server: LiveServer) -> None:
    ok(admin(live_server, "tenant", "create", "acme", *QUOTA))
    for _ in range(3):
        ok(admin(live_server, "token", "issue", "acme"))
    stored = [line.decode() for line in audit_lines(live_server.data_dir)]
    assert len(stored) == 4

    listed = ok(admin(live_server, "audit", "list", "--limit", "3")).stdout
    assert listed == "".join(line + "\n" for line in stored)  # byte for byte, across pages
    later = ok(admin(live_server, "audit", "list", "--after", "2")).stdout
    assert later.splitlines() == stored[2:]
    joined = document(admin(live_server, "audit", "list", "--limit", "1", "-o", "json"))
    last = json.loads(stored[-1])
    assert joined == {
        "entries": [json.loads(line) for line in stored],
        "head": {"seq": 4, "hash": last["hash"]},
    }
    assert ok(admin(live_server, "audit", "list", "--after", "4")).stdout == ""

    # The head is signed by the next checkpoint: a shutdown writes one.
    assert live_server.stop() == 0
    live_server.start()
    head = ok(admin(live_server, "audit", "head")).stdout
    assert head == f"4:{last['hash']}\n"
    signed = document(admin(live_server, "audit", "head", "-o", "json"))
    assert signed == api(live_server, "/v1/admin/audit/head")
    assert {"seq", "hash", "ts", "signature"} <= set(signed)
    data_dir = str(live_server.data_dir)
    verified = vm_tenant("audit", "verify", "--data-dir", data_dir, "--expect-head", head.strip())
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"intact: 4 entries, head {head.strip()}")


# -- the tenant's commands ---------------------------------------------------------------------


def test_vm_commands_in_text_and_json(live_server: LiveServer) -> None:
    token = ok(admin(live_server, "tenant", "create", "acme", *QUOTA)).stdout.strip()

    spawned = ok(tenant(live_server, token, "vm", "spawn", *SPEC, "--name", "web-1"))
    first = spawned.stdout.strip()
    assert spawned.stdout == first + "\n" and first.startswith("vm-")
    assert spawned.stderr.startswith(f"spawned {first} (")

    by_flag = ["vm", "spawn", *SPEC, "--token", token, "--url", live_server.url, "-o", "json"]
    second = document(CliRunner().invoke(cli, by_flag))
    assert second["tenant"] == "acme" and second["name"] is None

    keyed = ["vm", "spawn", *SPEC, "--idempotency-key", "job-7", "-o", "json"]
    third = document(tenant(live_server, token, *keyed))
    assert document(tenant(live_server, token, *keyed)) == third  # replayed, not spawned
    replay = ok(tenant(live_server, token, *keyed[:-2]))
    assert replay.stdout == f"{third['id']}\n"
    assert "earlier spawn with this key" in replay.stderr

    everything = api(live_server, "/v1/vms", token)["vms"]
    assert sorted(vm["id"] for vm in everything) == sorted([first, second["id"], third["id"]])
    joined = document(tenant(live_server, token, "vm", "list", "--limit", "1", "-o", "json"))
    assert [vm["id"] for vm in joined["vms"]] == [vm["id"] for vm in everything]
    assert joined["next"] is None
    rows = ok(tenant(live_server, token, "vm", "list", "--limit", "2")).stdout.splitlines()
    assert rows[0].split("\t") == ["ID", "STATE", "VCPUS", "MEMORY_MIB", "IMAGE", "NAME", "CREATED"]
    assert sorted(row.split("\t")[0] for row in rows[1:]) == sorted(vm["id"] for vm in everything)
    web = next(row.split("\t") for row in rows[1:] if row.startswith(first))
    assert web[2:6] == ["1", "256", "debian-12", "web-1"]

    one = document(tenant(live_server, token, "vm", "get", first, "-o", "json"))
    assert {k: v for k, v in one.items() if k != "state"} == {
        k: v for k, v in api(live_server, f"/v1/vms/{first}", token).items() if k != "state"
    }
    assert (
        ok(tenant(live_server, token, "vm", "get", first))
        .stdout.splitlines()[1]
        .startswith(f"{first}\t")
    )

    used = document(tenant(live_server, token, "usage", "-o", "json"))
    assert used == api(live_server, "/v1/usage", token)
    assert used["allocated"] == {"vcpus": 3, "memory_mib": 768, "vms": 3}
    assert (
        ok(tenant(live_server, token, "usage")).stdout.splitlines()[1] == "acme\t8/16384/4\t3/768/3"
    )

    gone = document(tenant(live_server, token, "vm", "destroy", first, "-o", "json"))
    assert gone == {"id": first, "state": "destroyed"}
    destroyed = ok(tenant(live_server, token, "vm", "destroy", second["id"]))
    assert destroyed.stdout == f"destroyed {second['id']}\n"
    refused(tenant(live_server, token, "vm", "get", first), 404, "not_found")
    assert api(live_server, "/v1/usage", token)["allocated"]["vms"] == 1


# -- exit codes --------------------------------------------------------------------------------


def test_refusals_exit_1_and_name_the_problem(live_server: LiveServer) -> None:
    token = ok(admin(live_server, "tenant", "create", "acme", *QUOTA)).stdout.strip()
    for output in ("text", "json"):
        again = admin(live_server, "tenant", "create", "acme", *QUOTA, "-o", output)
        assert "already exists" in refused(again, 409, "conflict", output)
        big = ["vm", "spawn", "--vcpus", "9", "--memory-mib", "1", "--image", "x", "-o", output]
        exceeded = refused(tenant(live_server, token, *big), 403, "quota_exceeded", output)
        assert "vcpus" in exceeded
        wrong = CliRunner().invoke(
            cli, ["tenant", "list", "--url", live_server.url, "--admin-token", "nope", "-o", output]
        )
        refused(wrong, 401, "unauthorized", output)
        as_tenant = ["tenant", "get", "acme", "--url", live_server.url, "--admin-token", token]
        refused(CliRunner().invoke(cli, as_tenant), 403, "forbidden")
        refused(
            tenant(live_server, token, "vm", "destroy", "vm-nope", "-o", output),
            404,
            "not_found",
            output,
        )

    ok(tenant(live_server, token, "vm", "spawn", *SPEC))
    assert "VMs" in refused(admin(live_server, "tenant", "delete", "acme"), 409, "conflict")
    process = vm_tenant(
        "tenant", "create", "acme", *QUOTA, "--url", live_server.url, "--data-dir",
        str(live_server.data_dir),
    )  # fmt: skip
    assert process.returncode == 1 and process.stdout == ""
    assert process.stderr.startswith("vm-tenant: 409 conflict: ")


@pytest.mark.parametrize(
    "live_server", [{"VM_TENANT_RATE_LIMIT": "0.001", "VM_TENANT_RATE_BURST": "1"}], indirect=True
)
def test_a_429_says_when_to_retry(live_server: LiveServer) -> None:
    token = ok(admin(live_server, "tenant", "create", "acme", *QUOTA)).stdout.strip()
    ok(tenant(live_server, token, "usage"))  # the one request of the burst
    detail = refused(tenant(live_server, token, "usage"), 429, "rate_limited")
    assert re.search(r"\(retry after [1-9][0-9]* s\)$", detail), detail


def test_a_5xx_is_exit_3(live_server: LiveServer) -> None:
    ok(admin(live_server, "tenant", "create", "acme", *QUOTA))
    # A segment removed under the writer: every write now answers 503 audit_unavailable.
    for segment in (live_server.data_dir / "audit").glob("*.jsonl"):
        segment.unlink()
    for output in ("text", "json"):
        process = vm_tenant(
            "tenant", "create", f"beta-{output}", *QUOTA, "-o", output, "--url", live_server.url,
            "--data-dir", str(live_server.data_dir),
        )  # fmt: skip
        assert process.returncode == 3, process.stderr
        if output == "json":  # the answer body: the problem document
            assert json.loads(process.stdout)["code"] == "audit_unavailable"
        else:
            assert process.stdout == ""
        assert process.stderr.startswith("vm-tenant: 503 audit_unavailable: ")


# -- arguments in the URL path -----------------------------------------------------------------


def test_path_arguments_cannot_address_another_resource(live_server: LiveServer) -> None:
    where = ["--url", live_server.url, "--data-dir", str(live_server.data_dir)]
    token = ok(admin(live_server, "tenant", "create", "acme", *QUOTA)).stdout.strip()
    ok(admin(live_server, "tenant", "create", "beta", *QUOTA))

    dotted = vm_tenant("token", "issue", "acme/../acme", *where)
    assert dotted.returncode == 1 and dotted.stdout == ""
    assert dotted.stderr.startswith(("vm-tenant: 404 not_found: ", "vm-tenant: 400 "))
    query = vm_tenant("token", "issue", "acme?x=1", *where)
    assert query.returncode == 1 and query.stdout == ""
    assert query.stderr.startswith("vm-tenant: 404 not_found: ")

    # ".." would be dropped as a dot segment on the way: DELETE .../acme/tokens/.. is a
    # DELETE of the tenant itself unless it travels as one encoded segment.
    for token_id in ("..", ".", "../../beta", "x%2F..%2F..%2Fbeta"):
        refused(admin(live_server, "token", "revoke", "acme", token_id), 404, "not_found")
    for tenant_id in ("..", ".", "acme/..", "beta/tokens/x"):
        assert admin(live_server, "tenant", "delete", tenant_id).exit_code == 1
    for vm_id in ("..", ".", "../usage"):
        assert tenant(live_server, token, "vm", "destroy", vm_id).exit_code == 1

    assert ok(admin(live_server, "tenant", "get", "acme")).stdout.splitlines()[1].startswith("acme")
    assert ok(admin(live_server, "tenant", "get", "beta")).stdout.splitlines()[1].startswith("beta")
    assert api(live_server, "/v1/usage", token)["tenant"] == "acme"
    # Each destroy reached the VM route as one id nobody owns, audited as rejected (the
    # encoded slash of "../usage" included).
    entries = [json.loads(line) for line in audit_lines(live_server.data_dir)]
    assert [e["op"] for e in entries] == ["tenant.create"] * 2 + ["vm.destroy"] * 3
    assert [(e["vm"], e["outcome"]) for e in entries[2:]] == [
        ("..", "rejected"),
        (".", "rejected"),
        ("../usage", "rejected"),
    ]


# -- the process: entry point, options after arguments -----------------------------------------


def test_installed_command_with_options_after_arguments(live_server: LiveServer) -> None:
    admin_token = live_server.admin_token
    created = vm_tenant(
        "tenant", "create", "acme", "--vcpus", "2", "--url", live_server.url, "--memory-mib",
        "512", "-o", "json", "--vms", "2", "--admin-token", admin_token,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    spawned = vm_tenant(
        "vm", "spawn", *SPEC, "-o", "json", "--token", token, "--url", live_server.url
    )
    assert spawned.returncode == 0, spawned.stderr
    vm = json.loads(spawned.stdout)
    env = {"VM_TENANT_URL": live_server.url, "VM_TENANT_TOKEN": token}
    got = vm_tenant("vm", "get", vm["id"], "-o", "json", env=env)
    assert got.returncode == 0 and json.loads(got.stdout)["id"] == vm["id"]
    env_admin = {"VM_TENANT_URL": live_server.url, "VM_TENANT_ADMIN_TOKEN": admin_token}
    listed = vm_tenant(
        "tenant", "list", "-o", "json", env={**env_admin, "VM_TENANT_OUTPUT": "text"}
    )
    assert json.loads(listed.stdout)["tenants"][0]["allocated"]["vms"] == 1  # the flag wins
    as_text = vm_tenant("tenant", "list", env={**env_admin, "VM_TENANT_OUTPUT": "text"})
    assert as_text.stdout.splitlines()[1] == "acme\t2/512/2\t1/256/1"


def test_tables_are_aligned_on_a_terminal(live_server: LiveServer) -> None:
    ok(admin(live_server, "tenant", "create", "acme", *QUOTA))
    ok(admin(live_server, "tenant", "create", "a-much-longer-name", *QUOTA))
    controller, terminal = pty.openpty()
    where = ["--url", live_server.url, "--data-dir", str(live_server.data_dir)]
    try:
        result = subprocess.run(
            [str(VM_TENANT), "tenant", "list", *where], stdout=terminal, stderr=subprocess.PIPE
        )
    finally:
        os.close(terminal)
    shown = b""
    try:
        while chunk := os.read(controller, 4096):
            shown += chunk
    except OSError:  # EIO: the terminal's other end is closed and drained
        pass
    finally:
        os.close(controller)
    assert result.returncode == 0, result.stderr
    assert shown.decode().replace("\r\n", "\n").splitlines() == [
        "ID                  QUOTA vcpus/memory_mib/vms  ALLOCATED vcpus/memory_mib/vms",
        "a-much-longer-name  8/16384/4                   0/0/0",
        "acme                8/16384/4                   0/0/0",
    ]
