"""RFC 9457 problem documents: the one place that maps errors to status and ``code``.

Headers a code always carries are set here too, so that no place that makes a problem can
forget them: ``WWW-Authenticate`` on a 401, ``Retry-After`` on a 429 and on every 503.
A ``quota_exceeded`` problem also names its ``dimension`` (a member of the document, and
of no other code's: :data:`MEMBERS`).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from quart import Response

from actors.errors import (
    AuditUnavailable,
    Busy,
    Conflict,
    DomainError,
    FleetError,
    FleetInDoubt,
    FleetUnavailable,
    IdempotencyConflict,
    InternalError,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
)
from actors.state import Quota

PROBLEM_TYPE = "https://vm-tenant.invalid/problems/"

#: code -> (status, title)
CODES: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "Invalid request"),
    "unauthorized": (401, "Unauthorized"),
    "forbidden": (403, "Forbidden"),
    "quota_exceeded": (403, "Quota exceeded"),
    "not_found": (404, "Not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "conflict": (409, "Conflict"),
    "idempotency_conflict": (409, "Idempotency key reused"),
    "payload_too_large": (413, "Payload too large"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "rate_limited": (429, "Too many requests"),
    "internal_error": (500, "Internal error"),
    "fleet_error": (502, "Fleet error"),
    "fleet_unavailable": (503, "Fleet unavailable"),
    "audit_unavailable": (503, "Audit unavailable"),
    "overloaded": (503, "Overloaded"),
}

_DOMAIN_CODES: list[tuple[type[DomainError], str]] = [
    (InvalidRequest, "invalid_request"),
    (QuotaExceeded, "quota_exceeded"),
    (NotFound, "not_found"),
    (IdempotencyConflict, "idempotency_conflict"),
    (Conflict, "conflict"),
    (Busy, "rate_limited"),
    (FleetError, "fleet_error"),
    (FleetUnavailable, "fleet_unavailable"),
    (FleetInDoubt, "fleet_unavailable"),
    (AuditUnavailable, "audit_unavailable"),
    (InternalError, "internal_error"),
]

#: the single 404 text, so that a missing VM and another tenant's VM read the same
NOT_FOUND_DETAIL = "the requested resource does not exist"
INTERNAL_DETAIL = "the request could not be completed"
#: codes whose detail never comes from the error: a 404 must not tell a missing VM from
#: another tenant's, and a bug's message is for the log, not the caller
_FIXED_DETAILS = {"not_found": NOT_FOUND_DETAIL, "internal_error": INTERNAL_DETAIL}
#: ``Retry-After`` seconds of each 503: the audit writer retries its repair every second;
#: a fleet that failed is left alone by the circuit breaker for its 5 s cooldown; a
#: connection shed by the serving layer may come back at once
RETRY_AFTER_503 = {"audit_unavailable": "1", "fleet_unavailable": "5", "overloaded": "1"}
#: extension members that a code's document always has, and no other code's has
MEMBERS: dict[str, tuple[str, ...]] = {"quota_exceeded": ("dimension",)}


class ProblemBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An RFC 9457 problem document with the stable ``code`` (API.md): every error's body."""

    type: Annotated[str, msgspec.Meta(extra_json_schema={"format": "uri"})]
    title: str
    status: Annotated[int, msgspec.Meta(ge=400, le=599)]
    detail: str
    code: Annotated[str, msgspec.Meta(extra_json_schema={"enum": sorted(CODES)})]
    dimension: (
        Annotated[
            str,
            msgspec.Meta(
                description="quota_exceeded only: the dimension the spawn would take over "
                "its ceiling",
                extra_json_schema={"enum": list(Quota.__struct_fields__)},
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


class Problem(Exception):
    """An error raised at the edge that already knows its problem ``code``."""

    def __init__(
        self,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
        *,
        dimension: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        #: ``quota_exceeded``: the member of the same name
        self.dimension = dimension

    def response(self) -> Response:
        return problem_response(self.code, self.detail, self.headers, dimension=self.dimension)


def problem_body(code: str, detail: str, dimension: str | None = None) -> ProblemBody:
    status, title = CODES[code]
    return ProblemBody(
        PROBLEM_TYPE + code.replace("_", "-"),
        title,
        status,
        detail,
        code,
        msgspec.UNSET if dimension is None else dimension,
    )


def problem_response(
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    dimension: str | None = None,
) -> Response:
    body = problem_body(code, detail, dimension)
    response = Response(
        msgspec.json.encode(body), status=body.status, content_type="application/problem+json"
    )
    if code == "unauthorized":
        response.headers["WWW-Authenticate"] = "Bearer"
    if code == "rate_limited":
        response.headers["Retry-After"] = "1"
    if code in RETRY_AFTER_503:
        response.headers["Retry-After"] = RETRY_AFTER_503[code]
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def domain_problem(error: DomainError) -> Problem:
    """The problem for a domain error raised by the core."""
    for cls, code in _DOMAIN_CODES:
        if isinstance(error, cls):
            detail = _FIXED_DETAILS.get(code) or str(error)
            if isinstance(error, Busy):
                return Problem(code, detail, {"Retry-After": str(error.retry_after)})
            if isinstance(error, QuotaExceeded):
                return Problem(code, detail, dimension=error.dimension)
            return Problem(code, detail)
    return Problem("internal_error", INTERNAL_DETAIL)
