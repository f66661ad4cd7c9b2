"""The embedded fleet simulator: the default fleet driver, in-process, persistent.

It keeps its VMs in an append-only journal ``<data-dir>/fleet/vms.jsonl`` so that, like a
real fleet controller, its VMs outlive a restart or a ``kill -9`` of the proxy (the
journal is written before each call returns; it is not fsynced, because the simulator
only has to survive the proxy process, not the machine). A VM reports ``pending`` for
``boot_seconds`` after its creation and ``running`` after that.

Tests steer it through :class:`FleetKnobs`: a latency per call, a number of calls to
fail definitively, or calls that hang until the client's deadline.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from actors.errors import FleetError
from actors.fsutil import atomic_write
from actors.state import VmSpec

log = logging.getLogger("vm_tenant.fleet.embedded")

#: VMs a list call reads between two yields to the event loop
LIST_SLICE = 1024


@dataclass(slots=True)
class FleetKnobs:
    """Fault injection for tests: applied to every call of the simulator."""

    latency: float = 0.0
    fail_next: int = 0
    hang: bool = False


class _SimVm(msgspec.Struct):
    id: str
    tenant: str
    vcpus: int
    memory_mib: int
    image: str
    name: str | None
    created: float


class _Record(msgspec.Struct):
    op: str
    vm: _SimVm | None = None
    id: str | None = None


class EmbeddedFleet:
    """A fleet controller simulator persisting its VMs under ``<data-dir>/fleet/``."""

    def __init__(self, directory: Path, *, boot_seconds: float = 1.0) -> None:
        self.knobs = FleetKnobs()
        self.boot_seconds = boot_seconds
        self.calls = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._journal = directory / "vms.jsonl"
        self._destroyed: set[str] = set()
        stored = self._journal.read_bytes() if self._journal.exists() else None
        self._vms: dict[str, _SimVm] = self._load(stored or b"")
        #: each tenant's VM ids, so that a tenant's list costs its own VMs, not the fleet's
        self._by_tenant: dict[str, set[str]] = {}
        for vm in self._vms.values():
            self._by_tenant.setdefault(vm.tenant, set()).add(vm.id)
        # Compact on open, so the journal grows with activity since the last start only
        # (destroyed ids stay: they are never re-created). A journal that is compact
        # already is left alone: a start needs no free space for it.
        records = [_Record("spawn", vm) for vm in self._vms.values()]
        records += [_Record("destroy", id=vm_id) for vm_id in sorted(self._destroyed)]
        compact = b"".join(msgspec.json.encode(r) + b"\n" for r in records)
        if compact != stored:
            atomic_write(self._journal, compact)
        self._fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND)

    def _load(self, stored: bytes) -> dict[str, _SimVm]:
        vms: dict[str, _SimVm] = {}
        decoder = msgspec.json.Decoder(_Record)
        for line in stored.splitlines():
            try:
                record = decoder.decode(line)
            except (msgspec.DecodeError, UnicodeDecodeError):
                log.warning("skipping a torn line in the fleet journal")
                continue
            if record.op == "spawn" and record.vm is not None:
                vms[record.vm.id] = record.vm
            elif record.op == "destroy" and record.id is not None:
                vms.pop(record.id, None)
                self._destroyed.add(record.id)
        return vms

    def _append(self, record: _Record) -> None:
        os.write(self._fd, msgspec.json.encode(record) + b"\n")

    async def _behave(self) -> None:
        self.calls += 1
        if self.knobs.hang:
            await trio.sleep_forever()
        if self.knobs.latency:
            await trio.sleep(self.knobs.latency)
        if self.knobs.fail_next > 0:
            self.knobs.fail_next -= 1
            raise FleetError("the fleet refused the operation (simulated failure)")

    def _state(self, vm: _SimVm) -> str:
        return "running" if time.time() - vm.created >= self.boot_seconds else "pending"

    async def spawn(self, vm_id: str, tenant: str, spec: VmSpec) -> str:
        await self._behave()
        vm = self._vms.get(vm_id)
        if vm is None and vm_id in self._destroyed:
            # A late or repeated spawn must not bring back a VM whose capacity is gone.
            raise FleetError("this VM id was destroyed and is never re-created")
        if vm is None:
            vm = _SimVm(
                vm_id, tenant, spec.vcpus, spec.memory_mib, spec.image, spec.name, time.time()
            )
            self._append(_Record("spawn", vm))
            self._vms[vm_id] = vm
            self._by_tenant.setdefault(tenant, set()).add(vm_id)
        return self._state(vm)

    async def destroy(self, vm_id: str) -> None:
        await self._behave()
        vm = self._vms.pop(vm_id, None)
        if vm is not None:
            self._append(_Record("destroy", id=vm_id))
            self._destroyed.add(vm_id)
            owned = self._by_tenant[vm.tenant]
            owned.discard(vm_id)
            if not owned:
                del self._by_tenant[vm.tenant]

    async def status(self, vm_id: str) -> str | None:
        await self._behave()
        vm = self._vms.get(vm_id)
        return None if vm is None else self._state(vm)

    async def list(self, tenant: str) -> dict[str, str]:
        await self._behave()
        ids = list(self._by_tenant.get(tenant, ()))
        states: dict[str, str] = {}
        for start in range(0, len(ids), LIST_SLICE):
            if start:
                # as a remote fleet's answer would, a long list does not hold up the loop
                await trio.lowlevel.checkpoint()
            for vm_id in ids[start : start + LIST_SLICE]:
                vm = self._vms.get(vm_id)
                if vm is not None:  # (not destroyed in between)
                    states[vm_id] = self._state(vm)
        return states

    def vm_ids(self) -> set[str]:
        """Every VM the simulator holds (for tests that compare it with the proxy)."""
        return set(self._vms)

    async def aclose(self) -> None:
        os.close(self._fd)
