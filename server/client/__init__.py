"""A typed Python client of the vm-tenant HTTP API; every HTTP call of the CLI goes here.

Usable on its own::

    from server.client import Client, Quota

    with Client("http://127.0.0.1:8080", token=admin_token) as admin:
        created = admin.create_tenant("acme", Quota(vcpus=8, memory_mib=16384, vms=4))
    with Client("http://127.0.0.1:8080", token=created.token) as acme:
        vm = acme.spawn_vm(vcpus=2, memory_mib=2048, image="debian-12", name="web-1")
        print(acme.get_vm(vm.id).state)

Each API operation is a method with typed arguments that returns a msgspec Struct
(:mod:`server.client.models`), or None for a ``204``. Underneath, :class:`API` describes
each operation as an :class:`Operation` value (:mod:`server.client.operations`) and
:meth:`Client.send` performs one, returning an :class:`Answer`: the typed value with the
exact body and the headers (``Audit-Seq``, ``Location``, ``Idempotent-Replayed``), for
callers that need more than the value. Failures raise the small tree of
:mod:`server.client.errors`: :class:`ApiError` (the server refused: 4xx),
:class:`ServerError` (5xx) and :class:`Unreachable` (no usable answer).
"""

from server.client.errors import ApiError, ClientError, ServerError, Unreachable
from server.client.models import (
    AuditPage,
    Checkpoint,
    ConsistencyProof,
    CreatedTenant,
    DestroyedVm,
    Empty,
    Head,
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
from server.client.operations import API, Answer, Operation, segment
from server.client.sync import DEFAULT_TIMEOUT, DEFAULT_URL, Client

__all__ = [
    "API",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "Answer",
    "ApiError",
    "AuditPage",
    "Checkpoint",
    "Client",
    "ClientError",
    "ConsistencyProof",
    "CreatedTenant",
    "DestroyedVm",
    "Empty",
    "Head",
    "InclusionProof",
    "IssuedToken",
    "KeyList",
    "Operation",
    "Quota",
    "ServerError",
    "SigningKey",
    "Tenant",
    "TenantPage",
    "Trail",
    "Unreachable",
    "Usage",
    "Vm",
    "VmPage",
    "segment",
]
