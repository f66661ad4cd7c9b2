"""The exceptions of the client, one small tree::

    ClientError                 anything below
    ├── ApiError                the server answered with an error status: .status, .code,
    │   │                       .detail, .problem (the RFC 9457 document), .request_id,
    │   │                       .retry_after, .audit_seqs. 4xx: refused, nothing happened
    │   │                       beyond what the problem says
    │   └── ServerError         5xx: the server or what it depends on failed; also an
    │                           Unreachable (retry later)
    └── Unreachable             no usable answer: connection refused or reset, timeout,
                                TLS failure, a redirect, a body that is not the API's.
                                For a write, the outcome is unknown: repeat it (a spawn
                                with the same idempotency key is safe to repeat)

Arguments that cannot be sent at all (an empty id, a token with spaces) raise ValueError
before anything is sent.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Anything that went wrong with a request (see the module docstring for the tree)."""


class Unreachable(ClientError):
    """No usable answer from the server; for a write, its outcome is unknown."""


class ApiError(ClientError):
    """The server answered with an error status, usually with an RFC 9457 problem."""

    def __init__(
        self,
        status: int,
        code: str | None,
        detail: str,
        problem: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        retry_after: int | None = None,
        audit_seqs: tuple[int, ...] = (),
    ) -> None:
        super().__init__(status, code, detail)
        self.status = status
        #: the problem's stable ``code`` (``not_found``, ``quota_exceeded``...), or None when
        #: the answer was not a problem document (a proxy's page, Hypercorn's bare 400)
        self.code = code
        self.detail = detail
        self.problem = problem
        self.request_id = request_id
        self.retry_after = retry_after
        self.audit_seqs = audit_seqs

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return f"{self.status}{code}: {self.detail}"


class ServerError(ApiError, Unreachable):
    """A 5xx answer: the server, the fleet or the audit log failed; nothing to fix here."""
