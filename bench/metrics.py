"""The proxy's own counters, scraped from its ``/metrics`` listener around each run.

The proxy runs with ``--metrics-bind`` (``bench/servers.py``); :func:`scrape` reads the
Prometheus text exposition before and after a measured run and :func:`delta` turns the
two :class:`Counters` into that run's figures:

* ``metrics_audit_fsyncs``: audit fsyncs (``_count`` of the fsync duration histogram,
  observed once per batch made durable);
* ``metrics_audit_batches`` / ``metrics_audit_entries``: group commits and the entries
  they carried (``_count`` and ``_sum`` of the batch-size histogram);
* ``metrics_audit_failures``: batches not made durable (write or fsync failed);
* ``metrics_writes_acked``: the proxy's own count of acknowledged writes (``POST /v1/vms``
  answered 201 plus ``DELETE /v1/vms/<vm_id>`` answered 200), a cross-check of wrk's;
* ``metrics_fleet_calls``: fleet calls by ``operation/result`` (non-zero deltas only).

These count the audit writer only; the strace probe (``bench/fsyncs.py``) still counts
every sync call of the process as an independent cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "vm_tenant"
FSYNC_COUNT = f"{PREFIX}_audit_fsync_duration_seconds_count"
FSYNC_SUM = f"{PREFIX}_audit_fsync_duration_seconds_sum"
BATCH_COUNT = f"{PREFIX}_audit_batch_size_count"
BATCH_SUM = f"{PREFIX}_audit_batch_size_sum"
IO_FAILURES = f"{PREFIX}_audit_io_failures_total"
HTTP_REQUESTS = f"{PREFIX}_http_requests_total"
FLEET_CALLS = f"{PREFIX}_fleet_calls_total"
#: (method, route template, status) of the answers that acknowledge a write
ACKED_WRITES = (("POST", "/v1/vms", "201"), ("DELETE", "/v1/vms/<vm_id>", "200"))


@dataclass(frozen=True, slots=True)
class Counters:
    """The counters the bench uses, as read in one scrape (cumulative since start)."""

    fsyncs: float = 0.0
    fsync_seconds: float = 0.0
    batches: float = 0.0
    entries: float = 0.0
    failures: float = 0.0
    writes_acked: float = 0.0
    fleet_calls: dict[str, float] = field(default_factory=dict)


def parse(text: str) -> Counters:
    """The bench's counters out of a Prometheus text exposition (absent ones are 0)."""
    values = {FSYNC_COUNT: 0.0, FSYNC_SUM: 0.0, BATCH_COUNT: 0.0, BATCH_SUM: 0.0}
    failures = writes = 0.0
    fleet: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name in values:
                values[name] = sample.value
            elif name == IO_FAILURES:
                failures += sample.value
            elif name == HTTP_REQUESTS:
                key = (labels.get("method"), labels.get("route"), labels.get("status"))
                if key in ACKED_WRITES:
                    writes += sample.value
            elif name == FLEET_CALLS:
                fleet[f"{labels.get('operation')}/{labels.get('result')}"] = sample.value
    return Counters(
        fsyncs=values[FSYNC_COUNT],
        fsync_seconds=values[FSYNC_SUM],
        batches=values[BATCH_COUNT],
        entries=values[BATCH_SUM],
        failures=failures,
        writes_acked=writes,
        fleet_calls=fleet,
    )


def scrape(url: str, timeout: float = 10.0) -> Counters | None:
    """One scrape of ``url``; None (and a line on stdout) if it cannot be read."""
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
        return parse(response.text)
    except (httpx.HTTPError, ValueError) as error:
        print(f"metrics scrape of {url} failed: {error}", flush=True)
        return None


def delta(before: Counters, after: Counters) -> dict[str, Any]:
    """One run's figures (the ``metrics_*`` keys of a run) from two scrapes."""
    fsyncs = round(after.fsyncs - before.fsyncs)
    seconds = after.fsync_seconds - before.fsync_seconds
    fleet = {
        key: round(value - before.fleet_calls.get(key, 0.0))
        for key, value in after.fleet_calls.items()
        if value != before.fleet_calls.get(key, 0.0)
    }
    return {
        "metrics_audit_fsyncs": fsyncs,
        "metrics_audit_batches": round(after.batches - before.batches),
        "metrics_audit_entries": round(after.entries - before.entries),
        "metrics_audit_failures": round(after.failures - before.failures),
        "metrics_writes_acked": round(after.writes_acked - before.writes_acked),
        "metrics_fsync_mean_ms": round(1000 * seconds / fsyncs, 3) if fsyncs else None,
        "metrics_fleet_calls": fleet,
    }
