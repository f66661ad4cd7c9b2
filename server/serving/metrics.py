"""The serving layer's Prometheus metrics, read from its counters when scraped.

Nothing is counted twice on the hot path: the accept loop, the reaper and the
connections keep plain counters (:attr:`~server.serving.listener.Connections.counts`),
and :class:`ServingCollector` turns them into families at scrape time, on the event
loop's thread. What an operator watches: connections open against the ceiling,
refusals (``reason``: ``full``, ``peer``), connections shed for a newcomer, deadlines
that ran out (``phase``: ``idle``, ``head``, ``body``, ``send``), connections ended by
an unexpected error, and ``accept`` failures (out of descriptors).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from server.serving.listener import Connections

PREFIX = "vm_tenant"


class ServingCollector(Collector):
    """Reads one server's connection counters when scraped."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        connections = self._connections
        counts = connections.counts
        yield GaugeMetricFamily(
            f"{PREFIX}_connections", "Connections open now.", connections.admission.active
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_connections_limit",
            "The ceiling on open connections (max_connections, or what descriptors allow).",
            connections.admission.total,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_connections_accepted", "Connections accepted.", counts["accepted"]
        )
        refused = CounterMetricFamily(
            f"{PREFIX}_connections_refused",
            "Connections answered 503 at once: full = the total ceiling and nobody could "
            "yield; peer = the peer address was over its own ceiling.",
            labels=("reason",),
        )
        refused.add_metric(("full",), counts["refused_full"])
        refused.add_metric(("peer",), counts["refused_peer"])
        yield refused
        yield CounterMetricFamily(
            f"{PREFIX}_connections_shed",
            "Connections that kept the server waiting, closed to make room for a newcomer.",
            counts["shed"],
        )
        timeouts = CounterMetricFamily(
            f"{PREFIX}_connection_timeouts",
            "Connections closed because a phase's deadline passed.",
            labels=("phase",),
        )
        for phase in ("idle", "head", "body", "send"):
            timeouts.add_metric((phase,), counts[f"timeout_{phase}"])
        yield timeouts
        yield CounterMetricFamily(
            f"{PREFIX}_connection_failures",
            "Connections ended by an unexpected error (logged as 'connection failed').",
            connections.failures.count,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_accept_errors",
            "accept() failures for lack of descriptors or memory (the loop pauses and retries).",
            counts["accept_errors"],
        )
