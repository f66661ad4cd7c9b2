"""The bodies the API answers with: msgspec structs that both encode the responses and
describe them in the OpenAPI document (``server/openapi.py``), so the two cannot drift.

The views of the core (``actors/views.py``: ``Vm``, ``Usage``, ``Tenant``, ``Destroyed``
and ``actors/state.py``'s ``Quota``) are bodies as they are; the ones here wrap them in
pages or carry what only the edge knows (tokens, cursors, signing keys, the audit page).
Every route declares its struct (``server/routes/spec.py``) and answers with an instance
of exactly that struct, or the request fails: a body the document does not describe
cannot be sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from quart import Response

from actors.state import Quota
from actors.views import Tenant, Timestamp, Vm

Hex64 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Cursor = Annotated[
    str | None, msgspec.Meta(description="pass as `cursor` for the next page; null: the last page")
]
Expiry = Annotated[
    str | None,
    msgspec.Meta(
        extra_json_schema={"format": "date-time"},
        description="when the token stops working; null: never",
    ),
]


class VmList(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A page of the caller's VMs."""

    vms: list[Vm]
    next: Cursor


class TenantList(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A page of tenants, by id."""

    tenants: list[Tenant]
    next: Cursor


class CreatedTenant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant just provisioned, with its first token."""

    id: str
    quota: Quota
    token: str
    token_id: str
    expires_at: Expiry


class Token(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token just issued."""

    token: str
    token_id: str
    expires_at: Expiry


class SigningKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token-signing key as the admin API shows it: never its secret."""

    id: str
    created_at: Timestamp
    state: Literal["active", "retired"]
    signing: bool
    retired_at: Annotated[str | None, msgspec.Meta(extra_json_schema={"format": "date-time"})]


class KeyList(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The token-signing keys, oldest first."""

    keys: list[SigningKey]


class AuditHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    seq: Annotated[int, msgspec.Meta(ge=0)]
    hash: Hex64


class AuditPage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Audit entries exactly as stored (API.md, "Audit log"), and the head they were read
    under."""

    entries: list[Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})]]
    head: AuditHead


class Checkpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The current head, signed: the v1 checkpoint of the chain and, in ``checkpoint``, the
    same head as a C2SP signed note of the Merkle tree (API.md v1.1)."""

    seq: Annotated[int, msgspec.Meta(ge=0)]
    hash: Hex64
    ts: str
    signature: Annotated[str, msgspec.Meta(description="base64 Ed25519 over {seq, hash, ts}")]
    checkpoint: Annotated[
        str, msgspec.Meta(description="C2SP tlog-checkpoint signed note of the tree of `seq`")
    ]


Base64Hash = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9+/]{43}=$")]


class InclusionProof(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The RFC 9162 inclusion proof of entry ``seq`` (leaf ``seq - 1``) in a tree."""

    seq: Annotated[int, msgspec.Meta(ge=1)]
    leaf_index: Annotated[int, msgspec.Meta(ge=0)]
    tree_size: Annotated[int, msgspec.Meta(ge=1)]
    hashes: list[Base64Hash]


class ConsistencyProof(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The RFC 9162 consistency proof from the tree of ``from`` entries to that of ``to``."""

    first: Annotated[int, msgspec.Meta(ge=1)] = msgspec.field(name="from")
    to: Annotated[int, msgspec.Meta(ge=1)]
    hashes: list[Base64Hash]


class Trail(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A page of the caller's own audit entries, exactly as stored, by rising seq."""

    entries: list[Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})]]
    next: Annotated[
        int | None,
        msgspec.Meta(description="pass as `after` for the next page; null: the last page"),
    ]


class Status(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: str


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(body), status=status, content_type="application/json", headers=headers
    )
