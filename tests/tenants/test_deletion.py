"""Deleting a tenant while commands for it are in flight, or while its caller goes away."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import trio
import trio.testing

from actors.service import Service, open_service
from actors.state import Quota, VmSpec
from actors.tenants.protocol import Reopen, Source, Spawn
from conftest import Api, audit_lines, service_config
from server.app import create_app
from server.auth import Authority

ADMIN = Source("127.0.0.1", "admin")
USER = Source("127.0.0.1", "tok-user")
SPEC = VmSpec(1, 256, "debian-12", None)


async def spawn(service: Service) -> Any:
    vm = await service.registry.call(
        "acme", lambda reply: Spawn(SPEC, None, None, USER, "req", reply)
    )
    return msgspec.to_builtins(vm)


async def test_commands_racing_tenant_deletion_never_answer_500(data_dir: Path) -> None:
    async with open_service(service_config(data_dir)) as service:
        api = Api(
            create_app(service, Authority.for_store(service.store)).test_client(),
            service,
            (data_dir / "admin.token").read_text().strip(),
        )
        statuses: list[int] = []
        for round_ in range(8):
            tenant = f"t{round_}"
            token = (await api.provision(tenant)).bearer

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


async def test_a_delete_whose_caller_goes_away_does_not_leave_the_tenant_half_deleted(
    data_dir: Path,
) -> None:
    async with open_service(service_config(data_dir)) as service:
        registry = service.registry
        await registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "r")
        actor = registry.actor("acme")
        for _ in range(50):  # the actor takes one message per scheduling round
            actor.inbox.send_nowait(Reopen())
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
