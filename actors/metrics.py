"""The service's Prometheus metrics: one registry, owned by the running service.

:class:`Metrics` holds a :class:`~prometheus_client.CollectorRegistry` of its own (never
the module-level default registry) and every metric family the core and the edge update.
Hot paths keep the labelled children they use, so an update is one dictionary lookup and
an increment; families whose label values are open-ended (``status``, ``reason``) build
their children on first use and keep them too.

Values that already live in the actors' state (live actors, mailbox depths, VMs in
doubt, the audit head, the fleet breaker, the last checkpoint and snapshot) are not
mirrored into gauges on every change: the :class:`StateCollector` calls a reading
function at scrape time, on the event loop's thread, so it sees each actor's state
between two of its turns. This module knows no actor: the service wires the reading
function to them (``actors/service.py``).

The registry also holds the process collector (``process_*``: resident memory, open
file descriptors, start time, CPU seconds) and ``vm_tenant_build_info``. Counters and
histograms carry no ``_created`` series in the exposition: :func:`without_created` drops
them from this registry's scrape only (prometheus_client's own switch is process-wide).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from actors.errors import BUSY_REASONS
from actors.state import IN_DOUBT_STATES

PREFIX = "vm_tenant"
FLEET_OPERATIONS = ("spawn", "destroy", "status", "list")
#: ``ok``: an answer; ``error``: a definite refusal; ``in_doubt``: sent, no answer;
#: ``unavailable``: the fleet said it did not act; ``timeout``: the call's deadline
#: expired; ``refused``: never sent (circuit open, client overloaded)
FLEET_RESULTS = ("ok", "error", "in_doubt", "unavailable", "timeout", "refused")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BREAKER_STATES = ("closed", "open", "half_open")
#: the distribution this code is installed as (for ``vm_tenant_build_info``)
DISTRIBUTION = "service-vm-tenant"


def build_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def child(cache: dict[tuple[str, ...], Any], family: Any, *labels: str) -> Any:
    """``family.labels(*labels)``, remembered in ``cache``.

    ``labels()`` takes the family's lock and checks the names on every call; a request
    path that counts something each time keeps the children it made instead.
    """
    found = cache.get(labels)
    if found is None:
        found = cache[labels] = family.labels(*labels)
    return found


class Metrics:
    """Every metric family of one running service, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template (never the raw path) and status.",
            ("method", "route", "status"),
            registry=r,
        )
        self.http_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from routing a request to its response, by route template.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.quota_rejections = Counter(
            f"{PREFIX}_quota_rejections",
            "Spawns refused because they would exceed the tenant's quota, by dimension.",
            ("dimension",),
            registry=r,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limited",
            "Requests answered 429 rate_limited, by reason: rate_limit (requests/s), "
            "spawn_slots (spawns in flight), mailbox_full, shutting_down.",
            ("reason",),
            registry=r,
        )
        self.audit_batch_size = Histogram(
            f"{PREFIX}_audit_batch_size",
            "Entries made durable by one group commit (one write, one fsync).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.audit_fsync = Histogram(
            f"{PREFIX}_audit_fsync_duration_seconds",
            "Duration of the fsync that makes one audit batch durable.",
            buckets=FSYNC_BUCKETS,
            registry=r,
        )
        self.audit_io_failures = Counter(
            f"{PREFIX}_audit_io_failures",
            "Audit batches not made durable, by the step that failed (write or fsync).",
            ("op",),
            registry=r,
        )
        self.fleet_calls = Counter(
            f"{PREFIX}_fleet_calls",
            "Calls to the fleet controller, by operation and result.",
            ("operation", "result"),
            registry=r,
        )
        self.fleet_duration = Histogram(
            f"{PREFIX}_fleet_call_duration_seconds",
            "Duration of fleet calls that were sent, by operation (any result).",
            ("operation",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audit_write_failed = self.audit_io_failures.labels("write")
        self.audit_fsync_failed = self.audit_io_failures.labels("fsync")
        # Every known (operation, result) exists from the start, so a scrape shows zeros.
        self._fleet_calls: dict[tuple[str, ...], Any] = {
            (op, result): self.fleet_calls.labels(op, result)
            for op in FLEET_OPERATIONS
            for result in FLEET_RESULTS
        }
        self._fleet_duration: dict[tuple[str, ...], Any] = {
            (op,): self.fleet_duration.labels(op) for op in FLEET_OPERATIONS
        }
        # Every reason exists from the start, so that a scrape shows zeros (and rates work).
        self._rate_limited: dict[tuple[str, ...], Any] = {
            (reason,): self.rate_limited.labels(reason) for reason in BUSY_REASONS
        }
        self._quota: dict[tuple[str, ...], Any] = {}
        ProcessCollector(registry=r)
        Info(f"{PREFIX}_build", "The running build.", registry=r).info({"version": build_version()})

    # -- updates used by the actors and the edge -----------------------------------------

    def fleet_call(self, operation: str, result: str, seconds: float | None) -> None:
        """Count one fleet call; ``seconds`` is None for a call that was never sent."""
        child(self._fleet_calls, self.fleet_calls, operation, result).inc()
        if seconds is not None:
            child(self._fleet_duration, self.fleet_duration, operation).observe(seconds)

    def count_rate_limited(self, reason: str) -> None:
        """Count one 429 answer; call it wherever a 429 ``rate_limited`` is produced."""
        child(self._rate_limited, self.rate_limited, reason).inc()

    def count_quota_rejection(self, dimension: str) -> None:
        child(self._quota, self.quota_rejections, dimension).inc()

    def watch(self, read: Callable[[], StateReading]) -> None:
        """Export the actors' state at scrape time through ``read`` (once the actors exist)."""
        self.registry.register(StateCollector(read))


@dataclass(frozen=True, slots=True)
class StateReading:
    """What the actors' state says at one scrape."""

    active_actors: int
    provisioned_tenants: int
    #: (tenant id, messages waiting) of each running actor
    mailbox_depths: list[tuple[str, int]]
    vms_by_state: dict[str, int]
    audit_seq: int
    audit_queue_depth: int
    audit_healthy: bool
    #: ``closed``, ``open`` (calls refused) or ``half_open`` (the next failure reopens it)
    fleet_breaker: str
    fleet_failures: int
    #: (seq, wall-clock time) of the newest checkpoint and of the snapshot, if any
    checkpoint: tuple[int, float] | None
    snapshot: tuple[int, float] | None


class StateCollector(Collector):
    """Reads the actors' state when scraped; nothing is mirrored on the hot path."""

    def __init__(self, read: Callable[[], StateReading]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        reading = self._read()
        active = reading.active_actors
        passivated = max(0, reading.provisioned_tenants - active)
        family = GaugeMetricFamily(
            f"{PREFIX}_tenant_actors",
            "Tenant actors: active = running now; passivated = provisioned but not running.",
            labels=("state",),
        )
        family.add_metric(("active",), active)
        family.add_metric(("passivated",), passivated)
        yield family

        depth = GaugeMetricFamily(
            f"{PREFIX}_tenant_mailbox_depth",
            "Messages waiting in a running tenant actor's mailbox.",
            labels=("tenant",),
        )
        for tenant_id, waiting in reading.mailbox_depths:
            depth.add_metric((tenant_id,), waiting)
        yield depth

        by_state = reading.vms_by_state
        vms = GaugeMetricFamily(
            f"{PREFIX}_vms",
            "VMs the proxy counts toward allocations, by state.",
            labels=("state",),
        )
        for state, count in sorted(by_state.items()):
            vms.add_metric((state,), count)
        yield vms
        yield GaugeMetricFamily(
            f"{PREFIX}_vms_in_doubt",
            "VMs whose last fleet operation has no durable outcome yet (being reconciled).",
            value=sum(count for state, count in by_state.items() if state in IN_DOUBT_STATES),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_audit_head_seq",
            "Sequence number of the last durable audit entry.",
            value=reading.audit_seq,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_audit_queue_depth",
            "Audit entries submitted and not yet committed.",
            value=reading.audit_queue_depth,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_audit_healthy",
            "1 while the audit log accepts writes, 0 while it needs repair or is damaged.",
            value=1 if reading.audit_healthy else 0,
        )
        breaker = GaugeMetricFamily(
            f"{PREFIX}_fleet_breaker_state",
            "The fleet circuit breaker: 1 for its current state (open: calls refused).",
            labels=("state",),
        )
        for state in BREAKER_STATES:
            breaker.add_metric((state,), 1 if state == reading.fleet_breaker else 0)
        yield breaker
        yield GaugeMetricFamily(
            f"{PREFIX}_fleet_consecutive_failures",
            "Fleet calls failed in a row (in doubt or never sent); the breaker opens at 5.",
            value=reading.fleet_failures,
        )
        now = time.time()
        for name, last, what in (
            ("checkpoint", reading.checkpoint, "signed audit checkpoint"),
            ("snapshot", reading.snapshot, "state snapshot"),
        ):
            yield GaugeMetricFamily(
                f"{PREFIX}_last_{name}_seq",
                f"Audit seq the newest {what} covers (0: none yet).",
                value=0 if last is None else last[0],
            )
            age = GaugeMetricFamily(
                f"{PREFIX}_last_{name}_age_seconds",
                f"Seconds since the newest {what} was written (absent: none yet).",
            )
            if last is not None:
                age.add_metric((), max(0.0, now - last[1]))
            yield age


def without_created(registry: CollectorRegistry) -> Collector:
    """``registry`` as a scrape sees it, minus the ``_created`` series of counters and
    histograms (they double a scrape's size and say nothing an operator alerts on)."""
    return _WithoutCreated(registry)


class _WithoutCreated(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            if any(sample.name == created for sample in metric.samples):
                kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                kept.samples = [s for s in metric.samples if s.name != created]
                yield kept
            else:
                yield metric
