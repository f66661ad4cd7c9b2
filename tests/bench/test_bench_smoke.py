"""The benchmark harness still runs: its parsers on canned input, and (with wrk) a tiny run.

No timing thresholds: figures depend on the machine. The live part needs ``wrk`` on PATH
(``apt-get install -y wrk``) and is skipped cleanly without it; it runs two scenarios at
one concurrency for one second each against both servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from actors.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
# bench/ is not an installed package; `python -m pytest` from the root finds it anyway,
# a bare `pytest` needs the root on the path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fsyncs, metrics, report, scale_report  # noqa: E402
from bench.run import SCENARIOS, parse_args  # noqa: E402
from bench.wrk import REPORT_PREFIX, find_wrk, parse_wrk_output  # noqa: E402

WRK_SAMPLE = """\
Running 1s test @ http://127.0.0.1:8090
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.16ms    1.58ms  12.09ms   69.92%
    Req/Sec   640.00     50.00   700.00     80.00%
  645 requests in 1.00s, 196.02KB read
  Non-2xx or 3xx responses: 5
Requests/sec:    643.90
Transfer/sec:    195.69KB
BENCH_JSON {"requests":645,"duration_us":1001695,"bytes":200725,\
"errors":{"connect":0,"read":1,"write":0,"status":5,"timeout":2},\
"latency_us":{"min":3600,"mean":6157.7,"stdev":1581.2,"max":12089,\
"p50":6065,"p90":8346,"p99":11234,"p999":12089},"statuses":{"201":640,"429":5},\
"writes_acked":640}
"""


def test_parse_wrk_output_keeps_errors_apart() -> None:
    result = parse_wrk_output(WRK_SAMPLE)
    assert result.requests == 645
    assert result.statuses == {201: 640, 429: 5}
    assert result.non_2xx == 5
    assert result.errors == 3  # one read error, two timeouts
    assert result.writes_acked == 640
    assert result.latency_us["p99"] == 11234
    assert round(result.rps) == 644
    assert result.to_json()["statuses"] == {"201": 640, "429": 5}


def test_parse_wrk_output_without_report_line_fails() -> None:
    with pytest.raises(RuntimeError, match=REPORT_PREFIX.strip()):
        parse_wrk_output("Running 1s test @ http://127.0.0.1:1\n")


def test_sync_lines(tmp_path: Path) -> None:
    trace = tmp_path / "proxy.strace"
    trace.write_text(
        "101 1700000000.100000 fsync(7 <unfinished ...>\n"
        "102 1700000000.200000 openat(AT_FDCWD, ...) = 3\n"
        "101 1700000000.300000 <... fsync resumed>) = 0\n"
        "101 1700000001.500000 fdatasync(9) = 0\n"
        "1700000002.000000 fsync(3) = 0\n"
    )
    times = fsyncs.sync_times(trace)
    assert len(times) == 3
    assert fsyncs.count_in(times, 1700000000.0, 1700000001.9) == 2


def test_metrics_scrape_parse_and_delta() -> None:
    """The proxy's real registry, rendered as /metrics renders it, read back by the bench."""
    registry = Metrics()
    registry.audit_batch_size.observe(1)
    registry.audit_fsync.observe(0.001)
    registry.http_requests.labels("POST", "/v1/vms", "201").inc()
    before = metrics.parse(generate_latest(registry.registry).decode())
    for size in (3, 5):
        registry.audit_batch_size.observe(size)
        registry.audit_fsync.observe(0.002)
    registry.audit_batch_size.observe(2)
    registry.audit_fsync_failed.inc()
    registry.http_requests.labels("POST", "/v1/vms", "201").inc(4)
    registry.http_requests.labels("DELETE", "/v1/vms/<vm_id>", "200").inc(2)
    registry.http_requests.labels("POST", "/v1/vms", "409").inc()  # not an acked write
    registry.http_requests.labels("GET", "/v1/vms/<vm_id>", "200").inc(9)
    registry.fleet_call("spawn", "ok", 0.01)
    after = metrics.parse(generate_latest(registry.registry).decode())
    figures = metrics.delta(before, after)
    assert figures["metrics_audit_fsyncs"] == 2
    assert figures["metrics_audit_batches"] == 3
    assert figures["metrics_audit_entries"] == 10
    assert figures["metrics_audit_failures"] == 1
    assert figures["metrics_writes_acked"] == 6
    assert figures["metrics_fsync_mean_ms"] == 2.0
    assert figures["metrics_fleet_calls"] == {"spawn/ok": 1}


def _run(server: str, rps_requests: int, non_2xx: int = 0) -> dict[str, object]:
    return {
        "scenario": "spawn",
        "concurrency": 16,
        "server": server,
        "requests": rps_requests,
        "duration_s": 1.0,
        "latency_us": {"p50": 1000.0, "p99": 3000.0},
        "non_2xx": non_2xx,
        "errors": 0,
        "writes_acked": rps_requests - non_2xx,
        "syncs": 10 if server == "proxy" else 0,
    }


def test_report_rows_and_targets() -> None:
    table = report.rows([_run("floor", 1000), _run("proxy", 800, non_2xx=3)])
    assert table[0]["ratio"] == 0.8
    assert table[0]["proxy"]["non_2xx"] == 3
    assert "| spawn | 16 | 1000 | 800 | 0.80 |" in report.throughput_table(table)
    names = {check["target"] for check in report.targets(table, [])}
    assert names == {"spawn rps >= 0.75 x floor", "p99 <= 1.5 x floor p99 + 2 ms"}


def test_fsync_target_prefers_the_proxys_counters() -> None:
    proxy = _run("proxy", 800) | {"concurrency": 64, "audit_batches": 400, "audit_entries": 1600}
    proxy |= {"metrics_audit_fsyncs": 120, "metrics_audit_batches": 120}
    proxy |= {"metrics_audit_entries": 1600, "metrics_audit_failures": 0}
    proxy |= {"metrics_writes_acked": 801}
    floor = _run("floor", 1000) | {"concurrency": 64}
    table = report.rows([floor, proxy])
    side = table[0]["proxy"]
    assert side["metrics_fsyncs_per_write"] == 0.15
    assert side["metrics_entries_per_batch"] == 13.33
    (check,) = [c for c in report.targets(table, []) if "fsyncs" in c["target"]]
    assert check["target"].endswith("(metrics)")
    assert check["value"] == 0.15 and check["ok"]
    text = report.sync_table(table, [])
    assert "fsyncs / acked write (metrics) | entries / batch (metrics) |" in text
    assert text.splitlines()[-1].endswith(
        "| 800 | 801 | 10 | 0.013 | - | 400 | 0.500 | 4.0 | 0.150 | 13.3 |"
    )
    # Without the counters the audit log's batches decide, as before.
    plain = report.rows([floor, _run("proxy", 800) | {"concurrency": 64, "audit_batches": 400}])
    (check,) = [c for c in report.targets(plain, []) if "fsyncs" in c["target"]]
    assert check["target"] == "audit fsyncs / acked write < 0.2" and check["value"] == 0.5


def test_cli_defaults() -> None:
    args = parse_args(["--quick"])
    assert args.quick and args.scenarios == list(SCENARIOS)


@pytest.mark.skipif(find_wrk() is None, reason="wrk is not installed (apt-get install -y wrk)")
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.run", "--quick", "--scenarios", "status,pairs"]
    command += ["--concurrency", "2", "--status-vms", "4", "--no-plot"]
    command += ["--results-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    document = json.loads(result.read_text())
    assert [(r["scenario"], r["concurrency"]) for r in document["rows"]] == [
        ("status", 2),
        ("pairs", 2),
    ]
    assert len(document["runs"]) == 4
    for run in document["runs"]:
        assert run["requests"] > 0
        assert run["non_2xx"] == 0, run
    pairs = document["rows"][1]["proxy"]
    assert pairs["writes_acked"] > 0
    assert pairs["metrics_audit_batches"] > 0
    # The proxy's own counters, scraped from its /metrics around each run.
    assert pairs["metrics_writes_acked"] > 0
    assert pairs["metrics_audit_fsyncs"] > 0
    assert pairs["metrics_audit_failures"] == 0
    assert isinstance(pairs["metrics_fsyncs_per_write"], float)
    assert isinstance(pairs["metrics_entries_per_batch"], float)
    assert document["rows"][0]["proxy"]["metrics_audit_fsyncs"] == 0  # status writes nothing
    assert "fsyncs / acked write (metrics) | entries / batch (metrics) |" in done.stdout
    if shutil.which("strace") is not None:
        (probe,) = document["fsync_probe"]
        assert probe["proxy"]["syncs"] > 0
        assert isinstance(probe["proxy"]["metrics_fsyncs_per_write"], float)


def test_scale_script_quick_mode_runs(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick", "--out", str(out)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
    figures = json.loads(out.read_text())
    assert figures["replay"]["entries"] > 1000
    full = figures["memory_full"]
    assert (full["tenants"], full["vms"]) == (50, 600)
    assert full["active_actors"] == 50 and full["active_after_idle"] == 0
    assert full["listing"]["tenant_vms"] == 300
    for key in ("restart_full", "restart_history_1000", "restart_history_4000"):
        assert figures[key]["startup_s"] > 0
    assert figures["summary"]["bytes_per_vm"] != 0
    # bench.run --scale renders these figures and checks them against the targets.
    rendered = scale_report.table(figures)
    assert "| full replay |" in rendered and "| audit verify |" in rendered
    checks = {c["target"]: c for c in scale_report.targets(figures)}
    assert checks["no actor left after idling"]["ok"]
    assert checks["start-up < 3 s with 4,000 entries"]["value"] > 0
