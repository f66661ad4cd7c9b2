"""Races and fault windows found in review, each pinned by a test.

- an audit entry that cannot be encoded fails alone and never stops the writer;
- an outcome that cannot be made durable is neither applied nor acknowledged: the VM
  stays ``unknown`` and the reconciler settles it, so a restart agrees with memory;
- racing quota changes end as the log says;
- commands racing a tenant's deletion never answer 500;
- a destroyed VM id is never re-created by a late or repeated spawn;
- a torn checkpoint line is cut instead of poisoning later appends.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors.errors import AuditUnavailable, FleetError
from actors.fleet.embedded import EmbeddedFleet
from actors.journal.checkpoint import CheckpointSigner, checkpoints_path, read_checkpoints
from actors.journal.verify import verify_data_dir
from actors.reply import Reply
from actors.service import Service, open_service
from actors.state import Quota, VmSpec
from actors.tenants.protocol import GetUsage, ListVms, Source, Spawn, UpdateQuota
from conftest import Api, audit_lines, service_config
from server.app import create_app
from server.auth import Authority

ADMIN = Source("127.0.0.1", "admin")
USER = Source("127.0.0.1", "tok-user")
SPEC = VmSpec(1, 256, "debian-12", None)


def fleet_of(service: Service) -> EmbeddedFleet:
    driver = service.fleet.driver
    assert isinstance(driver, EmbeddedFleet)
    return driver


async def spawn(service: Service) -> Any:
    return await service.registry.call(
        "acme", lambda reply: Spawn(SPEC, None, None, USER, "req", reply)
    )


async def test_unencodable_entry_fails_alone(data_dir: Path) -> None:
    async with open_service(service_config(data_dir)) as service:
        bad = service.audit.submit(
            op="vm.spawn", outcome="failed", tenant="acme", vm="vm-x",
            source=USER.to_json(), request_id="r", detail={"reason": "bad \ud800 text"},
        )  # fmt: skip
        with pytest.raises(AuditUnavailable):
            await bad.wait()
        await service.registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "r")
        assert service.audit.healthy
    lines = audit_lines(data_dir)
    assert [json.loads(line)["op"] for line in lines] == ["tenant.create"]


class FailNthFsync:
    """Real fsyncs, except that call number ``n`` (counted from arming) raises EIO."""

    def __init__(self) -> None:
        self.countdown = -1

    def __call__(self, fd: int) -> None:
        if self.countdown == 0:
            self.countdown = -1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.countdown > 0:
            self.countdown -= 1
        os.fsync(fd)


async def test_unrecorded_outcome_is_not_acknowledged_and_restart_agrees(
    autojump_clock: trio.testing.MockClock, data_dir: Path
) -> None:
    config = service_config(data_dir, inline_io=True)
    async with open_service(config) as service:
        await service.registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "r")
        fsync = FailNthFsync()
        service.audit._fsync = fsync
        fleet_of(service).knobs.fail_next = 1  # the fleet refuses the spawn...
        fsync.countdown = 1  # ...and the fsync of that `failed` outcome fails
        with pytest.raises(AuditUnavailable):
            await spawn(service)
        # Not released, not acknowledged as failed: in doubt, still counted.
        usage = await service.registry.call("acme", GetUsage)
        assert usage["allocated"]["vms"] == 1
        # The reconciler repeats the spawn; the fleet takes it this time.
        with trio.fail_after(120):
            while True:
                page, _ = await service.registry.call("acme", lambda r: ListVms(None, 10, r))
                if page[0]["state"] in ("pending", "running"):
                    break
                await trio.sleep(0.5)
        live = (page, await service.registry.call("acme", GetUsage))
        assert fleet_of(service).vm_ids() == {page[0]["id"]}
    outcomes = [
        (e["op"], e["outcome"], e["source"]["token_id"])
        for e in map(json.loads, audit_lines(data_dir))
        if e["op"] == "vm.spawn"
    ]
    assert outcomes == [
        ("vm.spawn", "requested", USER.token_id),
        ("vm.spawn", "succeeded", "system"),
    ]
    async with open_service(config) as service:
        page, _ = await service.registry.call("acme", lambda r: ListVms(None, 10, r))
        assert (page, await service.registry.call("acme", GetUsage)) == live


async def test_racing_quota_changes_end_as_the_log_says(data_dir: Path) -> None:
    config = service_config(data_dir)
    async with open_service(config) as service:
        await service.registry.create_tenant("acme", Quota(1, 1, 1), ADMIN, "r")
        for round_ in range(10):
            async with trio.open_nursery() as nursery:
                for n in range(4):
                    quota = Quota(100 * round_ + n, 1024, 4)
                    nursery.start_soon(
                        service.registry.call,
                        "acme",
                        lambda reply, q=quota: UpdateQuota(q, ADMIN, "r", reply),
                    )
        live = (await service.registry.call("acme", GetUsage))["quota"]
    updates = [e for e in map(json.loads, audit_lines(data_dir)) if e["op"] == "tenant.update"]
    assert live == updates[-1]["detail"]["quota"]
    async with open_service(config) as service:
        assert (await service.registry.call("acme", GetUsage))["quota"] == live


async def test_commands_racing_tenant_deletion_never_answer_500(data_dir: Path) -> None:
    async with open_service(service_config(data_dir)) as service:
        api = Api(
            create_app(service, Authority.for_data_dir(data_dir)).test_client(),
            service,
            (data_dir / "admin.token").read_text().strip(),
        )
        statuses: list[int] = []
        for round_ in range(8):
            tenant = f"t{round_}"
            token = await api.create_tenant(tenant)

            async def record(coro: Any) -> None:
                statuses.append((await coro).status_code)

            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(
                        record,
                        api.client.patch(
                            f"/v1/admin/tenants/{tenant}",
                            json={"quota": {"vcpus": n, "memory_mib": 1, "vms": 1}},
                            headers=api.admin,
                        ),
                    )
                    nursery.start_soon(
                        record,
                        api.client.delete(f"/v1/vms/vm-{n:032x}", headers={"Authorization": token}),
                    )
                nursery.start_soon(
                    record, api.client.delete(f"/v1/admin/tenants/{tenant}", headers=api.admin)
                )
        assert 500 not in statuses
        assert set(statuses) <= {200, 204, 401, 404, 409, 429}
        assert statuses.count(204) == 8


async def test_destroyed_ids_are_never_recreated(tmp_path: Path) -> None:
    fleet = EmbeddedFleet(tmp_path, boot_seconds=0)
    await fleet.spawn("vm-a", "acme", SPEC)
    await fleet.destroy("vm-a")
    with pytest.raises(FleetError):
        await fleet.spawn("vm-a", "acme", SPEC)
    await fleet.aclose()
    reopened = EmbeddedFleet(tmp_path, boot_seconds=0)  # the tombstone survives a restart
    with pytest.raises(FleetError):
        await reopened.spawn("vm-a", "acme", SPEC)
    assert reopened.vm_ids() == set()
    await reopened.aclose()


async def test_torn_checkpoint_line_is_cut_on_open(data_dir: Path) -> None:
    async with open_service(service_config(data_dir)) as service:
        await service.registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "r")
    path = checkpoints_path(data_dir)
    with path.open("ab") as f:
        f.write(b'{"seq": 1, "hash": "ab')  # an append cut short by a crash
    async with open_service(service_config(data_dir)) as service:
        await service.registry.issue_token("acme", ADMIN, "r")
    assert all(c is not None for c in read_checkpoints(data_dir))
    assert verify_data_dir(data_dir).verdict == "ok"
    assert CheckpointSigner(data_dir).latest is not None


async def test_a_delete_whose_caller_goes_away_does_not_leave_the_tenant_half_deleted(
    data_dir: Path,
) -> None:
    async with open_service(service_config(data_dir)) as service:
        registry = service.registry
        await registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "r")
        actor = registry.actor("acme")
        for _ in range(50):  # the actor takes one message per scheduling round
            actor.inbox.send_nowait(GetUsage(Reply()))
        with trio.CancelScope() as caller:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(registry.delete_tenant, "acme", ADMIN, "r")
                for _ in range(3):
                    await trio.lowlevel.checkpoint()
                # Retire is queued behind the reads, its caller waiting for the answer:
                caller.cancel()  # the client disconnected
        await trio.testing.wait_all_tasks_blocked()
        # Either way, never a tenant that exists yet refuses every write as "being deleted".
        if registry.exists("acme"):
            assert (await spawn(service))["tenant"] == "acme"
        else:
            assert json.loads(audit_lines(data_dir)[-1])["op"] == "tenant.delete"
