"""A real server whose data dir is on a really full file system (``tests/full_disk.py``).

``vm-tenant serve`` runs inside the tmpfs's mount namespace with its data dir on the
tmpfs; the test fills it while the server serves, then frees it again, and watches from
outside what API.md v1.1 ("Faults, clarified") promises: ``/readyz`` is 503 while audit
writes fail and 200 again once they succeed, without traffic; a spawn whose ``requested``
entry is durable and that the fleet confirmed answers 201 even if its outcome cannot be
written yet, and only an operation that reached nothing answers 503
``audit_unavailable``.

The embedded fleet keeps its journal under ``<data-dir>/fleet``; here that is a link to a
directory outside the tmpfs, since a fleet is another machine whose disk does not fill
with the proxy's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import UNLIMITED, LiveServer, Provision, bearer, vm_tenant
from fleet_server import FleetServer
from full_disk import FullTmpfs

SPEC = {"vcpus": 1, "memory_mib": 64, "image": "debian-12"}
ROOMY = {"vcpus": 1000, "memory_mib": 1_000_000, "vms": 1000}
GUARD = 60


class Rig:
    """The tmpfs, the server on it, and a view of its data dir from outside."""

    def __init__(self, tmpfs: FullTmpfs, server: LiveServer) -> None:
        self.tmpfs = tmpfs
        self.server = server

    @property
    def data(self) -> Path:
        return self.tmpfs.view(self.server.data_dir)

    @property
    def admin(self) -> dict[str, str]:
        return bearer((self.data / "admin.token").read_text().strip())

    def free(self) -> None:
        (self.tmpfs.view() / ".fill").unlink()

    def entries(self) -> list[dict[str, Any]]:
        lines: list[bytes] = []
        for segment in sorted((self.data / "audit").glob("*.jsonl")):
            lines.extend(segment.read_bytes().splitlines())
        return [json.loads(line) for line in lines]

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.server.log if re.search(pattern, line))


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    env: dict[str, str] = getattr(request, "param", {})
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    with FullTmpfs(tmp_path / "mnt", size="1m") as tmpfs:
        data = tmpfs.mountpoint / "data"
        tmpfs.view(data).mkdir(mode=0o700)
        tmpfs.view(data / "fleet").symlink_to(fleet)
        server = LiveServer(
            data,
            env={**UNLIMITED, **env},
            prefix=tmpfs.command([]),
            args=["--log-level", "debug", "--log-format", "json"],
        )
        try:
            yield Rig(tmpfs, server.start())
        finally:
            server.kill()


def problem(response: httpx.Response) -> tuple[int, str | None]:
    code = response.json().get("code") if response.status_code >= 400 else None
    return response.status_code, code


async def test_readyz_is_503_while_writes_fail_and_200_once_they_succeed(
    rig: Rig, provision: Provision
) -> None:
    async with rig.server.client() as client:
        token = (await provision(client, rig.admin, "acme", ROOMY)).token
        assert (await client.post("/v1/vms", json=SPEC, headers=bearer(token))).status_code == 201
        assert (await client.get("/readyz")).status_code == 200

        rig.tmpfs.fill()
        # The segment's last page may still take a few lines: spawn until a write fails.
        answers: list[tuple[int, str | None]] = []
        while (await client.get("/readyz")).status_code == 200:
            assert len(answers) < 50, answers
            spawn = await client.post("/v1/vms", json=SPEC, headers=bearer(token))
            answers.append(problem(spawn))
        assert answers and set(answers) <= {(201, None), (503, "audit_unavailable")}, answers

        # Cutting the failed batch off needs no space: the writer's own repair succeeds on
        # a full disk, and must not make /readyz say the log takes writes again.
        failed_probes = rig.count("audit log still not writable")
        with trio.fail_after(GUARD):
            while rig.count("audit log still not writable") < failed_probes + 2:
                await trio.sleep(0.1)
        ready = await client.get("/readyz")
        assert problem(ready) == (503, "audit_unavailable")
        assert ready.headers["Retry-After"] == "1"
        refused = await client.post("/v1/vms", json=SPEC, headers=bearer(token))
        assert problem(refused) == (503, "audit_unavailable")

        rig.free()
        # No write is needed: the writer's probe finds the room.
        with trio.fail_after(GUARD):
            while (await client.get("/readyz")).status_code != 200:
                await trio.sleep(0.1)
        assert (await client.post("/v1/vms", json=SPEC, headers=bearer(token))).status_code == 201
    result = vm_tenant("audit", "verify", "--data-dir", str(rig.data))
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.path.islink(rig.data / "fleet")


async def test_spawns_while_the_disk_fills_answer_what_happened(
    tmp_path: Path, fleet: FleetServer, provision: Provision
) -> None:
    """25 spawns, the data dir full mid-way, and the fleet asked directly what it holds."""
    count, in_flight = 25, 15
    with FullTmpfs(tmp_path / "mnt", size="1m") as tmpfs:
        server = LiveServer(
            tmpfs.mountpoint / "data",
            env={**UNLIMITED, "VM_TENANT_FLEET": fleet.url},
            prefix=tmpfs.command([]),
        )
        try:
            rig = Rig(tmpfs, server.start())
            async with server.client() as client, httpx.AsyncClient(base_url=fleet.url) as ctl:
                token = (await provision(client, rig.admin, "acme", ROOMY)).token
                # The fleet holds each call for a while, so that spawns are at the fleet
                # (their `requested` entry durable) when the disk fills.
                knobs = await ctl.post("/_knobs", json={"latency": 2.0})
                assert knobs.status_code == 200
                answers: dict[int, httpx.Response] = {}

                async def spawn(n: int) -> None:
                    answers[n] = await client.post("/v1/vms", json=SPEC, headers=bearer(token))

                async with trio.open_nursery() as nursery:
                    for n in range(count):
                        nursery.start_soon(spawn, n)
                        if n + 1 == in_flight:
                            with trio.fail_after(GUARD):
                                while (await ctl.get("/_stats")).json()["in_flight"] < in_flight:
                                    await trio.sleep(0.05)
                            rig.tmpfs.fill()
                        await trio.sleep(0.02)
                kinds = [problem(answers[n]) for n in range(count)]
                assert set(kinds) <= {(201, None), (503, "audit_unavailable")}, kinds
                created = {r.json()["id"] for r in answers.values() if r.status_code == 201}
                # The fleet holds exactly the VMs answered 201: none answered 503 exists.
                held = (await ctl.get("/_vms", params={"tenant": "acme"})).json()["vms"]
                assert len(held) >= in_flight
                assert {vm["id"] for vm in held} == created, kinds
                listed = await client.get("/v1/vms?limit=1000", headers=bearer(token))
                assert {vm["id"] for vm in listed.json()["vms"]} == created
                assert (await client.get("/readyz")).status_code == 503

                rig.free()
                with trio.fail_after(GUARD):
                    while (await client.get("/readyz")).status_code != 200:
                        await trio.sleep(0.1)
                    while True:
                        settled = {
                            e["vm"]: e
                            for e in rig.entries()
                            if e["op"] == "vm.spawn" and e["outcome"] == "succeeded"
                        }
                        if created <= settled.keys():
                            break
                        await trio.sleep(0.1)
                late = [e for e in settled.values() if e["source"]["token_id"] == "system"]
                assert late, "some outcomes could not be written while the disk was full"
                assert all(e["source"] == {"ip": None, "token_id": "system"} for e in late)
                assert all(e["detail"]["resolution"] == "recorded_late" for e in late)
                spawned = [e for e in rig.entries() if e["op"] == "vm.spawn"]
                assert [e["outcome"] for e in spawned].count("requested") == len(created)
                listed = await client.get("/v1/vms?limit=1000", headers=bearer(token))
                states = {vm["id"]: vm["state"] for vm in listed.json()["vms"]}
                assert states.keys() == created
                assert set(states.values()) <= {"pending", "running"}, states
                usage = (await client.get("/v1/usage", headers=bearer(token))).json()
                assert usage["allocated"]["vms"] == len(created)
            result = vm_tenant("audit", "verify", "--data-dir", str(rig.data))
            assert result.returncode == 0, result.stdout + result.stderr
        finally:
            server.kill()
