"""Per-request observability at the edge: request metrics and one log line per request.

:func:`instrument` hooks an app so that every request the app answers is counted by
method, route *template* (``/v1/vms/<vm_id>``, never the raw path) and status, timed in a
histogram, and logged as one structured line: request id, tenant (``"admin"`` for the
operator, null when unauthenticated), client ip, the trace id of a W3C ``traceparent``
the caller sent, method, route, status, latency and the audit seqs of the entries the
request wrote (its receipt, the same seqs as its ``Audit-Seq`` header). Health probes (``/healthz``,
``/readyz``), which a load balancer sends every few seconds, are logged at debug level.

Nothing else from the request's headers or body is logged: no token, no Authorization.
"""

from __future__ import annotations

import re
import time
from functools import cache
from typing import Any

import structlog
from quart import Response, g, request
from quart_trio import QuartTrio

from actors.errors import Busy, DomainError, QuotaExceeded
from actors.metrics import Metrics, child
from actors.service import Service
from server.logs import request_logger

#: methods counted under their own name; anything else is ``other`` (bounded labels)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
#: routes whose lines are debug level: probes, not API calls
PROBES = frozenset({"/healthz", "/readyz"})

#: version, trace id, parent id, flags; a later version may append fields after a dash
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")


@cache
def template(rule: str) -> str:
    """The route as metrics and logs name it: variables without their converter
    (``/v1/vms/<path:vm_id>`` is ``/v1/vms/<vm_id>``), so labels stay as documented."""
    return re.sub(r"<\w+:(\w+)>", r"<\1>", rule)


def trace_id(values: list[str]) -> str | None:
    """The trace id of a valid W3C ``traceparent`` header, else None (never an error).

    Invalid, per the Trace Context spec: version ``ff``, an all-zero trace or parent
    id, fields after the flags in version ``00``, upper-case hex, or the header sent
    more than once.
    """
    if len(values) != 1:
        return None
    match = _TRACEPARENT_RE.fullmatch(values[0])
    if match is None:
        return None
    version, trace, parent, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace == "0" * 32 or parent == "0" * 16:
        return None
    return trace


def count_domain_error(metrics: Metrics, error: DomainError) -> None:
    """Count the errors that have a metric of their own (quota refusals, 429s)."""
    if isinstance(error, QuotaExceeded):
        metrics.count_quota_rejection(error.dimension)
    elif isinstance(error, Busy):
        metrics.count_rate_limited(error.reason)


class _RequestMetrics:
    """Cached children of the request families, so a request costs two dict lookups."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counts: dict[tuple[str, ...], Any] = {}
        self._durations: dict[tuple[str, ...], Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        metrics = self._metrics
        child(self._counts, metrics.http_requests, method, route, str(status)).inc()
        child(self._durations, metrics.http_duration, route).observe(seconds)


def instrument(
    app: QuartTrio, service: Service, log: structlog.stdlib.BoundLogger | None = None
) -> None:
    """Count, time and log every request ``app`` answers."""
    measure = _RequestMetrics(service.metrics)
    log = log or request_logger()

    @app.before_request
    async def start_observing() -> None:
        g.observed_at = time.perf_counter()

    @app.after_request
    async def observe(response: Response) -> Response:
        started = g.get("observed_at")
        if started is None:
            return response
        seconds = time.perf_counter() - started
        rule = request.url_rule
        route = template(rule.rule) if rule is not None else UNMATCHED
        method = request.method if request.method in KNOWN_METHODS else "other"
        status = response.status_code
        measure.observe(method, route, status, seconds)
        who = g.get("principal")
        receipt = g.get("receipt")
        written = receipt.seqs if receipt is not None else []
        fields: dict[str, Any] = {
            "request_id": g.request_id,
            "tenant": None if who is None else (who.tenant if who.kind == "tenant" else "admin"),
            "ip": request.remote_addr,
            "trace_id": trace_id(request.headers.getlist("traceparent")),
            "method": method,
            "route": route,
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
            "audit_seq": written[-1] if written else None,
        }
        if len(written) > 1:
            fields["audit_seqs"] = written
        if route in PROBES:
            log.debug("request", **fields)
        else:
            log.info("request", **fields)
        return response
