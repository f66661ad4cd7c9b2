"""Every API operation as a value: method, path, body, and the type of its answer.

Nothing here does I/O: :class:`API` builds :class:`Operation` values, which
:meth:`server.client.Client.send` performs. Path arguments are percent-encoded whole
(:func:`segment`), so no argument can address another resource.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from server.client.models import (
    AuditPage,
    Checkpoint,
    ConsistencyProof,
    CreatedTenant,
    DestroyedVm,
    Empty,
    InclusionProof,
    IssuedToken,
    KeyList,
    Quota,
    SigningKey,
    Tenant,
    TenantPage,
    Trail,
    Usage,
    Vm,
    VmPage,
)

T = TypeVar("T")

#: an idempotency key as it can travel in an HTTP field value
_KEY_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")


@dataclass(frozen=True, slots=True)
class Operation(Generic[T]):
    """One API request, described without doing it; ``result`` types its answer's body.

    ``result`` is a Struct (JSON body), ``str`` (a ``text/plain`` body) or :class:`Empty`.
    """

    method: str
    path: str
    result: type[T]
    body: Any = None
    params: Mapping[str, str | int] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """A successful answer: the typed value, the exact body and the headers."""

    value: T
    body: bytes
    status: int
    headers: httpx.Headers

    @property
    def audit_seqs(self) -> tuple[int, ...]:
        """The seqs of the audit entries this request appended (``Audit-Seq``)."""
        return audit_seqs(self.headers)

    @property
    def replayed(self) -> bool:
        """Whether this is the stored answer of an earlier request with the same key."""
        return bool(self.headers.get("Idempotent-Replayed") == "true")


def audit_seqs(headers: httpx.Headers) -> tuple[int, ...]:
    """The seqs an ``Audit-Seq`` header names, in order (none when it is absent)."""
    parts = [part.strip() for part in headers.get("Audit-Seq", "").split(",")]
    return tuple(int(part) for part in parts if part.isascii() and part.isdigit())


def segment(value: str) -> str:
    """``value`` as exactly one path segment, whatever it contains.

    Everything but unreserved characters is percent-encoded (``/``, ``?``, ``#``, ``%``),
    and ``.``/``..`` are encoded too: as they are they would be removed as dot segments
    before sending, and ``tokens/..`` would become the tenant itself.
    """
    if not value:
        raise ValueError("an empty id names no resource")
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in {".", ".."} else quoted


def _page_params(limit: int | None, cursor: str | None) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if limit is not None:
        params["limit"] = limit
    if cursor is not None:
        params["cursor"] = cursor
    return params


def check_idempotency_key(key: str) -> str:
    """``key`` if it can be an ``Idempotency-Key``, else ValueError saying why."""
    if len(key) > 255 or not _KEY_RE.fullmatch(key):
        raise ValueError(
            "an idempotency key is 1..255 printable ASCII characters, "
            "not starting or ending with a space"
        )
    return key


class API:
    """Every operation of the HTTP API as an :class:`Operation` (no I/O here)."""

    # -- tenant endpoints (a tenant token) --

    @staticmethod
    def spawn_vm(
        *,
        vcpus: int,
        memory_mib: int,
        image: str,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[Vm]:
        body: dict[str, Any] = {"vcpus": vcpus, "memory_mib": memory_mib, "image": image}
        if name is not None:
            body["name"] = name
        headers = {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = check_idempotency_key(idempotency_key)
        return Operation("POST", "/v1/vms", Vm, body=body, headers=headers)

    @staticmethod
    def list_vms(*, limit: int | None = None, cursor: str | None = None) -> Operation[VmPage]:
        return Operation("GET", "/v1/vms", VmPage, params=_page_params(limit, cursor))

    @staticmethod
    def next_vms(page: VmPage, *, limit: int | None = None) -> Operation[VmPage] | None:
        """The page after ``page``, or None at the end."""
        return None if page.next is None else API.list_vms(limit=limit, cursor=page.next)

    @staticmethod
    def get_vm(vm_id: str) -> Operation[Vm]:
        return Operation("GET", f"/v1/vms/{segment(vm_id)}", Vm)

    @staticmethod
    def destroy_vm(vm_id: str) -> Operation[DestroyedVm]:
        return Operation("DELETE", f"/v1/vms/{segment(vm_id)}", DestroyedVm)

    @staticmethod
    def usage() -> Operation[Usage]:
        return Operation("GET", "/v1/usage", Usage)

    # -- admin endpoints (the admin token) --

    @staticmethod
    def create_tenant(
        tenant_id: str, quota: Quota, *, token_ttl: int | None = None
    ) -> Operation[CreatedTenant]:
        body: dict[str, Any] = {"id": tenant_id, "quota": msgspec.to_builtins(quota)}
        if token_ttl is not None:
            body["token_ttl_seconds"] = token_ttl
        return Operation("POST", "/v1/admin/tenants", CreatedTenant, body=body)

    @staticmethod
    def get_tenant(tenant_id: str) -> Operation[Tenant]:
        return Operation("GET", f"/v1/admin/tenants/{segment(tenant_id)}", Tenant)

    @staticmethod
    def update_tenant(tenant_id: str, quota: Quota) -> Operation[Tenant]:
        body = {"quota": msgspec.to_builtins(quota)}
        return Operation("PATCH", f"/v1/admin/tenants/{segment(tenant_id)}", Tenant, body=body)

    @staticmethod
    def delete_tenant(tenant_id: str) -> Operation[Empty]:
        return Operation("DELETE", f"/v1/admin/tenants/{segment(tenant_id)}", Empty)

    @staticmethod
    def list_tenants(
        *, limit: int | None = None, cursor: str | None = None
    ) -> Operation[TenantPage]:
        return Operation("GET", "/v1/admin/tenants", TenantPage, params=_page_params(limit, cursor))

    @staticmethod
    def next_tenants(page: TenantPage, *, limit: int | None = None) -> Operation[TenantPage] | None:
        """The page after ``page``, or None at the end."""
        return None if page.next is None else API.list_tenants(limit=limit, cursor=page.next)

    @staticmethod
    def issue_token(tenant_id: str, *, ttl: int | None = None) -> Operation[IssuedToken]:
        path = f"/v1/admin/tenants/{segment(tenant_id)}/tokens"
        body = None if ttl is None else {"ttl_seconds": ttl}
        return Operation("POST", path, IssuedToken, body=body)

    @staticmethod
    def revoke_token(tenant_id: str, token_id: str) -> Operation[Empty]:
        path = f"/v1/admin/tenants/{segment(tenant_id)}/tokens/{segment(token_id)}"
        return Operation("DELETE", path, Empty)

    @staticmethod
    def list_keys() -> Operation[KeyList]:
        return Operation("GET", "/v1/admin/keys", KeyList)

    @staticmethod
    def rotate_key() -> Operation[SigningKey]:
        return Operation("POST", "/v1/admin/keys", SigningKey)

    @staticmethod
    def retire_key(key_id: str) -> Operation[Empty]:
        return Operation("DELETE", f"/v1/admin/keys/{segment(key_id)}", Empty)

    @staticmethod
    def read_audit(*, after: int = 0, limit: int | None = None) -> Operation[AuditPage]:
        params: dict[str, str | int] = {"after": after}
        if limit is not None:
            params["limit"] = limit
        return Operation("GET", "/v1/admin/audit", AuditPage, params=params)

    @staticmethod
    def next_audit(page: AuditPage, *, limit: int | None = None) -> Operation[AuditPage] | None:
        """The entries after ``page`` up to the head it saw, or None when it reached it."""
        if not page.entries or page.entries[-1]["seq"] >= page.head.seq:
            return None
        return API.read_audit(after=page.entries[-1]["seq"], limit=limit)

    @staticmethod
    def audit_head() -> Operation[Checkpoint]:
        return Operation("GET", "/v1/admin/audit/head", Checkpoint)

    # -- proofs (v1.1; a tenant token or the admin token) --

    @staticmethod
    def checkpoint() -> Operation[str]:
        return Operation("GET", "/v1/audit/checkpoint", str)

    @staticmethod
    def log_key() -> Operation[str]:
        return Operation("GET", "/v1/audit/key", str)

    @staticmethod
    def inclusion_proof(seq: int, *, tree_size: int | None = None) -> Operation[InclusionProof]:
        params: dict[str, str | int] = {"seq": seq}
        if tree_size is not None:
            params["tree_size"] = tree_size
        return Operation("GET", "/v1/audit/proof", InclusionProof, params=params)

    @staticmethod
    def consistency_proof(first: int, to: int | None = None) -> Operation[ConsistencyProof]:
        params: dict[str, str | int] = {"from": first}
        if to is not None:
            params["to"] = to
        return Operation("GET", "/v1/audit/consistency", ConsistencyProof, params=params)

    @staticmethod
    def audit_trail(*, after: int = 0, limit: int | None = None) -> Operation[Trail]:
        params: dict[str, str | int] = {"after": after}
        if limit is not None:
            params["limit"] = limit
        return Operation("GET", "/v1/audit", Trail, params=params)
