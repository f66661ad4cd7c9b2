"""Per-tenant overload limits: a request-rate token bucket and a count of spawns in flight.

The registry owns one :class:`TenantLimiter` per tenant, made on first use and dropped
with the tenant. The edge consults it right after authentication, before it reads a body
or sends anything to the tenant's actor, so a tenant past its limits is refused in
constant time: no mailbox, no audit entry, no fleet call, and no state shared with any
other tenant (each limiter is plain data touched only from the event loop thread, so it
needs no lock). Time is Trio's monotonic clock, so tests drive it with ``MockClock``.

A refusal is :class:`~actors.errors.Busy` (429 ``rate_limited``) with ``retry_after``,
the whole seconds until the bucket holds a token again (at least 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from actors.errors import Busy


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The limits every tenant gets: ``rate`` requests/s (0 = off) with a bucket of
    ``burst``, and at most ``max_inflight_spawns`` spawns at a time (0 = off)."""

    rate: float = 50.0
    burst: int = 100
    max_inflight_spawns: int = 32

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, not {self.rate!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, not {self.burst!r}")
        if self.max_inflight_spawns < 0:
            raise ValueError(f"max_inflight_spawns must be >= 0, not {self.max_inflight_spawns!r}")


def retry_after(wait: float) -> int:
    """``Retry-After`` for a wait of ``wait`` seconds: whole seconds, rounded up, >= 1."""
    # The tolerance keeps float noise (1.0000000000002 s) from adding a whole second.
    return max(1, math.ceil(wait - 1e-9))


class TokenBucket:
    """A bucket of at most ``burst`` tokens, refilled at ``rate`` tokens per second.

    It stores the token count at the last update and refills lazily from the elapsed
    time, so it costs nothing between requests and needs no timer task.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def tokens(self, now: float) -> float:
        """The tokens available at ``now`` (a fraction while refilling)."""
        # max(): a clock that seems to step back must not drain the bucket.
        elapsed = max(0.0, now - self._stamp)
        return min(float(self.burst), self._tokens + elapsed * self.rate)

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one will be there.

        A refused request takes nothing, so refusals do not push the next success away.
        """
        self._tokens = self.tokens(now)
        self._stamp = max(self._stamp, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class TenantLimiter:
    """One tenant's limits: its request bucket and its count of spawns in flight."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self._bucket = (
            TokenBucket(settings.rate, settings.burst, trio.current_time())
            if settings.rate > 0
            else None
        )
        self.spawns_in_flight = 0

    def admit(self) -> None:
        """Count one request against the rate; ``Busy`` when the bucket is empty."""
        if self._bucket is None:
            return
        wait = self._bucket.take(trio.current_time())
        if wait > 0:
            raise Busy(
                f"over this tenant's limit of {self.settings.rate:g} requests/s",
                retry_after=retry_after(wait),
            )

    @contextmanager
    def spawn_slot(self) -> Iterator[None]:
        """Hold one of the tenant's in-flight spawn slots; ``Busy`` when none is free.

        The slot is the edge's: it is held while the request waits for its answer and
        freed when the request ends, also when the caller goes away early.
        """
        limit = self.settings.max_inflight_spawns
        if limit and self.spawns_in_flight >= limit:
            raise Busy(f"this tenant already has {limit} spawns in flight", retry_after=1)
        self.spawns_in_flight += 1
        try:
            yield
        finally:
            self.spawns_in_flight -= 1


class TenantLimits:
    """The limiters of all tenants, keyed by tenant id; owned by the tenant registry."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self._limiters: dict[str, TenantLimiter] = {}

    def of(self, tenant_id: str) -> TenantLimiter:
        """The tenant's limiter, made (with a full bucket) on first use. Never awaits."""
        limiter = self._limiters.get(tenant_id)
        if limiter is None:
            limiter = self._limiters[tenant_id] = TenantLimiter(self.settings)
        return limiter

    def forget(self, tenant_id: str) -> None:
        """Drop a deleted tenant's limiter (a tenant re-created later starts afresh)."""
        self._limiters.pop(tenant_id, None)
