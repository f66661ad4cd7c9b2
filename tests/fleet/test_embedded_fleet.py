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
