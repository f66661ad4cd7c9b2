"""Turning the runs into figures: aggregates, the Markdown tables, targets, JSON and a plot.

A *run* is one wrk run against one server (a dict, as stored in the JSON). Runs of the
same scenario, concurrency and server (the rounds of the alternation) are pooled:
throughput is all answers over all measured time; p50/p99 are the mean of the rounds'
percentiles (wrk reports percentiles, not a histogram that could be merged); non-2xx
answers and socket errors are summed and shown next to the throughput. CPU time per
answer (user + system of the server process, from ``/proc/PID/stat``) says what each
server's work costs per request; with the core saturated, throughput follows from it.
The proxy's own counters (``metrics_*``, scraped from its ``/metrics`` around each run,
``bench/metrics.py``) give audit fsyncs and entries per group commit, summed like the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

#: the issue's targets
STATUS_RATIO = 0.85
SPAWN_RATIO = 0.75
P99_FACTOR, P99_SLACK_MS, P99_AT = 1.5, 2.0, 16
SYNCS_PER_WRITE, SYNCS_AT = 0.2, 64


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The pooled rounds of one scenario x concurrency x server."""

    rounds: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    writes_acked: int
    syncs: int | None
    audit_batches: int | None
    audit_entries: int | None
    cpu_user_s: float
    cpu_sys_s: float
    metrics_audit_fsyncs: int | None = None
    metrics_audit_batches: int | None = None
    metrics_audit_entries: int | None = None
    metrics_audit_failures: int | None = None
    metrics_writes_acked: int | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        """User + system CPU of the server process per answer, in milliseconds."""
        cpu = self.cpu_user_s + self.cpu_sys_s
        return 1000 * cpu / self.requests if self.requests else 0.0

    @property
    def busy(self) -> float:
        """The server's CPU time over the measured time: 1.0 is one core saturated."""
        return (self.cpu_user_s + self.cpu_sys_s) / self.seconds if self.seconds else 0.0

    @property
    def syncs_per_write(self) -> float | None:
        if self.syncs is None or not self.writes_acked:
            return None
        return self.syncs / self.writes_acked

    @property
    def metrics_fsyncs_per_write(self) -> float | None:
        """Audit fsyncs (the proxy's counter) per write wrk saw acknowledged."""
        if self.metrics_audit_fsyncs is None or not self.writes_acked:
            return None
        return self.metrics_audit_fsyncs / self.writes_acked

    @property
    def metrics_entries_per_batch(self) -> float | None:
        if not self.metrics_audit_batches or self.metrics_audit_entries is None:
            return None
        return self.metrics_audit_entries / self.metrics_audit_batches

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "writes_acked": self.writes_acked,
            "syncs": self.syncs,
            "syncs_per_write": _round(self.syncs_per_write, 4),
            "audit_batches": self.audit_batches,
            "audit_entries": self.audit_entries,
            "cpu_user_s": round(self.cpu_user_s, 3),
            "cpu_sys_s": round(self.cpu_sys_s, 3),
            "cpu_ms_per_request": round(self.cpu_ms_per_request, 3),
            "busy": round(self.busy, 3),
            "metrics_audit_fsyncs": self.metrics_audit_fsyncs,
            "metrics_audit_batches": self.metrics_audit_batches,
            "metrics_audit_entries": self.metrics_audit_entries,
            "metrics_audit_failures": self.metrics_audit_failures,
            "metrics_writes_acked": self.metrics_writes_acked,
            "metrics_fsyncs_per_write": _round(self.metrics_fsyncs_per_write, 4),
            "metrics_entries_per_batch": _round(self.metrics_entries_per_batch, 2),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _sum_or_none(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def aggregate(runs: list[dict[str, Any]]) -> Aggregate:
    return Aggregate(
        rounds=len(runs),
        requests=sum(r["requests"] for r in runs),
        seconds=sum(r["duration_s"] for r in runs),
        p50_ms=fmean(r["latency_us"]["p50"] for r in runs) / 1000,
        p99_ms=fmean(r["latency_us"]["p99"] for r in runs) / 1000,
        non_2xx=sum(r["non_2xx"] for r in runs),
        errors=sum(r["errors"] for r in runs),
        writes_acked=sum(r["writes_acked"] for r in runs),
        syncs=_sum_or_none([r.get("syncs") for r in runs]),
        audit_batches=_sum_or_none([r.get("audit_batches") for r in runs]),
        audit_entries=_sum_or_none([r.get("audit_entries") for r in runs]),
        cpu_user_s=sum(r.get("cpu_user_s", 0.0) for r in runs),
        cpu_sys_s=sum(r.get("cpu_sys_s", 0.0) for r in runs),
        metrics_audit_fsyncs=_sum_or_none([r.get("metrics_audit_fsyncs") for r in runs]),
        metrics_audit_batches=_sum_or_none([r.get("metrics_audit_batches") for r in runs]),
        metrics_audit_entries=_sum_or_none([r.get("metrics_audit_entries") for r in runs]),
        metrics_audit_failures=_sum_or_none([r.get("metrics_audit_failures") for r in runs]),
        metrics_writes_acked=_sum_or_none([r.get("metrics_writes_acked") for r in runs]),
    )


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario x concurrency, in the order they were run."""
    keys: list[tuple[str, int]] = []
    for run in runs:
        key = (run["scenario"], run["concurrency"])
        if key not in keys:
            keys.append(key)
    table = []
    for scenario, conc in keys:
        mine = [r for r in runs if (r["scenario"], r["concurrency"]) == (scenario, conc)]
        floor = aggregate([r for r in mine if r["server"] == "floor"])
        proxy = aggregate([r for r in mine if r["server"] == "proxy"])
        ratio = proxy.rps / floor.rps if floor.rps else 0.0
        table.append(
            {
                "scenario": scenario,
                "concurrency": conc,
                "floor": floor.to_json(),
                "proxy": proxy.to_json(),
                "ratio": round(ratio, 3),
            }
        )
    return table


def _faults(side: dict[str, Any]) -> str:
    text = str(side["non_2xx"])
    return text + (f" (+{side['errors']} socket)" if side["errors"] else "")


def throughput_table(table: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | c | floor rps | proxy rps | ratio | floor p50 / p99 ms "
        "| proxy p50 / p99 ms | non-2xx floor / proxy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in table:
        f, p = row["floor"], row["proxy"]
        lines.append(
            f"| {row['scenario']} | {row['concurrency']} | {f['rps']:.0f} | {p['rps']:.0f} "
            f"| {row['ratio']:.2f} | {f['p50_ms']:.1f} / {f['p99_ms']:.1f} "
            f"| {p['p50_ms']:.1f} / {p['p99_ms']:.1f} | {_faults(f)} / {_faults(p)} |"
        )
    return "\n".join(lines)


def cpu_table(table: list[dict[str, Any]]) -> str:
    """CPU per answer (user + system, from /proc/PID/stat) and how busy each server was."""
    lines = [
        "| scenario | c | floor CPU ms / req | proxy CPU ms / req | proxy extra "
        "| proxy user / sys ms | floor busy | proxy busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in table:
        f, p = row["floor"], row["proxy"]
        requests = p["requests"] or 1
        user, system = 1000 * p["cpu_user_s"] / requests, 1000 * p["cpu_sys_s"] / requests
        lines.append(
            f"| {row['scenario']} | {row['concurrency']} | {f['cpu_ms_per_request']:.2f} "
            f"| {p['cpu_ms_per_request']:.2f} "
            f"| {p['cpu_ms_per_request'] - f['cpu_ms_per_request']:+.2f} "
            f"| {user:.2f} / {system:.2f} | {100 * f['busy']:.0f}% | {100 * p['busy']:.0f}% |"
        )
    return "\n".join(lines)


def probe_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fsync probe's runs (a traced proxy alone), one row per concurrency."""
    return [
        {
            "scenario": r["scenario"],
            "concurrency": r["concurrency"],
            "proxy": aggregate([r]).to_json() | {"sync_mean_ms": r.get("sync_mean_ms")},
        }
        for r in runs
    ]


def _num(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def sync_table(table: list[dict[str, Any]], probe: list[dict[str, Any]]) -> str:
    """Syncs per acknowledged write: the traced probe first, then the measured runs.

    The probe counts every sync call of the process (strace); the measured runs, whose
    proxy is not traced, count audit batches (one fsync each) from the audit log. Both
    also carry the proxy's own counters (``/metrics``): audit fsyncs over the writes wrk
    saw acknowledged, and entries per group commit; "acked (metrics)" is the proxy's
    count of the same writes, a cross-check of wrk's.
    """
    lines = [
        "| run | c | acked writes | acked (metrics) | fsyncs (strace) | fsyncs / write "
        "| mean fsync ms | audit batches | audit batches / write | entries / batch "
        "| fsyncs / acked write (metrics) | entries / batch (metrics) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labelled = [("probe: " + r["scenario"], r) for r in probe]
    labelled += [(r["scenario"], r) for r in table]
    failures: list[str] = []
    for label, row in labelled:
        p = row["proxy"]
        if not p["writes_acked"]:
            continue
        batches, entries, writes = p["audit_batches"], p["audit_entries"], p["writes_acked"]
        lines.append(
            f"| {label} | {row['concurrency']} | {writes} "
            f"| {_num(p.get('metrics_writes_acked'), 'd')} "
            f"| {_num(p['syncs'], 'd')} | {_num(p['syncs_per_write'], '.3f')} "
            f"| {_num(p.get('sync_mean_ms'), '.2f')} "
            f"| {_num(batches, 'd')} "
            f"| {'-' if batches is None else f'{batches / writes:.3f}'} "
            f"| {f'{entries / batches:.1f}' if batches else '-'} "
            f"| {_num(p.get('metrics_fsyncs_per_write'), '.3f')} "
            f"| {_num(p.get('metrics_entries_per_batch'), '.1f')} |"
        )
        if p.get("metrics_audit_failures"):
            failures.append(f"{label} c={row['concurrency']}: {p['metrics_audit_failures']}")
    if failures:
        lines.append("")
        lines.append("audit batches not made durable (metrics): " + ", ".join(failures))
    return "\n".join(lines)


def _fsync_check(
    table: list[dict[str, Any]], probe: list[dict[str, Any]]
) -> tuple[str, list[tuple[dict[str, Any], float | None]]]:
    """The fsync target's name and (row, value) pairs, from the best source measured.

    First the proxy's own counters on the measured (untraced) spawn runs, then on the
    probe's; without counters, the probe's strace count (every sync of the process),
    then the measured runs' audit batches from the log.
    """
    spawn = [r for r in table if r["scenario"] == "spawn" and r["concurrency"] == SYNCS_AT]
    probed = [r for r in probe if r["concurrency"] == SYNCS_AT]
    for candidates in (spawn, probed):
        values = [(r, r["proxy"].get("metrics_fsyncs_per_write")) for r in candidates]
        if values and all(v is not None for _, v in values):
            return "audit fsyncs / acked write < 0.2 (metrics)", values
    if probed:
        return "fsyncs / acked write < 0.2", [(r, r["proxy"]["syncs_per_write"]) for r in probed]
    values = []
    for row in spawn:
        p = row["proxy"]
        batches = p["audit_batches"]
        value = batches / p["writes_acked"] if batches is not None and p["writes_acked"] else None
        values.append((row, value))
    return "audit fsyncs / acked write < 0.2", values


def targets(table: list[dict[str, Any]], probe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked against whatever this run measured.

    Fsyncs per write come from the proxy's own counters when it exported them (see
    :func:`_fsync_check` for the fallbacks).
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, row: dict[str, Any], value: float | None, limit: float, ok: bool) -> None:
        where = {"scenario": row["scenario"], "concurrency": row["concurrency"]}
        checks.append({"target": name, **where, "value": value, "limit": limit, "ok": ok})

    for row in table:
        f, p = row["floor"], row["proxy"]
        if row["scenario"] == "status":
            check("status rps >= 0.85 x floor", row, row["ratio"], STATUS_RATIO,
                  row["ratio"] >= STATUS_RATIO)  # fmt: skip
        if row["scenario"] == "spawn":
            check("spawn rps >= 0.75 x floor", row, row["ratio"], SPAWN_RATIO,
                  row["ratio"] >= SPAWN_RATIO)  # fmt: skip
        if row["concurrency"] == P99_AT:
            limit = round(P99_FACTOR * f["p99_ms"] + P99_SLACK_MS, 3)
            check("p99 <= 1.5 x floor p99 + 2 ms", row, p["p99_ms"], limit,
                  p["p99_ms"] <= limit)  # fmt: skip
    name, values = _fsync_check(table, probe)
    for row, value in values:
        check(name, row, value, SYNCS_PER_WRITE, value is not None and value < SYNCS_PER_WRITE)
    return checks


def targets_text(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.3g}"
        verdict = "ok  " if c["ok"] else "MISS"
        lines.append(
            f"{verdict} {c['target']:<44} {c['scenario']:>7} c={c['concurrency']:<3} "
            f"{value} (limit {c['limit']:.3g})"
        )
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(path)
    return path


def plot(table: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Throughput and p99 vs concurrency, floor vs proxy, one column per scenario.

    Returns None (and says how to get it) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is missing (.venv/bin/pip install matplotlib)")
        return None
    scenarios = list(dict.fromkeys(row["scenario"] for row in table))
    fig, axes = plt.subplots(
        2, len(scenarios), figsize=(4 * len(scenarios), 6.5), squeeze=False, sharex=True
    )
    for col, scenario in enumerate(scenarios):
        mine = sorted(
            (r for r in table if r["scenario"] == scenario), key=lambda r: r["concurrency"]
        )
        conc = [r["concurrency"] for r in mine]
        for side, style in (("floor", "o--"), ("proxy", "s-")):
            rps = [r[side]["rps"] for r in mine]
            p99 = [r[side]["p99_ms"] for r in mine]
            axes[0][col].plot(conc, rps, style, label=side)
            axes[1][col].plot(conc, p99, style, label=side)
        axes[0][col].set_title(scenario)
        axes[0][col].set_ylim(bottom=0)
        axes[1][col].set_ylim(bottom=0)
        axes[1][col].set_xscale("log", base=2)
        axes[1][col].set_xticks(conc, [str(c) for c in conc])
        axes[1][col].set_xlabel("concurrency (connections)")
    axes[0][0].set_ylabel("throughput (requests/s)")
    axes[1][0].set_ylabel("p99 latency (ms)")
    axes[0][0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
