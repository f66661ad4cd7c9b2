"""RFC 9457 problem documents: the one place that maps errors to status and ``code``."""

from __future__ import annotations

from typing import Any

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


class Problem(Exception):
    """An error raised at the edge that already knows its problem ``code``."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def problem_body(code: str, detail: str) -> dict[str, Any]:
    status, title = CODES[code]
    return {
        "type": PROBLEM_TYPE + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }


def problem_response(code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = problem_body(code, detail)
    response = Response(
        msgspec.json.encode(body), status=body["status"], content_type="application/problem+json"
    )
    if code == "unauthorized":
        response.headers["WWW-Authenticate"] = "Bearer"
    if code == "rate_limited":
        response.headers["Retry-After"] = "1"
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
            return Problem(code, detail)
    return Problem("internal_error", INTERNAL_DETAIL)
