"""What every route does before its own work: who is asking, limits, parameters, the body.

Checks run in the order README.md states: authentication (401/403), the tenant's rate
limit (429), then, in the handler, query parameters and the body (size 413, media type
415, content 400). Every failure is a problem document; none reads more than it must.
"""

from __future__ import annotations

from typing import TypeVar

from quart import g, request

from actors.service import Service
from actors.tenants.protocol import Source
from server.auth import Authority, Principal
from server.problems import Problem
from server.schemas import decode_body, reject_unknown_params

MAX_BODY = 64 * 1024
T = TypeVar("T")


class Gates:
    """The request checks shared by the blueprints of one app."""

    def __init__(self, service: Service, authority: Authority) -> None:
        self._registry = service.registry
        self._authority = authority

    def principal(self) -> Principal:
        """The caller, from its bearer token (remembered for the request log)."""
        who = self._authority.authenticate(request.headers.get("Authorization"), self._registry)
        g.principal = who
        return who

    def tenant(self) -> str:
        """The calling tenant's id; 403 for the admin token; 429 over the tenant's rate."""
        who = self.principal()
        if who.tenant is None:
            raise Problem("forbidden", "this endpoint takes a tenant token")
        # Right after authentication, before any body is read or any actor is asked.
        self._registry.limits.of(who.tenant).admit()
        return who.tenant

    def anyone(self) -> Principal:
        """A tenant (within its rate) or the operator: the audit log's public reads."""
        who = self.principal()
        if who.tenant is not None:
            self._registry.limits.of(who.tenant).admit()
        return who

    def admin(self) -> Principal:
        """The operator; 403 for a tenant token."""
        who = self.principal()
        if who.kind != "admin":
            raise Problem("forbidden", "this endpoint takes the admin token")
        return who

    @staticmethod
    def source() -> Source:
        """Who asked, as the audit entry records it."""
        return Source(request.remote_addr, g.principal.token_id)

    @staticmethod
    def no_params() -> None:
        if request.query_string:  # parsing an empty query string still costs a MultiDict
            reject_unknown_params(request.args, set())

    @staticmethod
    async def body(schema: type[T], *, optional: bool = False) -> T:
        """The request body, decoded and validated as ``schema``."""
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
