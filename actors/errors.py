"""Domain errors raised by the actors.

Every error the core can report to a caller is one of these; the edge maps each class to
exactly one problem ``code``::

    DomainError
    ├── InvalidRequest        400 invalid_request
    ├── QuotaExceeded         403 quota_exceeded
    ├── NotFound              404 not_found
    ├── Conflict              409 conflict
    ├── IdempotencyConflict   409 idempotency_conflict
    ├── Busy                  429 rate_limited
    ├── FleetError            502 fleet_error
    ├── FleetUnavailable      503 fleet_unavailable
    └── AuditUnavailable      503 audit_unavailable
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error that is meant to reach a caller as a problem document."""


class InvalidRequest(DomainError):
    """The request is well-formed but names something the core refuses (e.g. a bad cursor)."""


class QuotaExceeded(DomainError):
    """The spawn would take allocation above the ceiling; ``dimension`` says which one."""

    def __init__(self, dimension: str, detail: str) -> None:
        super().__init__(detail)
        self.dimension = dimension


class NotFound(DomainError):
    """Unknown tenant or VM, or a VM of another tenant: callers cannot tell which."""


class Conflict(DomainError):
    """The resource is in a state that forbids the operation right now."""


class IdempotencyConflict(DomainError):
    """An ``Idempotency-Key`` was reused with a different request body."""


class Busy(DomainError):
    """A per-tenant limit was hit (request rate, spawns in flight, a full mailbox).

    ``retry_after`` is the whole seconds the caller should wait before trying again.
    """

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class FleetError(DomainError):
    """The fleet controller answered with a definite error: the operation did not happen."""


class FleetUnavailable(DomainError):
    """The fleet could not be reached in time: the outcome of the call is unknown."""


class AuditUnavailable(DomainError):
    """An audit entry could not be made durable, so the operation was not carried out."""
