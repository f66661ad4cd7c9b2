"""The synchronous client: one httpx connection pool, one bearer token, typed methods."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httpx
import msgspec

from server.client.errors import ApiError, ServerError, Unreachable
from server.client.models import (
    AuditPage,
    Checkpoint,
    ConsistencyProof,
    CreatedTenant,
    DestroyedVm,
    Empty,
    InclusionProof,
    IssuedToken,
    Quota,
    SigningKey,
    Tenant,
    TenantPage,
    Trail,
    Usage,
    Vm,
    VmPage,
)
from server.client.operations import API, Answer, Operation, audit_seqs

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 30.0
#: the largest body :meth:`Client.fetch` reads (a trail page of 1,000 entries fits many times)
MAX_FETCH = 16 * 1024 * 1024

T = TypeVar("T")

#: a bearer token as it can travel in an HTTP field value
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


def _user_agent() -> str:
    try:
        return f"vm-tenant/{version('service-vm-tenant')}"
    except PackageNotFoundError:
        return "vm-tenant"


def retry_after(headers: httpx.Headers) -> int | None:
    text = headers.get("Retry-After", "").strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _error(response: httpx.Response) -> ApiError:
    """The error for an answer with status >= 400, from its problem document if it has one."""
    problem: dict[str, Any] | None = None
    try:
        decoded = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("code"), str):
        problem = decoded
    if problem is not None:
        code: str | None = problem["code"]
        detail = str(problem.get("detail") or problem.get("title") or "")
    else:
        code = None
        text = response.text.strip().splitlines()
        detail = text[0][:200] if text else response.reason_phrase or "no details"
    kind = ServerError if response.status_code >= 500 else ApiError
    return kind(
        response.status_code,
        code,
        detail,
        problem,
        request_id=response.headers.get("X-Request-Id"),
        retry_after=retry_after(response.headers),
        audit_seqs=audit_seqs(response.headers),
    )


class Client:
    """A synchronous client of one vm-tenant server, authenticated with one bearer token.

    The token decides what the server allows: the admin token for the admin endpoints, a
    tenant token for the tenant ones. ``verify`` is passed to httpx (``False``, or an
    ``ssl.SSLContext`` trusting a private CA); ``transport`` replaces the network (tests).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        headers = {"User-Agent": _user_agent(), "Accept": "application/json"}
        if token is not None:
            if not _TOKEN_RE.fullmatch(token):
                raise ValueError("a bearer token is printable ASCII without spaces")
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, operation: Operation[T]) -> Answer[T]:
        """Perform one operation; its answer, or the :class:`ClientError` it ended in."""
        try:
            response = self._http.request(
                operation.method,
                operation.path,
                json=operation.body,
                params=dict(operation.params) or None,
                headers=dict(operation.headers) or None,
            )
        except httpx.TimeoutException as error:
            raise Unreachable(f"no answer from {self.url} in time ({error or 'timeout'})") from None
        except httpx.TransportError as error:
            raise Unreachable(f"cannot reach {self.url}: {error}") from None
        status = response.status_code
        if status >= 400:
            raise _error(response)
        if not 200 <= status < 300:
            where = response.headers.get("Location", "nowhere")
            raise Unreachable(f"{self.url} answered {status} (to {where}); is the URL right?")
        return Answer(self._value(operation, response), response.content, status, response.headers)

    def fetch(
        self, path: str, params: Mapping[str, str] | None = None, *, limit: int = MAX_FETCH
    ) -> tuple[int, bytes, httpx.Headers]:
        """``GET path`` as it comes: the status, the exact body and the headers.

        For checkers that trust no parse but their own (``server/witness.py``). A body
        over ``limit`` bytes, or no answer, raises :class:`Unreachable`.
        """
        try:
            with self._http.stream("GET", path, params=dict(params or {})) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise Unreachable(f"GET {path}: an answer larger than {limit} bytes")
                return response.status_code, bytes(body), response.headers
        except httpx.TimeoutException as error:
            raise Unreachable(f"no answer from {self.url} in time ({error or 'timeout'})") from None
        except httpx.TransportError as error:
            raise Unreachable(f"cannot reach {self.url}: {error}") from None

    def pages(
        self, first: Operation[T], following: Callable[[T], Operation[T] | None]
    ) -> Iterator[Answer[T]]:
        """The answer to ``first``, then to each page ``following`` names (``API.next_*``)."""
        operation: Operation[T] | None = first
        while operation is not None:
            answer = self.send(operation)
            yield answer
            operation = following(answer.value)

    def _value(self, operation: Operation[T], response: httpx.Response) -> T:
        result: Any = operation.result
        try:
            if result is Empty:
                return cast(T, Empty())
            if result is str:
                return cast(T, response.content.decode("utf-8"))
            return cast(T, msgspec.json.decode(response.content, type=result))
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as error:
            raise Unreachable(
                f"{self.url} answered {operation.method} {operation.path} with a body that is "
                f"not the API's ({error})"
            ) from None

    # -- tenant endpoints --

    def spawn_vm(
        self,
        *,
        vcpus: int,
        memory_mib: int,
        image: str,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> Vm:
        """``POST /v1/vms``; the same ``idempotency_key`` and body never spawn twice."""
        operation = API.spawn_vm(
            vcpus=vcpus,
            memory_mib=memory_mib,
            image=image,
            name=name,
            idempotency_key=idempotency_key,
        )
        return self.send(operation).value

    def list_vms(self, *, limit: int | None = None, cursor: str | None = None) -> VmPage:
        """One page of the caller's VMs (``limit`` 1..1000, default 100)."""
        return self.send(API.list_vms(limit=limit, cursor=cursor)).value

    def iter_vms(self, *, limit: int | None = None) -> Iterator[Vm]:
        """Every VM of the caller, page by page."""
        following = partial(API.next_vms, limit=limit)
        for answer in self.pages(API.list_vms(limit=limit), following):
            yield from answer.value.vms

    def get_vm(self, vm_id: str) -> Vm:
        """``GET /v1/vms/{id}``, with the live state from the fleet."""
        return self.send(API.get_vm(vm_id)).value

    def destroy_vm(self, vm_id: str) -> DestroyedVm:
        """``DELETE /v1/vms/{id}``: answers once the fleet confirmed."""
        return self.send(API.destroy_vm(vm_id)).value

    def usage(self) -> Usage:
        """``GET /v1/usage``."""
        return self.send(API.usage()).value

    # -- admin endpoints --

    def create_tenant(
        self, tenant_id: str, quota: Quota, *, token_ttl: int | None = None
    ) -> CreatedTenant:
        """``POST /v1/admin/tenants``: the tenant and its first token."""
        return self.send(API.create_tenant(tenant_id, quota, token_ttl=token_ttl)).value

    def get_tenant(self, tenant_id: str) -> Tenant:
        return self.send(API.get_tenant(tenant_id)).value

    def update_tenant(self, tenant_id: str, quota: Quota) -> Tenant:
        """``PATCH /v1/admin/tenants/{id}``: the new quota (lower than allocated is allowed)."""
        return self.send(API.update_tenant(tenant_id, quota)).value

    def delete_tenant(self, tenant_id: str) -> None:
        """``DELETE /v1/admin/tenants/{id}``: a tenant without VMs; its tokens stop working."""
        self.send(API.delete_tenant(tenant_id))

    def list_tenants(self, *, limit: int | None = None, cursor: str | None = None) -> TenantPage:
        return self.send(API.list_tenants(limit=limit, cursor=cursor)).value

    def iter_tenants(self, *, limit: int | None = None) -> Iterator[Tenant]:
        """Every tenant by id, page by page."""
        following = partial(API.next_tenants, limit=limit)
        for answer in self.pages(API.list_tenants(limit=limit), following):
            yield from answer.value.tenants

    def issue_token(self, tenant_id: str, *, ttl: int | None = None) -> IssuedToken:
        """A new token for the tenant; ``ttl`` seconds of life, or none."""
        return self.send(API.issue_token(tenant_id, ttl=ttl)).value

    def revoke_token(self, tenant_id: str, token_id: str) -> None:
        self.send(API.revoke_token(tenant_id, token_id))

    def list_keys(self) -> list[SigningKey]:
        return self.send(API.list_keys()).value.keys

    def rotate_key(self) -> SigningKey:
        """Add a signing key; it signs from now on, older ones keep verifying."""
        return self.send(API.rotate_key()).value

    def retire_key(self, key_id: str) -> None:
        """Drop a key's secret: tokens and cursors it signed stop working."""
        self.send(API.retire_key(key_id))

    def read_audit(self, *, after: int = 0, limit: int | None = None) -> AuditPage:
        """Up to ``limit`` stored entries after seq ``after``, and the current head."""
        return self.send(API.read_audit(after=after, limit=limit)).value

    def iter_audit(self, *, after: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Every stored entry after seq ``after``, to the head."""
        following = partial(API.next_audit, limit=limit)
        for answer in self.pages(API.read_audit(after=after, limit=limit), following):
            yield from answer.value.entries

    def audit_head(self) -> Checkpoint:
        """The signed checkpoint of the current head."""
        return self.send(API.audit_head()).value

    # -- proofs (v1.1) --

    def checkpoint(self) -> str:
        """The log's latest checkpoint as a C2SP signed note."""
        return self.send(API.checkpoint()).value

    def log_key(self) -> str:
        """The log's verifier key (``<origin>+<key id>+<base64 key>``)."""
        return self.send(API.log_key()).value

    def inclusion_proof(self, seq: int, *, tree_size: int | None = None) -> InclusionProof:
        return self.send(API.inclusion_proof(seq, tree_size=tree_size)).value

    def consistency_proof(self, first: int, to: int | None = None) -> ConsistencyProof:
        return self.send(API.consistency_proof(first, to)).value

    def audit_trail(self, *, after: int = 0, limit: int | None = None) -> Trail:
        """One page of the caller's own audit entries."""
        return self.send(API.audit_trail(after=after, limit=limit)).value
