"""The embedded fleet simulator: what it promises like a real fleet controller would."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import FleetError
from actors.fleet.embedded import EmbeddedFleet
from actors.state import VmSpec

SPEC = VmSpec(1, 256, "debian-12", None)


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


async def test_a_tenants_list_holds_its_own_vms_only_also_after_a_restart(
    tmp_path: Path,
) -> None:
    fleet = EmbeddedFleet(tmp_path, boot_seconds=0)
    for vm_id, tenant in [("vm-a1", "acme"), ("vm-a2", "acme"), ("vm-b1", "beta")]:
        await fleet.spawn(vm_id, tenant, SPEC)
    await fleet.destroy("vm-a1")
    await fleet.destroy("vm-b1")
    assert await fleet.list("acme") == {"vm-a2": "running"}
    assert await fleet.list("beta") == {}
    await fleet.spawn("vm-b2", "beta", SPEC)
    await fleet.aclose()
    reopened = EmbeddedFleet(tmp_path, boot_seconds=3600)  # from the journal: still booting
    assert await reopened.list("acme") == {"vm-a2": "pending"}
    assert await reopened.list("beta") == {"vm-b2": "pending"}
    assert await reopened.list("nobody") == {}
    await reopened.aclose()
