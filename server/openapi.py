"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Request schemas come from the msgspec structs that validate the bodies, so the document
cannot drift from what the server accepts; responses and problems are described here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from server.problems import CODES
from server.schemas import (
    CreateTenantBody,
    EmptyBody,
    IssueTokenBody,
    QuotaBody,
    SpawnBody,
    UpdateTenantBody,
)

REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problems(*codes: str) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for code in ("unauthorized", "rate_limited", *codes):
        status = str(CODES[code][0])
        entry = responses.setdefault(
            status,
            {
                "description": "",
                "content": {"application/problem+json": {"schema": _ref("Problem")}},
            },
        )
        entry["description"] = ", ".join(filter(None, [entry["description"], code]))
    return responses


_VM_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_TENANT_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(summary: str, ok: dict[str, Any], *codes: str, **extra: Any) -> dict[str, Any]:
    if "requestBody" in extra:
        codes = (*codes, "invalid_request", "payload_too_large", "unsupported_media_type")
    operation = {"summary": summary, "responses": {**ok, **_problems(*dict.fromkeys(codes))}}
    operation.update(extra)
    return operation


@cache
def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [SpawnBody, CreateTenantBody, UpdateTenantBody, QuotaBody, IssueTokenBody, EmptyBody],
        ref_template=REF + "{name}",
    )
    expires_at = {
        "type": ["string", "null"],
        "format": "date-time",
        "description": "when the token stops working; null: never",
    }
    components.update(
        {
            "Vm": {
                "type": "object",
                "required": [
                    "id",
                    "tenant",
                    "state",
                    "vcpus",
                    "memory_mib",
                    "image",
                    "name",
                    "created_at",
                ],
                "properties": {
                    "id": {"type": "string"},
                    "tenant": {"type": "string"},
                    "state": {
                        "enum": ["spawning", "pending", "running", "destroying", "unknown", "error"]
                    },
                    "vcpus": {"type": "integer"},
                    "memory_mib": {"type": "integer"},
                    "image": {"type": "string"},
                    "name": {"type": ["string", "null"]},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "VmList": {
                "type": "object",
                "properties": {
                    "vms": {"type": "array", "items": _ref("Vm")},
                    "next": {"type": ["string", "null"]},
                },
            },
            "Usage": {
                "type": "object",
                "properties": {
                    "tenant": {"type": "string"},
                    "quota": _ref("QuotaBody"),
                    "allocated": _ref("QuotaBody"),
                },
            },
            "Tenant": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "quota": _ref("QuotaBody"),
                    "allocated": _ref("QuotaBody"),
                },
            },
            "CreatedTenant": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "quota": _ref("QuotaBody"),
                    "token": {"type": "string"},
                    "token_id": {"type": "string"},
                    "expires_at": expires_at,
                },
            },
            "Token": {
                "type": "object",
                "properties": {
                    "token": {"type": "string"},
                    "token_id": {"type": "string"},
                    "expires_at": expires_at,
                },
            },
            "TenantList": {
                "type": "object",
                "properties": {
                    "tenants": {"type": "array", "items": _ref("Tenant")},
                    "next": {"type": ["string", "null"]},
                },
            },
            "SigningKey": {
                "type": "object",
                "required": ["id", "created_at", "state", "signing", "retired_at"],
                "properties": {
                    "id": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "state": {"enum": ["active", "retired"]},
                    "signing": {"type": "boolean"},
                    "retired_at": {"type": ["string", "null"], "format": "date-time"},
                },
            },
            "KeyList": {
                "type": "object",
                "properties": {"keys": {"type": "array", "items": _ref("SigningKey")}},
            },
            "AuditPage": {
                "type": "object",
                "properties": {
                    "entries": {"type": "array", "items": {"type": "object"}},
                    "head": {
                        "type": "object",
                        "properties": {"seq": {"type": "integer"}, "hash": {"type": "string"}},
                    },
                },
            },
            "Checkpoint": {
                "type": "object",
                "properties": {
                    "seq": {"type": "integer"},
                    "hash": {"type": "string"},
                    "ts": {"type": "string"},
                    "signature": {"type": "string", "description": "base64 Ed25519"},
                },
            },
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status", "detail", "code"],
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "code": {"enum": sorted(CODES)},
                },
            },
        }
    )
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "replays the first answer for 24 hours; another body answers 409",
    }
    body = lambda name: {  # noqa: E731
        "required": True,
        "content": {"application/json": {"schema": _ref(name)}},
    }
    optional_body = lambda name: {  # noqa: E731
        "required": False,
        "content": {"application/json": {"schema": _ref(name)}},
    }
    no_content = {"204": {"description": "done"}}
    page_params = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    ]
    paths = {
        "/v1/vms": {
            "post": _op(
                "Spawn a VM",
                {"201": _json(_ref("Vm"), "spawned")},
                "invalid_request",
                "forbidden",
                "quota_exceeded",
                "conflict",
                "idempotency_conflict",
                "payload_too_large",
                "unsupported_media_type",
                "fleet_error",
                "fleet_unavailable",
                parameters=[idem],
                requestBody=body("SpawnBody"),
            ),
            "get": _op(
                "List the caller's VMs",
                {"200": _json(_ref("VmList"), "a page of VMs")},
                "invalid_request",
                "forbidden",
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
            ),
        },
        "/v1/vms/{id}": {
            "get": _op(
                "A VM, with its live state",
                {"200": _json(_ref("Vm"), "the VM")},
                "forbidden",
                "not_found",
                parameters=[_VM_ID],
            ),
            "delete": _op(
                "Destroy a VM",
                {"200": _json({"type": "object"}, "destroyed")},
                "forbidden",
                "not_found",
                "conflict",
                "fleet_error",
                "fleet_unavailable",
                "audit_unavailable",
                parameters=[_VM_ID],
            ),
        },
        "/v1/usage": {
            "get": _op("Quota and allocation", {"200": _json(_ref("Usage"), "usage")}, "forbidden")
        },
        "/v1/admin/tenants": {
            "post": _op(
                "Provision a tenant",
                {"201": _json(_ref("CreatedTenant"), "created, with its first token")},
                "invalid_request",
                "forbidden",
                "conflict",
                "audit_unavailable",
                requestBody=body("CreateTenantBody"),
            ),
            "get": _op(
                "List tenants by id",
                {"200": _json(_ref("TenantList"), "a page of tenants")},
                "invalid_request",
                "forbidden",
                parameters=page_params,
            ),
        },
        "/v1/admin/tenants/{id}": {
            "get": _op(
                "A tenant",
                {"200": _json(_ref("Tenant"), "the tenant")},
                "forbidden",
                "not_found",
                parameters=[_TENANT_ID],
            ),
            "patch": _op(
                "Change a tenant's quota",
                {"200": _json(_ref("Tenant"), "updated")},
                "invalid_request",
                "forbidden",
                "not_found",
                "audit_unavailable",
                parameters=[_TENANT_ID],
                requestBody=body("UpdateTenantBody"),
            ),
            "delete": _op(
                "Deprovision a tenant without VMs; revokes all its tokens",
                no_content,
                "invalid_request",
                "forbidden",
                "not_found",
                "conflict",
                "audit_unavailable",
                parameters=[_TENANT_ID],
            ),
        },
        "/v1/admin/tenants/{id}/tokens": {
            "post": _op(
                "Issue a token (optionally with a lifetime)",
                {"201": _json(_ref("Token"), "issued")},
                "forbidden",
                "not_found",
                "audit_unavailable",
                parameters=[_TENANT_ID],
                requestBody=optional_body("IssueTokenBody"),
            ),
        },
        "/v1/admin/tenants/{id}/tokens/{token_id}": {
            "delete": _op(
                "Revoke a token",
                no_content,
                "forbidden",
                "not_found",
                parameters=[
                    _TENANT_ID,
                    {
                        "name": "token_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                ],
            )
        },
        "/v1/admin/keys": {
            "get": _op(
                "The token signing keys (never a secret)",
                {"200": _json(_ref("KeyList"), "the keys, oldest first")},
                "invalid_request",
                "forbidden",
            ),
            "post": _op(
                "Add a signing key; it signs from now on, older keys keep verifying",
                {"201": _json(_ref("SigningKey"), "the new key")},
                "forbidden",
                "internal_error",
                requestBody=optional_body("EmptyBody"),
            ),
        },
        "/v1/admin/keys/{key_id}": {
            "delete": _op(
                "Retire a key: what only it signed answers 401 (tokens) or 400 (cursors)",
                no_content,
                "invalid_request",
                "forbidden",
                "not_found",
                "conflict",
                "internal_error",
                parameters=[
                    {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            )
        },
        "/v1/admin/audit": {
            "get": _op(
                "Read audit entries as stored",
                {"200": _json(_ref("AuditPage"), "entries after `after`")},
                "invalid_request",
                "forbidden",
                parameters=[
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
            )
        },
        "/v1/admin/audit/head": {
            "get": _op(
                "The latest signed checkpoint",
                {"200": _json(_ref("Checkpoint"), "checkpoint")},
                "forbidden",
                "not_found",
            ),
        },
        "/healthz": {
            "get": {
                "summary": "Process up",
                "security": [],
                "responses": {"200": {"description": "up"}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "State recovered and audit writable",
                "security": [],
                "responses": {"200": {"description": "ready"}, **_problems("audit_unavailable")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "service-vm-tenant", "version": "1"},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
