"""Every error of the core, in one tree drawn by cause.

The branches say what a caller may conclude, which is what decides how to react (roll
back, retry, reconcile); the edge maps each leaf to exactly one problem ``code``
(``server/problems.py``), so the HTTP status follows from the leaf, never the other way::

    DomainError                 reaches a caller as a problem document
    ├── RequestRefused          the proxy said no: nothing changed
    │   ├── InvalidRequest        400 invalid_request
    │   ├── QuotaExceeded         403 quota_exceeded
    │   ├── NotFound              404 not_found
    │   ├── Conflict              409 conflict
    │   ├── IdempotencyConflict   409 idempotency_conflict
    │   └── Busy                  429 rate_limited
    ├── NotCarriedOut           a dependency could not act: nothing changed, retry later
    │   ├── FleetError            502 fleet_error (the fleet refused)
    │   ├── FleetUnavailable      503 fleet_unavailable (the call was never sent, or the
    │   │                             fleet said it did not act)
    │   └── AuditUnavailable      503 audit_unavailable (the entry is not durable)
    ├── FleetInDoubt            503 fleet_unavailable: the call went out and no answer came
    │                               back; it may have happened, and it is being reconciled
    └── InternalError           500 internal_error: a bug, never caused by input alone

    StartupError                the data dir or the settings cannot be served (not a
                                request's error: the process stops with its message)

"Nothing happened" (:class:`NotCarriedOut`) and "we do not know what happened"
(:class:`FleetInDoubt`) are siblings, so no handler depends on the order of its
``except`` clauses to tell them apart.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error that is meant to reach a caller as a problem document."""


# -- the proxy refused ---------------------------------------------------------------------


class RequestRefused(DomainError):
    """The proxy refused the request; nothing changed."""


class InvalidRequest(RequestRefused):
    """The request is well-formed but names something the core refuses (e.g. a bad cursor)."""


class QuotaExceeded(RequestRefused):
    """The spawn would take allocation above the ceiling; ``dimension`` says which one."""

    def __init__(self, dimension: str, detail: str) -> None:
        super().__init__(detail)
        self.dimension = dimension


class NotFound(RequestRefused):
    """Unknown tenant or VM, or a VM of another tenant: callers cannot tell which."""


class Conflict(RequestRefused):
    """The resource is in a state that forbids the operation right now."""


class IdempotencyConflict(RequestRefused):
    """An ``Idempotency-Key`` was reused with a different request body."""


class Busy(RequestRefused):
    """A per-tenant limit was hit (request rate, spawns in flight, a full mailbox).

    ``retry_after`` is the whole seconds the caller should wait before trying again;
    ``reason`` says which limit (:data:`BUSY_REASONS`), for the metrics.
    """

    def __init__(self, detail: str, retry_after: int = 1, *, reason: str) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.reason = reason


#: why a request was answered 429: the tenant's request rate, its spawns in flight, its
#: actor's full mailbox, the service (or the actor) stopping, or (replicas on PostgreSQL)
#: the tenant's state changing under a decision, other replicas deciding, until it gave up
BUSY_REASONS = ("rate_limit", "spawn_slots", "mailbox_full", "shutting_down", "contention")


# -- a dependency could not act --------------------------------------------------------------


class NotCarriedOut(DomainError):
    """A dependency (the fleet, the journal) could not act; nothing changed."""


class FleetError(NotCarriedOut):
    """The fleet controller answered with a definite error: the operation did not happen."""


class FleetUnavailable(NotCarriedOut):
    """The fleet was not asked (circuit open, client overloaded) or said it did not act."""


class AuditUnavailable(NotCarriedOut):
    """An audit entry could not be made durable, so the operation was not carried out."""


# -- outcome unknown -------------------------------------------------------------------------


class FleetInDoubt(DomainError):
    """The call went out but no answer came back in time: its outcome is unknown."""


# -- bugs and start-up -----------------------------------------------------------------------


class InternalError(DomainError):
    """The core hit a bug while handling this request (never caused by input alone)."""


class StartupError(Exception):
    """The data dir or the settings cannot be served; the message says why."""
