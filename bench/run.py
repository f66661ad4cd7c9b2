"""The side-by-side benchmark: the floor vs ``vm-tenant serve`` under the same wrk load.

Run it from the project root::

    .venv/bin/python -m bench.run --scale    # everything: the matrix, then bench.scale
    .venv/bin/python -m bench.run            # the HTTP matrix only: ~8 minutes on 2 cores
    .venv/bin/python -m bench.run --quick    # a few seconds a scenario, for a smoke check

It starts both servers (``bench/servers.py``: pinned, each a subprocess on 127.0.0.1),
provisions the proxy through its admin API (``bench/provision.py``: one tenant with
pre-created VMs, and ``--tenants`` tenants with one VM each for the mix), then for every
scenario and concurrency runs wrk against the floor and the proxy in alternation,
``--rounds`` times (floor, proxy, floor, proxy, ...), so that drift of the machine hits
both alike (``bench/drive.py``). Scenarios (``bench/<name>.lua``):

* ``status``: ``GET /v1/vms/{id}`` over the pre-created VMs;
* ``spawn``: ``POST /v1/vms``;
* ``pairs``: spawn, then destroy what was spawned;
* ``mix``: round-robin over the tenants: 70% status, 15% spawn, 15% destroy.

The proxy's own counters are scraped from its ``/metrics`` around every run
(``bench/metrics.py``). Then, with strace on PATH, the fsync probe: a second proxy under
strace, spawn at each concurrency, every sync call counted (``bench/fsyncs.py``). It
prints the throughput table, CPU per request, syncs per acknowledged write and the
issue's targets, writes ``<results-dir>/<UTC timestamp>.json`` and plots
``<results-dir>/latest.png`` (``bench/report.py``). Every load goes to 127.0.0.1 only,
and every run is bounded in time; the servers are stopped (SIGTERM, then SIGKILL) whatever happens.

``--scale`` then runs ``bench.scale`` (memory per tenant and VM, passivation, listing
depth, start-up, replay and verify rates; about 15 minutes at full size) in a subprocess
and puts its figures and targets in the same document.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report, scale_report
from bench.drive import Bench, Plan, keep_profiles, prepare_data
from bench.profile import find_py_spy
from bench.servers import STRACE_HINT, Pinning, Server, detect_pinning, start_floor, start_proxy
from bench.wrk import INSTALL_HINT, find_wrk, wrk_version

SCENARIOS = ("status", "spawn", "pairs", "mix")
RESULTS = Path(__file__).resolve().parent / "results"


def _csv_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 or v > 1024 for v in values):
        raise argparse.ArgumentTypeError("expected connection counts 1..1024, e.g. 1,16,64")
    return values


def _csv_scenarios(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"scenarios are {','.join(SCENARIOS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 round, c=1,16")
    parser.add_argument("--scenarios", type=_csv_scenarios, default=list(SCENARIOS))
    parser.add_argument("--concurrency", type=_csv_ints, default=None, help="default 1,16,64")
    parser.add_argument("--duration", type=int, default=None, help="seconds a run (5)")
    parser.add_argument("--rounds", type=int, default=None, help="floor/proxy pairs (3)")
    parser.add_argument("--tenants", type=int, default=None, help="tenants of the mix (1000)")
    parser.add_argument("--status-vms", type=int, default=64, help="VMs of the single tenant")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--no-strace", action="store_true", help="no fsync probe (audit batches only)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy every measured run (skews the figures)"
    )
    parser.add_argument(
        "--scale", action="store_true", help="then bench.scale (tiny sizes with --quick)"
    )
    args = parser.parse_args(argv)
    for name in ("duration", "rounds", "tenants"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 100_000:
            parser.error(f"--{name} must be 1..100000")
    return args


def make_plan(args: argparse.Namespace, *, probe: bool) -> Plan:
    quick = args.quick
    return Plan(
        scenarios=args.scenarios,
        concurrency=args.concurrency or ([1, 16] if quick else [1, 16, 64]),
        duration=args.duration or (1 if quick else 5),
        rounds=args.rounds or (1 if quick else 3),
        warmup=0 if quick else 1,
        tenants=args.tenants or (20 if quick else 1000),
        status_vms=args.status_vms,
        pause=0.2 if quick else 0.5,
        fsync_probe=probe,
    )


def machine(wrk: str, pinning: Pinning) -> dict[str, Any]:
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            name, _, value = line.partition(":")
            cpu[name.strip()] = value.strip()
    except OSError:
        pass
    model = cpu.get("model name", "unknown")
    if "cpu family" in cpu:
        model += f" (family {cpu['cpu family']} model {cpu.get('model', '?')})"
    versions: dict[str, str | None] = {}
    for package in ("hypercorn", "quart", "quart-trio", "trio", "msgspec", "h11"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "cpu_mhz": cpu.get("cpu MHz"),
        "kernel": platform.release(),
        "wrk": wrk_version(wrk),
        "pinning": pinning.description,
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = find_wrk()
    if wrk is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    probe = not args.no_strace and shutil.which("strace") is not None
    if not probe and not args.no_strace:
        print(STRACE_HINT, file=sys.stderr)
    plan = make_plan(args, probe=probe)
    py_spy = find_py_spy() if args.profile else None
    if args.profile and py_spy is None:
        print("py-spy is not installed (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    pinning = detect_pinning()
    info = machine(wrk, pinning)
    print(f"{info['cpu_model']}, {info['nproc']} cores, Python {info['python']}", flush=True)
    print(pinning.description, flush=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    profiles: list[str] = []
    probe_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vm-tenant-bench-") as tmp:
        workdir = Path(tmp)
        servers: list[Server] = []
        try:
            servers.append(start_floor(workdir, pinning, trace=False))
            proxy, data_dir = start_proxy(workdir, pinning, trace=False)
            servers.append(proxy)
            data = prepare_data(proxy, data_dir, plan, workdir)
            bench = Bench(plan, wrk, pinning, servers[0], proxy, data, workdir, py_spy)
            runs = bench.matrix()
            rss = {s.name: s.rss_kib() for s in servers}
        finally:
            for server in reversed(servers):
                code = server.stop()
                if code not in (0, -15):
                    print(f"{server.name} exited {code}:\n{server.log_tail()}", file=sys.stderr)
        if plan.fsync_probe:
            probe_runs = bench.fsync_probe()
        if py_spy is not None:
            profiles = keep_profiles(runs, workdir, args.results_dir, stamp)
    table = report.rows(runs)
    probe_table = report.probe_rows(probe_runs)
    checks = report.targets(table, probe_table)
    scale = run_scale(args.quick) if args.scale else None
    if scale is not None:
        checks += scale_report.targets(scale)
    document = {
        "started": stamp,
        "machine": info,
        "plan": plan.to_json(),
        "rss_kib_at_end": rss,
        "rows": table,
        "fsync_probe": probe_table,
        "targets": checks,
        "runs": runs,
        "probe_runs": probe_runs,
        "scale": scale,
    }
    out = report.write_json(args.results_dir / f"{stamp}.json", document)
    for text in (
        report.throughput_table(table),
        report.cpu_table(table),
        report.sync_table(table, probe_table),
        *([] if scale is None else [scale_report.table(scale)]),
        report.targets_text(checks),
        *profiles,
    ):
        print()
        print(text)
    print(f"\nwrote {out}")
    if not args.no_plot:
        title = f"floor vs proxy - {info['cpu_model']}, Python {info['python']}, {stamp}"
        png = report.plot(table, args.results_dir / "latest.png", title)
        if png is not None:
            print(f"wrote {png}")
    return 0


def run_scale(quick: bool) -> dict[str, Any]:
    """``bench.scale`` in a subprocess of its own (its RSS figures must not include ours)."""
    with tempfile.TemporaryDirectory(prefix="vm-tenant-scale-out-") as tmp:
        out = Path(tmp) / "scale.json"
        command = [sys.executable, "-m", "bench.scale", "--out", str(out)]
        print("\nbench.scale" + (" --quick" if quick else ""), flush=True)
        subprocess.run(
            [*command, *(["--quick"] if quick else [])],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=3600,
        )
        figures: dict[str, Any] = json.loads(out.read_text())
    return figures


if __name__ == "__main__":
    sys.exit(main())
