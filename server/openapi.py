"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Request schemas come from the msgspec structs that validate the bodies, so the document
cannot drift from what the server accepts; responses and problems are described here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from server.problems import CODES, RETRY_AFTER_503
from server.schemas import (
    IDEMPOTENCY_KEY_RE,
    MAX_INT,
    REQUEST_ID_RE,
    TENANT_ID_RE,
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


def _header(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"required": True, "schema": schema, "description": description}


#: on every response; the caller's own when it sent a sane one
_REQUEST_ID = _header(
    {"type": "string", "pattern": f"^{REQUEST_ID_RE.pattern}$"}, "the caller's, or a fresh one"
)
#: headers that a problem code always carries (see server/problems.py and server/app.py)
_PROBLEM_HEADERS: dict[str, dict[str, Any]] = {
    "unauthorized": {"WWW-Authenticate": _header({"const": "Bearer"}, "the scheme to use")},
    # a 429 and every 503 say when to try again
    **{
        code: {"Retry-After": _header({"type": "string", "pattern": "^[0-9]+$"}, "seconds to wait")}
        for code in ("rate_limited", *RETRY_AFTER_503)
    },
}


def _json(
    schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": _REQUEST_ID, **(headers or {})},
        "content": {"application/json": {"schema": schema}},
    }


def _problems(*codes: str) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for code in ("unauthorized", "rate_limited", *codes):
        status = str(CODES[code][0])
        entry = responses.setdefault(
            status,
            {
                "description": "",
                "headers": {"X-Request-Id": _REQUEST_ID},
                "content": {"application/problem+json": {"schema": _ref("Problem")}},
            },
        )
        entry["description"] = ", ".join(filter(None, [entry["description"], code]))
        entry["headers"].update(_PROBLEM_HEADERS.get(code, {}))
    return responses


_VM_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_TENANT_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{TENANT_ID_RE.pattern}$"},
}
_INT = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
_SIZE = {"type": "integer", "minimum": 1, "maximum": MAX_INT}
_LOCATION = {"Location": _header({"type": "string"}, "the new resource")}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """A response object: every member always present, no others."""
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }


def _problem_schema() -> dict[str, Any]:
    """RFC 9457's members and ``code``; a ``quota_exceeded`` problem also has ``dimension``."""
    schema = _object(
        {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": {"enum": sorted(CODES)},
        }
    )
    schema["properties"]["dimension"] = {
        "enum": ["vcpus", "memory_mib", "vms"],
        "description": "quota_exceeded only: the dimension the spawn would take over its ceiling",
    }
    schema["if"] = {"properties": {"code": {"const": "quota_exceeded"}}}
    schema["then"] = {"required": ["dimension"]}
    schema["else"] = {"not": {"required": ["dimension"]}}
    return schema


def _op(summary: str, ok: dict[str, Any], *codes: str, **extra: Any) -> dict[str, Any]:
    # Every authenticated route refuses unknown query parameters with a 400.
    codes = ("invalid_request", *codes)
    if "requestBody" in extra:
        codes = (*codes, "payload_too_large", "unsupported_media_type")
    operation = {"summary": summary, "responses": {**ok, **_problems(*dict.fromkeys(codes))}}
    operation.update(extra)
    return operation


@cache
def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [SpawnBody, CreateTenantBody, UpdateTenantBody, QuotaBody, IssueTokenBody, EmptyBody],
        ref_template=REF + "{name}",
    )
    quota = _ref("QuotaBody")
    expires_at = {
        "type": ["string", "null"],
        "format": "date-time",
        "description": "when the token stops working; null: never",
    }
    page = {"type": ["string", "null"]}
    components.update(
        {
            "Vm": _object(
                {
                    "id": {"type": "string"},
                    "tenant": {"type": "string"},
                    "state": {
                        "enum": ["spawning", "pending", "running", "destroying", "unknown", "error"]
                    },
                    "vcpus": _SIZE,
                    "memory_mib": _SIZE,
                    "image": {"type": "string", "minLength": 1, "maxLength": 256},
                    "name": {"type": ["string", "null"], "minLength": 1, "maxLength": 63},
                    "created_at": {"type": "string", "format": "date-time"},
                }
            ),
            "VmList": _object(
                {
                    "vms": {"type": "array", "items": _ref("Vm")},
                    "next": {"type": ["string", "null"]},
                }
            ),
            "Destroyed": _object({"id": {"type": "string"}, "state": {"const": "destroyed"}}),
            "Usage": _object({"tenant": {"type": "string"}, "quota": quota, "allocated": quota}),
            "Tenant": _object({"id": {"type": "string"}, "quota": quota, "allocated": quota}),
            "CreatedTenant": _object(
                {
                    "id": {"type": "string"},
                    "quota": quota,
                    "token": {"type": "string"},
                    "token_id": {"type": "string"},
                    "expires_at": expires_at,
                }
            ),
            "Token": _object(
                {
                    "token": {"type": "string"},
                    "token_id": {"type": "string"},
                    "expires_at": expires_at,
                }
            ),
            "TenantList": _object(
                {"tenants": {"type": "array", "items": _ref("Tenant")}, "next": page}
            ),
            "SigningKey": _object(
                {
                    "id": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "state": {"enum": ["active", "retired"]},
                    "signing": {"type": "boolean"},
                    "retired_at": {"type": ["string", "null"], "format": "date-time"},
                }
            ),
            "KeyList": _object({"keys": {"type": "array", "items": _ref("SigningKey")}}),
            "AuditPage": _object(
                {
                    # entries exactly as stored: see API.md, "Audit log"
                    "entries": {"type": "array", "items": {"type": "object"}},
                    "head": _object(
                        {
                            "seq": {"type": "integer", "minimum": 0},
                            "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        }
                    ),
                }
            ),
            "Checkpoint": _object(
                {
                    "seq": {"type": "integer", "minimum": 1},
                    "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "ts": {"type": "string"},
                    "signature": {"type": "string", "description": "base64 Ed25519"},
                }
            ),
            "Status": _object({"status": {"type": "string"}}),
            "Problem": _problem_schema(),
        }
    )
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": f"^{IDEMPOTENCY_KEY_RE.pattern}$"},
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
    no_content = {"204": {"description": "done", "headers": {"X-Request-Id": _REQUEST_ID}}}
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
                {"201": _json(_ref("Vm"), "spawned", _LOCATION)},
                "invalid_request",
                "forbidden",
                "quota_exceeded",
                "conflict",
                "idempotency_conflict",
                "payload_too_large",
                "unsupported_media_type",
                "fleet_error",
                "fleet_unavailable",
                "audit_unavailable",
                parameters=[idem],
                requestBody=body("SpawnBody"),
            ),
            "get": _op(
                "List the caller's VMs",
                {"200": _json(_ref("VmList"), "a page of VMs")},
                "invalid_request",
                "forbidden",
                parameters=page_params,
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
                {"200": _json(_ref("Destroyed"), "destroyed")},
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
                {"201": _json(_ref("CreatedTenant"), "created, with its first token", _LOCATION)},
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
                {
                    "201": {
                        **_json(_ref("Token"), "issued"),
                        "links": {
                            "RevokeToken": {
                                "operationRef": "#/paths/~1v1~1admin~1tenants~1{id}~1tokens"
                                "~1{token_id}/delete",
                                "parameters": {
                                    "id": "$request.path.id",
                                    "token_id": "$response.body#/token_id",
                                },
                            }
                        },
                    }
                },
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
                "audit_unavailable",
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
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                    },
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
                "responses": {"200": _json(_ref("Status"), "up")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "State recovered and audit writable",
                "security": [],
                "responses": {
                    "200": _json(_ref("Status"), "ready"),
                    "503": _problems("audit_unavailable")["503"],
                },
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
