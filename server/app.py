"""The Quart-Trio application: routes, auth gates, problem mapping, request ids.

Handlers stay thin: authenticate, decode, send one message to the core, shape the answer.
Every error path ends in :func:`~server.problems.problem_response`; the catch-all
handler turns a bug into a bare 500 problem without a traceback, and bad input never
reaches it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any, TypeVar

import msgspec
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from actors.errors import DomainError, FleetInDoubt
from actors.journal.chain import canonical
from actors.journal.reader import AuditReader
from actors.service import Service
from actors.state import VmSpec
from actors.tenants.protocol import Destroy, Replay, Source, Spawn, UpdateQuota
from actors.tenants.views import tenant_view, usage_view, vm_page, vm_view
from server.admin_routes import add_admin_routes
from server.auth import Authority, Principal
from server.observe import count_domain_error, instrument
from server.openapi import openapi_document
from server.problems import Problem, domain_problem, problem_response
from server.responses import json_response
from server.schemas import (
    IDEMPOTENCY_KEY_RE,
    REQUEST_ID_RE,
    CreateTenantBody,
    IssueTokenBody,
    SpawnBody,
    UpdateTenantBody,
    decode_body,
    parse_int,
    reject_unknown_params,
    single,
)

log = logging.getLogger("vm_tenant.http")

MAX_BODY = 64 * 1024
LIVE_STATES = frozenset({"pending", "running", "error"})
T = TypeVar("T")


def create_app(service: Service, authority: Authority, request_log: Any = None) -> QuartTrio:
    """Build the app over a running core (the caller owns the core's lifetime).

    ``request_log`` is the structlog logger of the one-line-per-request log (default: one
    that goes through stdlib ``logging``, which tests capture).
    """
    app = QuartTrio("vm_tenant")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    registry = service.registry
    reader = AuditReader(service.config.data_dir / "audit")

    # -- plumbing ----------------------------------------------------------------------------

    @app.before_request
    async def assign_request_id() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if REQUEST_ID_RE.fullmatch(given) else secrets.token_hex(16)

    @app.after_request
    async def echo_request_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id") or secrets.token_hex(16)
        has_body = request.content_length or "Transfer-Encoding" in request.headers
        if has_body and (response.status_code >= 400 or not g.get("body_read")):
            # An answer sent before the body was read (an error, an automatic OPTIONS, a
            # route that takes no body): Hypercorn cannot then reuse the connection
            # cleanly, and a next request on it can hang, so tell the client not to.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Problem)
    async def on_problem(error: Problem) -> Response:
        return problem_response(error.code, error.detail, error.headers)

    @app.errorhandler(DomainError)
    async def on_domain_error(error: DomainError) -> Response:
        count_domain_error(service.metrics, error)
        problem = domain_problem(error)
        return problem_response(problem.code, problem.detail, problem.headers)

    @app.errorhandler(trio.TooSlowError)
    async def on_too_slow(_: trio.TooSlowError) -> Response:
        error = FleetInDoubt("the operation did not finish in time; it will be reconciled")
        return await on_domain_error(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        if isinstance(error, MethodNotAllowed):
            allow = ", ".join(sorted(error.valid_methods or ()))
            return problem_response(
                "method_not_allowed",
                f"{request.method} is not supported here",
                {"Allow": allow},
            )
        if isinstance(error, RequestEntityTooLarge):
            return problem_response("payload_too_large", f"the body exceeds {MAX_BODY} bytes")
        if error.code == 404:
            return problem_response("not_found", "the requested resource does not exist")
        if error.code is not None and 400 <= error.code < 500:
            return problem_response("invalid_request", error.description or "bad request")
        log.error("unexpected HTTP error %s", error)
        return problem_response("internal_error", "the request could not be completed")

    @app.errorhandler(Exception)
    async def on_bug(error: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
        return problem_response("internal_error", "the request could not be completed")

    instrument(app, service, request_log)

    # -- helpers -----------------------------------------------------------------------------

    def principal() -> Principal:
        g.principal = authority.authenticate(request.headers.get("Authorization"), registry)
        return g.principal

    def tenant_principal() -> Principal:
        who = principal()
        if who.kind != "tenant":
            raise Problem("forbidden", "this endpoint takes a tenant token")
        assert who.tenant is not None
        # Right after authentication, before any body is read or any actor is asked.
        registry.limits.of(who.tenant).admit()
        return who

    def admin_principal() -> Principal:
        who = principal()
        if who.kind != "admin":
            raise Problem("forbidden", "this endpoint takes the admin token")
        return who

    def source(who: Principal) -> Source:
        return Source(request.remote_addr, who.token_id)

    async def read_json(schema: type[T], *, optional: bool = False) -> T:
        length = request.content_length
        if length is not None and length > MAX_BODY:
            raise Problem("payload_too_large", f"the body exceeds {MAX_BODY} bytes")
        data = await request.get_data(cache=False)
        assert isinstance(data, bytes)
        g.body_read = True
        if optional and not data:
            return decode_body(b"{}", schema)
        charset = request.mimetype_params.get("charset", "utf-8").lower()
        if request.mimetype != "application/json" or charset not in ("utf-8", "utf8"):
            raise Problem("unsupported_media_type", "the body must be UTF-8 application/json")
        return decode_body(data, schema)

    def no_params() -> None:
        if request.query_string:  # parsing an empty query string still costs a MultiDict
            reject_unknown_params(request.args, set())

    # -- operations ----------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if not service.ready:
            return problem_response("audit_unavailable", "the audit log is not writable")
        return json_response({"status": "ready"})

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document())

    # -- tenant endpoints ----------------------------------------------------------------------

    @app.post("/v1/vms")
    async def spawn_vm() -> Response:
        who = tenant_principal()
        no_params()
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise Problem("invalid_request", "Idempotency-Key must be 1..255 printable ASCII")
        assert who.tenant is not None
        with registry.limits.of(who.tenant).spawn_slot():
            body = await read_json(SpawnBody)
            spec = VmSpec(body.vcpus, body.memory_mib, body.image, body.name)
            digest = None
            if key is not None:
                digest = hashlib.sha256(canonical(msgspec.structs.asdict(body))).hexdigest()
            result = await registry.call(
                who.tenant,
                lambda reply: Spawn(spec, key, digest, source(who), g.request_id, reply),
            )
        if isinstance(result, Replay):
            replayed = {"Idempotent-Replayed": "true"}
            if result.status != 201:
                return problem_response(result.body["code"], result.body["detail"], replayed)
            result = result.body
            headers = {"Location": f"/v1/vms/{result['id']}", **replayed}
            return json_response(result, 201, headers)
        return json_response(result, 201, {"Location": f"/v1/vms/{result['id']}"})

    @app.get("/v1/vms")
    async def list_vms() -> Response:
        who = tenant_principal()
        assert who.tenant is not None
        reject_unknown_params(request.args, {"limit", "cursor"})
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        cursor = single(request.args, "cursor")
        after = authority.read_cursor(who.tenant, cursor) if cursor is not None else None
        page, last = vm_page(registry.state(who.tenant), after, limit)
        next_cursor = authority.cursor(who.tenant, last) if last is not None else None
        return json_response({"vms": page, "next": next_cursor})

    @app.get("/v1/vms/<vm_id>")
    async def get_vm(vm_id: str) -> Response:
        who = tenant_principal()
        assert who.tenant is not None
        no_params()
        vm = vm_view(registry.state(who.tenant), vm_id)
        if vm["state"] in LIVE_STATES:
            try:
                live = await service.fleet.status(vm_id)
            except DomainError:
                live = None
            if live is not None:
                vm["state"] = live
        return json_response(vm)

    @app.delete("/v1/vms/<vm_id>")
    async def destroy_vm(vm_id: str) -> Response:
        who = tenant_principal()
        assert who.tenant is not None
        no_params()
        result = await registry.call(
            who.tenant, lambda reply: Destroy(vm_id, source(who), g.request_id, reply)
        )
        return json_response(result)

    @app.get("/v1/usage")
    async def usage() -> Response:
        who = tenant_principal()
        assert who.tenant is not None
        no_params()
        return json_response(usage_view(registry.state(who.tenant)))

    # -- admin endpoints ------------------------------------------------------------------------

    @app.post("/v1/admin/tenants")
    async def create_tenant() -> Response:
        who = admin_principal()
        no_params()
        body = await read_json(CreateTenantBody)
        quota = body.quota.to_quota()
        expires = authority.expiry(body.token_ttl_seconds)
        expires_at = authority.expires_at(expires)
        token_id = await registry.create_tenant(
            body.id, quota, source(who), g.request_id, expires_at
        )
        return json_response(
            {
                "id": body.id,
                "quota": quota.to_json(),
                "token": authority.issue(body.id, token_id, expires),
                "token_id": token_id,
                "expires_at": expires_at,
            },
            201,
            {"Location": f"/v1/admin/tenants/{body.id}"},
        )

    @app.get("/v1/admin/tenants/<tenant_id>")
    async def get_tenant(tenant_id: str) -> Response:
        admin_principal()
        no_params()
        return json_response(tenant_view(registry.state(tenant_id)))

    @app.patch("/v1/admin/tenants/<tenant_id>")
    async def update_tenant(tenant_id: str) -> Response:
        who = admin_principal()
        no_params()
        registry.actor(tenant_id)  # 404 before reading the body of an unknown tenant
        body = await read_json(UpdateTenantBody)
        quota = body.quota.to_quota()
        await registry.call(
            tenant_id, lambda reply: UpdateQuota(quota, source(who), g.request_id, reply)
        )
        return json_response(tenant_view(registry.state(tenant_id)))

    @app.delete("/v1/admin/tenants/<tenant_id>")
    async def delete_tenant(tenant_id: str) -> Response:
        who = admin_principal()
        no_params()
        await registry.delete_tenant(tenant_id, source(who), g.request_id)
        return Response(b"", status=204)

    @app.post("/v1/admin/tenants/<tenant_id>/tokens")
    async def issue_token(tenant_id: str) -> Response:
        who = admin_principal()
        no_params()
        registry.actor(tenant_id)
        body = await read_json(IssueTokenBody, optional=True)
        expires = authority.expiry(body.ttl_seconds)
        expires_at = authority.expires_at(expires)
        token_id = await registry.issue_token(tenant_id, source(who), g.request_id, expires_at)
        token = authority.issue(tenant_id, token_id, expires)
        return json_response({"token": token, "token_id": token_id, "expires_at": expires_at}, 201)

    @app.delete("/v1/admin/tenants/<tenant_id>/tokens/<token_id>")
    async def revoke_token(tenant_id: str, token_id: str) -> Response:
        who = admin_principal()
        no_params()
        registry.actor(tenant_id)
        await registry.revoke_token(tenant_id, token_id, source(who), g.request_id)
        return Response(b"", status=204)

    @app.get("/v1/admin/audit")
    async def read_audit() -> Response:
        admin_principal()
        reject_unknown_params(request.args, {"after", "limit"})
        after = parse_int(request.args, "after", 0, 0, 2**63 - 1)
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        seq, head = service.audit.seq, service.audit.head
        lines = await trio.to_thread.run_sync(reader.read, after, limit, seq)
        body = b"".join(
            [
                b'{"entries":[',
                b",".join(lines),
                b'],"head":',
                msgspec.json.encode({"seq": seq, "hash": head}),
                b"}",
            ]
        )
        return Response(body, status=200, content_type="application/json")

    @app.get("/v1/admin/audit/head")
    async def audit_head() -> Response:
        admin_principal()
        no_params()
        checkpoint = service.latest_checkpoint()
        if checkpoint is None:
            raise Problem("not_found", "no checkpoint has been written yet")
        return json_response(checkpoint)

    add_admin_routes(app, registry, authority, admin_principal, read_json)
    return app
