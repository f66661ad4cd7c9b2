"""What the API answers, as msgspec Structs (the typed results of the client).

They ignore members they do not know, so a newer server does not break an older client.
Timestamps stay RFC 3339 text, exactly as the server wrote them.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Quota(msgspec.Struct, frozen=True, kw_only=True):
    """A quota or an allocation: ``{"vcpus", "memory_mib", "vms"}``."""

    vcpus: int
    memory_mib: int
    vms: int


class Vm(msgspec.Struct, frozen=True, kw_only=True):
    """A VM as the API shows it (``created_at`` is RFC 3339 text)."""

    id: str
    tenant: str
    state: str
    vcpus: int
    memory_mib: int
    image: str
    name: str | None
    created_at: str


class VmPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of ``GET /v1/vms``; ``next`` is the cursor of the following page, or None."""

    vms: list[Vm]
    next: str | None


class DestroyedVm(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a destroy: ``{"id", "state": "destroyed"}``."""

    id: str
    state: str


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/usage``: the caller's quota and what it has allocated."""

    tenant: str
    quota: Quota
    allocated: Quota


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant as the admin API shows it."""

    id: str
    quota: Quota
    allocated: Quota


class TenantPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of ``GET /v1/admin/tenants``."""

    tenants: list[Tenant]
    next: str | None


class IssuedToken(msgspec.Struct, frozen=True, kw_only=True):
    """A new bearer token (shown once) and its id (used to revoke it)."""

    token: str
    token_id: str
    expires_at: str | None = None


class CreatedTenant(msgspec.Struct, frozen=True, kw_only=True):
    """A new tenant with its first token."""

    id: str
    quota: Quota
    token: str
    token_id: str
    expires_at: str | None = None


class SigningKey(msgspec.Struct, frozen=True, kw_only=True):
    """A token-signing key as ``/v1/admin/keys`` shows it (never its secret)."""

    id: str
    created_at: str
    state: str
    signing: bool
    retired_at: str | None = None


class KeyList(msgspec.Struct, frozen=True, kw_only=True):
    keys: list[SigningKey]


class Head(msgspec.Struct, frozen=True, kw_only=True):
    """The head of the audit chain: its last seq and that entry's hash."""

    seq: int
    hash: str


class AuditPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of ``GET /v1/admin/audit``: entries as stored, and the head when read."""

    entries: list[dict[str, Any]]
    head: Head


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/admin/audit/head``: a signed checkpoint of the head, to keep elsewhere.

    ``checkpoint`` is the same head as a C2SP signed note (None from servers before v1.1).
    """

    seq: int
    hash: str
    ts: str
    signature: str
    checkpoint: str | None = None


class Trail(msgspec.Struct, frozen=True, kw_only=True):
    """One page of ``GET /v1/audit``: the caller's own entries; ``next`` continues after."""

    entries: list[dict[str, Any]]
    next: int | None


class InclusionProof(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 9162 inclusion proof of one entry (hashes in base64)."""

    seq: int
    leaf_index: int
    tree_size: int
    hashes: list[str]


class ConsistencyProof(msgspec.Struct, frozen=True, kw_only=True, rename={"first": "from"}):
    """RFC 9162 consistency proof between two tree sizes (``from`` is ``first`` here)."""

    first: int
    to: int
    hashes: list[str]


class Empty(msgspec.Struct, frozen=True):
    """The value of an answer without a body (``204``)."""
