"""The tenant actor's protocol: every message it accepts, in one place.

Each message is a small frozen dataclass. Calls carry a one-shot ``reply`` channel of
buffer 1 on which the actor sends exactly one :class:`outcome.Outcome`; the actor never
waits on it, and a reply to a caller that already gave up is dropped.

Messages from the edge are the commands (``Spawn`` ... ``Reopen``); the ``*Settled`` and
``QuotaApplied`` messages come from the actor's own jobs, which do the waiting (for the
audit fsync, for the fleet) outside the actor's turn and report back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import outcome
import trio

from actors.fleet import VmSpec
from actors.state import Quota

Reply = trio.MemorySendChannel[outcome.Outcome[Any]]


def send_reply(reply: Reply | None, result: outcome.Outcome[Any]) -> None:
    """Answer a call without ever blocking; a caller that gave up loses the answer."""
    if reply is None:
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        reply.send_nowait(result)


@dataclass(frozen=True, slots=True)
class Source:
    """Who asked: the caller's address and the id of the token it used."""

    ip: str | None
    token_id: str

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "token_id": self.token_id}


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored first answer for a repeated ``Idempotency-Key``."""

    status: int
    body: dict[str, Any]


# -- commands from the edge ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    spec: VmSpec
    idempotency_key: str | None
    request_hash: str | None
    source: Source
    request_id: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Destroy:
    vm_id: str
    source: Source
    request_id: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class GetVm:
    vm_id: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class ListVms:
    after: str | None
    limit: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class GetUsage:
    reply: Reply


@dataclass(frozen=True, slots=True)
class UpdateQuota:
    quota: Quota
    source: Source
    request_id: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Retire:
    """Prepare for deletion: refuse if the tenant has VMs, else refuse new spawns."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Reopen:
    """Undo ``Retire`` (the deletion could not be made durable)."""


# -- reports from the actor's own jobs ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpawnSettled:
    """The spawn's fate: ``state`` from the fleet, or ``None`` when it did not happen.

    ``audit`` is False for a reservation rolled back because its ``requested`` entry
    never became durable (there is nothing to record then). ``reply`` receives the
    ticket of the outcome entry.
    """

    vm_id: str
    state: str | None
    reason: str
    source: Source
    request_id: str | None
    audit: bool
    reply: Reply | None


@dataclass(frozen=True, slots=True)
class DestroySettled:
    """The destroy's fate: ``destroyed`` True, or the state the VM is back in."""

    vm_id: str
    destroyed: bool
    state: str | None
    reason: str
    source: Source
    request_id: str | None
    audit: bool
    reply: Reply | None


@dataclass(frozen=True, slots=True)
class MarkInDoubt:
    """The fleet's answer was lost: the VM is ``unknown`` until reconciled."""

    vm_id: str


@dataclass(frozen=True, slots=True)
class ForgetKey:
    """Drop an idempotency record whose decision never became durable."""

    key: str


@dataclass(frozen=True, slots=True)
class QuotaApplied:
    quota: Quota
    reply: Reply


TenantMessage = (
    Spawn
    | Destroy
    | GetVm
    | ListVms
    | GetUsage
    | UpdateQuota
    | Retire
    | Reopen
    | SpawnSettled
    | DestroySettled
    | MarkInDoubt
    | ForgetKey
    | QuotaApplied
)
