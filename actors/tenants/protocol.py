"""The tenant actor's protocol: every message it accepts, in one place.

Each message is a small frozen dataclass. Calls carry a one-shot :class:`Reply` on which
the actor puts exactly one :class:`outcome.Outcome`; the actor never waits on it, and a
reply to a caller that already gave up is dropped.

Every message but :class:`Reclaim` (the registry's) comes from the edge, and every one
may write: reads never come here, they go through the store's read surface (immutable
views, ``actors/views.py``). The actor's own jobs, which do the waiting (for the
journal, for the fleet) outside its turns, write through the store and never report back
through the mailbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.reply import Reply
from actors.state import Quota, VmSpec
from actors.views import Destroyed, Vm


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
    reply: Reply[Vm | Replay]


@dataclass(frozen=True, slots=True)
class Destroy:
    vm_id: str
    source: Source
    request_id: str
    reply: Reply[Destroyed]


@dataclass(frozen=True, slots=True)
class UpdateQuota:
    quota: Quota
    source: Source
    request_id: str
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class Retire:
    """Prepare for deletion: refuse if the tenant has VMs, else refuse new spawns."""

    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class Reopen:
    """Undo ``Retire`` (the deletion could not be made durable)."""


@dataclass(frozen=True, slots=True)
class Reclaim:
    """Claim and reconcile the tenant's operations whose owner went away (another replica
    died); sent by the registry's periodic look."""


TenantMessage = Spawn | Destroy | UpdateQuota | Retire | Reopen | Reclaim

#: commands that may write; refused once the actor is stopping
WRITE_COMMANDS = (Spawn, Destroy, UpdateQuota, Retire)
