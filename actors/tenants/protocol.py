"""The tenant actor's protocol: every message it accepts, in one place.

Each message is a small frozen dataclass. Calls carry a one-shot :class:`Reply` on which
the actor puts exactly one :class:`outcome.Outcome`; the actor never waits on it, and a
reply to a caller that already gave up is dropped.

Messages from the edge are the commands (``Spawn`` ... ``Reopen``); the rest come from
the actor's own jobs, which do the waiting (for the audit fsync, for the fleet) outside
the actor's turn and report back. An outcome is settled in two phases: the entry is
recorded, and only once it is durable is the state changed and the caller answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.reply import Reply
from actors.state import Quota, VmSpec


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
class Settle:
    """The fleet's definite answer about one VM operation (``kind`` is spawn or destroy).

    ``ok`` False is a definite refusal; ``state`` is the fleet's VM state after a spawn,
    or the state a VM is back in after a refused destroy (None: as it was).
    """

    vm_id: str
    kind: str
    ok: bool
    state: str | None
    reason: str
    source: Source
    request_id: str | None


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """Phase one of settling: submit the outcome entry; the reply is its ticket."""

    settle: Settle
    reply: Reply


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """Phase two, once the outcome entry is durable: change the state; reply the body."""

    settle: Settle
    reply: Reply


@dataclass(frozen=True, slots=True)
class Rollback:
    """The ``requested`` entry never became durable: undo the reservation or the mark."""

    vm_id: str
    kind: str
    previous_state: str | None


@dataclass(frozen=True, slots=True)
class MarkInDoubt:
    """The fleet's answer (or its record) was lost: the VM is ``unknown`` until reconciled."""

    vm_id: str
    kind: str


@dataclass(frozen=True, slots=True)
class ForgetKey:
    """Drop an idempotency record whose decision never became durable."""

    key: str


@dataclass(frozen=True, slots=True)
class QuotaApplied:
    """A quota change is durable at ``seq``; older ones arriving later are ignored."""

    quota: Quota
    seq: int
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
    | RecordOutcome
    | ApplyOutcome
    | Rollback
    | MarkInDoubt
    | ForgetKey
    | QuotaApplied
)

#: commands that may write; refused once the actor is stopping
WRITE_COMMANDS = (Spawn, Destroy, UpdateQuota, Retire)
