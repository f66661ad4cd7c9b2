"""The operator's routes: tenants, their tokens, and the token-signing keys (admin token).

``GET /v1/admin/tenants`` pages through the tenants by id with a signed cursor.
``/v1/admin/keys`` lists, rotates and retires the keys that sign tokens and cursors, on
the running server, so an operator rotates without downtime. Key changes are not audit
operations (the audit ``op`` list is closed); they are logged instead.
"""

from __future__ import annotations

import logging

from quart import g, request

from actors.service import Service
from actors.tenants.protocol import UpdateQuota
from actors.views import Tenant
from server.auth import Authority
from server.keyring import SigningKeyInUse, UnknownKey
from server.problems import Problem
from server.responses import CreatedTenant, KeyList, SigningKey, TenantList, Token
from server.routes.gates import Gates
from server.routes.spec import CURSOR, LIMIT, Operation, Param, Routes
from server.schemas import (
    TENANT_ID_RE,
    CreateTenantBody,
    EmptyBody,
    IssueTokenBody,
    UpdateTenantBody,
    parse_int,
    reject_unknown_params,
    single,
)

log = logging.getLogger("vm_tenant.http")

#: the cursor scope of the tenant list; never a tenant id, so VM cursors do not fit it
TENANT_CURSOR_SCOPE = ":tenants"

TENANT_ID = Param(
    "id", "path", {"type": "string", "pattern": f"^{TENANT_ID_RE.pattern}$"}, variable="tenant_id"
)
TOKEN_ID = Param("token_id", "path", {"type": "string"})
KEY_ID = Param("key_id", "path", {"type": "string"})
REVOKE_LINK = {
    "RevokeToken": {
        "operationId": "revokeToken",
        "parameters": {"id": "$request.path.id", "token_id": "$response.body#/token_id"},
    }
}


def admin_routes(service: Service, authority: Authority, gates: Gates) -> Routes:
    """The admin blueprint over a running core."""
    routes = Routes("admin")
    registry, reads, keyring = service.registry, service.reads, authority.keyring

    # -- tenants ---------------------------------------------------------------------------

    @routes.operation(
        Operation(
            "POST", "/v1/admin/tenants", "createTenant", "tenants", "Provision a tenant", "admin",
            201, CreatedTenant, ("conflict", "audit_unavailable"), request=CreateTenantBody,
            headers={"Location": "the new tenant"}, audited=True,
        )
    )  # fmt: skip
    async def create_tenant() -> tuple[CreatedTenant, dict[str, str]]:
        gates.admin()
        gates.no_params()
        body = await gates.body(CreateTenantBody)
        quota = body.quota.to_quota()
        expires = authority.expiry(body.token_ttl_seconds)
        expires_at = authority.expires_at(expires)
        token_id = await registry.create_tenant(
            body.id, quota, gates.source(), g.request_id, expires_at, g.receipt
        )
        token = authority.issue(body.id, token_id, expires)
        created = CreatedTenant(body.id, quota, token, token_id, expires_at)
        return created, {"Location": f"/v1/admin/tenants/{body.id}"}

    @routes.operation(
        Operation(
            "GET", "/v1/admin/tenants", "listTenants", "tenants", "List tenants by id", "admin",
            200, TenantList, params=(LIMIT, CURSOR),
        )
    )  # fmt: skip
    async def list_tenants() -> TenantList:
        gates.admin()
        reject_unknown_params(request.args, {"limit", "cursor"})
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        cursor = single(request.args, "cursor")
        after = None
        if cursor is not None:
            after = authority.read_cursor(TENANT_CURSOR_SCOPE, cursor)
        page, last = await reads.tenants(after, limit)
        next_cursor = authority.cursor(TENANT_CURSOR_SCOPE, last) if last is not None else None
        return TenantList(page, next_cursor)

    @routes.operation(
        Operation(
            "GET", "/v1/admin/tenants/<tenant_id>", "getTenant", "tenants", "A tenant", "admin",
            200, Tenant, ("not_found",), params=(TENANT_ID,),
        )
    )  # fmt: skip
    async def get_tenant(tenant_id: str) -> Tenant:
        gates.admin()
        gates.no_params()
        return await reads.tenant(tenant_id)

    @routes.operation(
        Operation(
            "PATCH", "/v1/admin/tenants/<tenant_id>", "updateTenant", "tenants",
            "Change a tenant's quota", "admin", 200, Tenant,
            ("not_found", "conflict", "rate_limited", "audit_unavailable"), params=(TENANT_ID,),
            request=UpdateTenantBody, audited=True,
        )
    )  # fmt: skip
    async def update_tenant(tenant_id: str) -> Tenant:
        gates.admin()
        gates.no_params()
        await registry.confirm(tenant_id)  # 404 before reading the body of an unknown tenant
        body = await gates.body(UpdateTenantBody)
        quota, source = body.quota.to_quota(), gates.source()
        await registry.call(
            tenant_id, lambda reply: UpdateQuota(quota, source, g.request_id, reply), g.receipt
        )
        return await reads.tenant(tenant_id)

    @routes.operation(
        Operation(
            "DELETE", "/v1/admin/tenants/<tenant_id>", "deleteTenant", "tenants",
            "Deprovision a tenant without VMs; revokes all its tokens", "admin", 204, None,
            ("not_found", "conflict", "rate_limited", "audit_unavailable"), params=(TENANT_ID,),
            audited=True,
        )
    )  # fmt: skip
    async def delete_tenant(tenant_id: str) -> None:
        gates.admin()
        gates.no_params()
        await registry.delete_tenant(tenant_id, gates.source(), g.request_id, g.receipt)

    # -- tokens ------------------------------------------------------------------------------

    @routes.operation(
        Operation(
            "POST", "/v1/admin/tenants/<tenant_id>/tokens", "issueToken", "tokens",
            "Issue a token (optionally with a lifetime)", "admin", 201, Token,
            ("not_found", "audit_unavailable"), params=(TENANT_ID,), request=IssueTokenBody,
            request_required=False, links=REVOKE_LINK, audited=True,
        )
    )  # fmt: skip
    async def issue_token(tenant_id: str) -> Token:
        gates.admin()
        gates.no_params()
        await registry.confirm(tenant_id)
        body = await gates.body(IssueTokenBody, optional=True)
        expires = authority.expiry(body.ttl_seconds)
        expires_at = authority.expires_at(expires)
        token_id = await registry.issue_token(
            tenant_id, gates.source(), g.request_id, expires_at, g.receipt
        )
        return Token(authority.issue(tenant_id, token_id, expires), token_id, expires_at)

    @routes.operation(
        Operation(
            "DELETE", "/v1/admin/tenants/<tenant_id>/tokens/<token_id>", "revokeToken", "tokens",
            "Revoke a token", "admin", 204, None, ("not_found", "audit_unavailable"),
            params=(TENANT_ID, TOKEN_ID), audited=True,
        )
    )  # fmt: skip
    async def revoke_token(tenant_id: str, token_id: str) -> None:
        gates.admin()
        gates.no_params()
        await registry.confirm(tenant_id)
        await registry.revoke_token(tenant_id, token_id, gates.source(), g.request_id, g.receipt)

    # -- signing keys -------------------------------------------------------------------------

    @routes.operation(
        Operation(
            "GET", "/v1/admin/keys", "listKeys", "keys", "The token signing keys (never a secret)",
            "admin", 200, KeyList,
        )
    )  # fmt: skip
    async def list_keys() -> KeyList:
        gates.admin()
        gates.no_params()
        return KeyList(keyring.describe())

    @routes.operation(
        Operation(
            "POST", "/v1/admin/keys", "rotateKey", "keys",
            "Add a signing key; it signs from now on, older keys keep verifying", "admin", 201,
            SigningKey, ("internal_error",), request=EmptyBody, request_required=False,
            headers={"Location": "the new key"},
        )
    )  # fmt: skip
    async def rotate_key() -> tuple[SigningKey, dict[str, str]]:
        gates.admin()
        gates.no_params()
        await gates.body(EmptyBody, optional=True)
        try:
            key = await keyring.rotate()
        except OSError as error:
            log.error("cannot write the keyring: %s", error)
            raise Problem("internal_error", "the keyring could not be written") from None
        return key, {"Location": f"/v1/admin/keys/{key.id}"}

    @routes.operation(
        Operation(
            "DELETE", "/v1/admin/keys/<key_id>", "retireKey", "keys",
            "Retire a key: what only it signed answers 401 (tokens) or 400 (cursors)", "admin",
            204, None, ("not_found", "conflict", "internal_error"), params=(KEY_ID,),
        )
    )  # fmt: skip
    async def retire_key(key_id: str) -> None:
        gates.admin()
        gates.no_params()
        try:
            await keyring.retire(key_id)
        except UnknownKey:
            raise Problem("not_found", "the requested resource does not exist") from None
        except SigningKeyInUse as error:
            raise Problem("conflict", str(error)) from None
        except OSError as error:
            log.error("cannot write the keyring: %s", error)
            raise Problem("internal_error", "the keyring could not be written") from None

    return routes
