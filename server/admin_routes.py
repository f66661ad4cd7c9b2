"""Admin routes for the tenant directory and the signing keyring.

``GET /v1/admin/tenants`` pages through the tenants by id with a signed cursor.
``/v1/admin/keys`` lists, rotates and retires the keys that sign tokens and cursors, on
the running server, so an operator rotates without downtime. Key changes are not audit
operations (the audit ``op`` list is closed); they are logged instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from actors.tenants.registry import TenantRegistry
from server.auth import Authority, Principal
from server.keyring import SigningKeyInUse, UnknownKey
from server.problems import Problem
from server.responses import json_response
from server.schemas import EmptyBody, parse_int, reject_unknown_params, single

log = logging.getLogger("vm_tenant.http")

#: the cursor scope of the tenant list; never a tenant id, so VM cursors do not fit it
TENANT_CURSOR_SCOPE = ":tenants"


def add_admin_routes(
    app: QuartTrio,
    registry: TenantRegistry,
    authority: Authority,
    admin_principal: Callable[[], Principal],
    read_json: Callable[..., Awaitable[Any]],
) -> None:
    """Register the routes on ``app``, with the app's own auth gate and body reader."""
    keyring = authority.keyring

    @app.get("/v1/admin/tenants")
    async def list_tenants() -> Response:
        admin_principal()
        reject_unknown_params(request.args, {"limit", "cursor"})
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        cursor = single(request.args, "cursor")
        after = None
        if cursor is not None:
            after = authority.read_cursor(TENANT_CURSOR_SCOPE, cursor)
        page, last = registry.list_tenants(after, limit)
        next_cursor = authority.cursor(TENANT_CURSOR_SCOPE, last) if last is not None else None
        return json_response({"tenants": page, "next": next_cursor})

    @app.get("/v1/admin/keys")
    async def list_keys() -> Response:
        admin_principal()
        reject_unknown_params(request.args, set())
        return json_response({"keys": keyring.describe()})

    @app.post("/v1/admin/keys")
    async def rotate_key() -> Response:
        admin_principal()
        reject_unknown_params(request.args, set())
        await read_json(EmptyBody, optional=True)
        try:
            key = await keyring.rotate()
        except OSError as error:
            log.error("cannot write the keyring: %s", error)
            raise Problem("internal_error", "the keyring could not be written") from None
        return json_response(key, 201, {"Location": f"/v1/admin/keys/{key['id']}"})

    @app.delete("/v1/admin/keys/<key_id>")
    async def retire_key(key_id: str) -> Response:
        admin_principal()
        reject_unknown_params(request.args, set())
        try:
            await keyring.retire(key_id)
        except UnknownKey:
            raise Problem("not_found", "the requested resource does not exist") from None
        except SigningKeyInUse as error:
            raise Problem("conflict", str(error)) from None
        except OSError as error:
            log.error("cannot write the keyring: %s", error)
            raise Problem("internal_error", "the keyring could not be written") from None
        return Response(b"", status=204)
