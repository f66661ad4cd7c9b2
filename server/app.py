"""The Quart-Trio application, assembled: hooks, problem mapping, the blueprints.

The routes live in ``server/routes/`` by audience (tenant, admin, audit, operations);
each handler stays thin: pass the gates, decode, send one message to the core or read
through its read surface, answer with its declared struct. Every error path ends in
:func:`~server.problems.problem_response`; the catch-all handler turns a bug into a
bare 500 problem without a traceback, and bad input never reaches it.
"""

from __future__ import annotations

import logging
import secrets
from functools import cache, partial
from typing import Any

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from actors.errors import DomainError, FleetInDoubt
from actors.reply import Receipt
from actors.service import Service
from server.auth import Authority
from server.observe import count_domain_error, instrument
from server.openapi import openapi_document
from server.problems import Problem, domain_problem, problem_response
from server.responses import json_response
from server.routes.admin import admin_routes
from server.routes.audit import audit_routes
from server.routes.gates import MAX_BODY, Gates
from server.routes.operations import operations_routes
from server.routes.tenant import tenant_routes
from server.schemas import REQUEST_ID_RE

log = logging.getLogger("vm_tenant.http")


def create_app(
    service: Service, authority: Authority | None = None, request_log: Any = None
) -> QuartTrio:
    """Build the app over a running core (the caller owns the core's lifetime).

    ``authority`` defaults to the store's keyring and admin token. ``request_log`` is the
    structlog logger of the one-line-per-request log (default: one that goes through
    stdlib ``logging``, which tests capture).
    """
    authority = authority or Authority.for_store(service.store)
    app = QuartTrio("vm_tenant")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    _plumbing(app, service)
    instrument(app, service, request_log)
    gates = Gates(service, authority)
    blueprints = [
        tenant_routes(service, authority, gates),
        admin_routes(service, authority, gates),
        audit_routes(service, gates),
        operations_routes(service),
    ]
    for routes in blueprints:
        app.register_blueprint(routes.blueprint)
    document = cache(partial(openapi_document, blueprints))

    # The description of the blueprints above (not itself among them).
    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(document())

    return app


def _plumbing(app: QuartTrio, service: Service) -> None:
    """Request ids, connection handling, and the mapping of every error to a problem."""

    @app.before_request
    async def assign_request_id() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if REQUEST_ID_RE.fullmatch(given) else secrets.token_hex(16)
        g.receipt = Receipt()

    @app.after_request
    async def echo_request_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id") or secrets.token_hex(16)
        receipt = g.get("receipt")
        if receipt is not None and receipt.seqs:
            # the entries this request appended, whatever its answer (API.md v1.1)
            response.headers["Audit-Seq"] = ", ".join(map(str, receipt.seqs))
        if response.status_code == 204:
            # no content, so nothing to describe (RFC 9110 15.3.5): without this Quart
            # would label the empty answer text/html
            del response.headers["Content-Type"]
            del response.headers["Content-Length"]
        elif request.method == "OPTIONS" and response.content_length == 0:
            del response.headers["Content-Type"]
        has_body = request.content_length or "Transfer-Encoding" in request.headers
        if has_body and (response.status_code >= 400 or not g.get("body_read")):
            # An answer sent before the body was read (an error, an automatic OPTIONS, a
            # route that takes no body): Hypercorn cannot then reuse the connection
            # cleanly, and a next request on it can hang, so tell the client not to.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Problem)
    async def on_problem(error: Problem) -> Response:
        return error.response()

    @app.errorhandler(DomainError)
    async def on_domain_error(error: DomainError) -> Response:
        count_domain_error(service.metrics, error)
        return domain_problem(error).response()

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
