"""Outside-in API fuzzing: Schemathesis against a live ``vm-tenant serve``.

Schemathesis reads the server's own ``/openapi.json`` and runs every check over every
operation it lists, positive and negative data, in its coverage, fuzzing and stateful
phases (settings in ``tests/fuzz/schemathesis.toml``). A failure prints Schemathesis'
report, which carries a ``curl`` line for each failing request.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import LiveServer, bearer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "fuzz" / "schemathesis.toml"
ST = Path(sys.executable).with_name("st")
#: the tenant the fuzzer spawns VMs as; its quota bounds how many can exist at once
FUZZ_TENANT = "fuzz-7c1e"
FUZZ_QUOTA = {"vcpus": 64, "memory_mib": 65536, "vms": 3}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def test_schemathesis_finds_nothing(live_server: LiveServer) -> None:
    admin = bearer(live_server.admin_token)
    with httpx.Client(base_url=live_server.url, timeout=30.0) as client:
        created = client.post(
            "/v1/admin/tenants", json={"id": FUZZ_TENANT, "quota": FUZZ_QUOTA}, headers=admin
        )
        assert created.status_code == 201, created.text
        document = client.get("/openapi.json").json()
    operations = sum(len(METHODS & set(item)) for item in document["paths"].values())
    env = {
        **os.environ,
        "VM_TENANT_FUZZ_ADMIN_TOKEN": live_server.admin_token,
        "VM_TENANT_FUZZ_TENANT_TOKEN": created.json()["token"],
    }

    run = subprocess.run(
        [str(ST), "--config-file", str(CONFIG), "run", f"{live_server.url}/openapi.json",
         "--no-color"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a guard against a hang only
    )  # fmt: skip

    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    # Every operation the server describes was selected and exercised.
    assert f"Selected: {operations}/{operations}" in report, report
    assert re.search(rf"Tested: {operations}\b", report), report
    assert "unhandled error" not in "".join(live_server.log)
    with httpx.Client(base_url=live_server.url, timeout=30.0) as client:
        usage = client.get(f"/v1/admin/tenants/{FUZZ_TENANT}", headers=admin)
    assert usage.status_code == 200, usage.text
    assert usage.json()["allocated"]["vms"] <= FUZZ_QUOTA["vms"]
